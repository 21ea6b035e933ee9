"""Hostile input: frames built to break a parser, and a seeded fuzz corpus; no process may die of them.

Invariants checked (hostile input, 7):
- every named class of hostile frame (``pytest_fdcluster.hostile``: deep
  nesting, huge numbers, lone surrogates, NaN and Infinity, duplicate keys,
  wrong types, invalid or truncated UTF-8, empty bodies, byte order marks,
  lengths up to 4 GiB, lengths that lie) and 10,000 generated bad frames get
  what the case requires: after a recoverable one an error frame, then an answer
  to a ping on the same connection; after a fatal one at most an error frame,
  then a clean close (EOF, not a reset);
- no process of the target dies: the master's and the workers' pids are the
  same before and after, judged from outside (/proc), whatever the connection
  showed; a connection opened before the barrage is still served after it.

Recoverable frames are pipelined, each followed by a ping, many on one
connection (a server answers in order; the protocol has no ids), so 10,000
frames take seconds; a fatal case gets a fresh connection of its own.  The
corpus's seed is ``FDCLUSTER_HOSTILE_SEED`` if set, else the run's payload seed
(``fdcluster_payloads.seed``); every failure prints it with the line that
replays the case.  Cases assume the target's declared ``max_frame``.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest

from pytest_fdcluster import hostile, process_alive, protocol, require
from pytest_fdcluster.hostile import FATAL, NO_REPLY, HostileCase, Observed

ANSWER_TIMEOUT = 5.0  # per exchange: a batch of pipelined cases, or one fatal case
FUZZ_COUNT = 10_000
BATCH_CASES = 250  # recoverable cases pipelined per exchange, each followed by a ping
BATCH_BYTES = 1 << 20
MAX_FAILURES = 10  # a broken server fails thousands of cases; the first few say why
RUN_BUDGET = 90.0  # seconds for a whole corpus, however slow the target: bounded, then a failure
DEATH_WAIT = 1.0  # after a connection ended early: how long a dying process may take to show as dead
REPLY_LIMIT = 1 << 24  # a reply frame larger than this is garbage, not an error message

OPEN, CLOSED, RESET, TIMEOUT = hostile.OPEN, hostile.CLOSED, hostile.RESET, hostile.TIMEOUT


@pytest.fixture
def hostile_seed(fdcluster_payloads) -> int:
    """The corpus's seed: FDCLUSTER_HOSTILE_SEED, else the run's payload seed (an int), else 0."""
    text = os.environ.get(hostile.SEED_VARIABLE)
    if text:
        try:
            return int(text)
        except ValueError:
            pytest.fail(f"hostile input: {hostile.SEED_VARIABLE}={text!r} is not an integer seed")
    seed = fdcluster_payloads.seed
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def parse_reply(body: bytes) -> Any:
    """A reply as any JSON value, judged by meaning; the raw bytes if it is not JSON at all."""
    try:
        return json.loads(body)
    except ValueError:
        return body


class Pipe:
    """One connection that sends and reads at once, so neither side's buffers can deadlock a large pipeline."""

    def __init__(self, address: Tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=ANSWER_TIMEOUT)
        self.sock.setblocking(False)
        self.decoder = protocol.FrameDecoder(REPLY_LIMIT)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ)

    def close(self) -> None:
        self.selector.close()
        self.sock.close()

    def exchange(self, data: bytes, expect: Optional[int], timeout: float,
                 half_close: bool = False) -> Tuple[List[Any], str]:
        """Send ``data`` (then FIN if ``half_close``) and read ``expect`` replies, or to the end if None.

        Returns the replies and how the stream stands: OPEN (all expected
        replies came, or with ``expect=None`` some came and the stream stayed
        open), CLOSED (EOF), RESET, or TIMEOUT (nothing came before the deadline).
        """
        replies: List[Any] = []
        out = memoryview(data)
        sent = 0
        sending = True
        deadline = time.monotonic() + timeout
        while expect is None or len(replies) < expect:
            self.selector.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if sending else 0))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return replies, OPEN if replies and expect is None else TIMEOUT
            for _, events in self.selector.select(remaining):
                if events & selectors.EVENT_WRITE and sending:
                    try:
                        sent += self.sock.send(out[sent:sent + (1 << 16)])
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        sending = False  # the server closed: reading tells a clean close from a reset
                        continue
                    if sent == len(out):
                        sending = False
                        if half_close:
                            self.sock.shutdown(socket.SHUT_WR)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = self.sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        return replies, RESET
                    if not chunk:
                        return replies, CLOSED
                    replies.extend(parse_reply(body) for body in self.decoder.feed(chunk))
                    if self.decoder.failure is not None:
                        replies.append(f"a reply frame longer than {REPLY_LIMIT} bytes".encode())
                        return replies, OPEN
        return replies, OPEN


def ping(tag: int) -> bytes:
    return protocol.request("ping", tag)


def answered_ping(reply: Any, tag: int) -> bool:
    return isinstance(reply, dict) and reply.get("out") == "pong" and reply.get("result") == tag


class HostileRun:
    """Sends hostile cases to one cluster and judges each with ``hostile.judge``; keeps the first failures."""

    def __init__(self, cluster, seed: int) -> None:
        self.cluster = cluster
        self.seed = seed
        self.max_frame = require(cluster, "max_frame")
        self.watched = cluster.labels()  # pid -> 'master' / 'worker N', taken before any hostile byte
        self.failures: List[str] = []
        self.failed = 0
        self.judged = 0
        self.pipe: Optional[Pipe] = None
        self.tags = 0
        self.dead: Dict[int, str] = {}  # pid -> label of every watched process seen dead
        self.deadline = time.monotonic() + RUN_BUDGET
        self.stopped = ""  # why the run ended early: the time budget

    @property
    def done(self) -> bool:
        return bool(self.stopped) or len(self.failures) >= MAX_FAILURES

    def deaths(self, wait: float = 0.0) -> Tuple[str, ...]:
        """Watched processes newly gone, after waiting up to ``wait`` s for one to show; their successors are watched.

        Each death is reported once, with the case during which it showed, and
        the run goes on against the respawned worker: one run shows every class
        of frame that kills.
        """
        end = time.monotonic() + wait
        while True:
            dead = {pid: label for pid, label in self.watched.items()
                    if pid not in self.dead and not process_alive(pid)}
            if dead or time.monotonic() >= end:
                break
            time.sleep(0.02)  # polling /proc for an exit, bounded by ``wait``
        self.dead.update(dead)
        if dead:
            self.watched.update(self.cluster.labels())  # respawned workers (new pids) are judged from now on
        return tuple(f"{label} pid {pid}" for pid, label in dead.items())

    def record(self, case: HostileCase, observed: Observed) -> None:
        self.judged += 1
        message = hostile.judge(case.case_id, case.expected, observed)
        if message is not None:
            self.failed += 1
            if len(self.failures) < MAX_FAILURES:
                self.failures.append(f"{message}\n    {hostile.replay_hint(self.seed, case.case_id)}")

    def run(self, cases: Iterable[HostileCase]) -> None:
        batch: List[HostileCase] = []
        size = 0
        for case in cases:
            if self.done:
                break
            if time.monotonic() > self.deadline:
                self.stopped = f"stopped after {RUN_BUDGET:g} s, the run's time budget"
                break
            restated = hostile.against_limit(case, self.max_frame)
            if restated is None:
                continue  # an "oversized" length the target's declared max_frame allows: only an incomplete frame
            if restated.expected == FATAL:
                self.flush(batch)
                batch, size = [], 0
                self.fatal(restated)
                continue
            batch.append(restated)
            size += len(restated.frame)
            if len(batch) >= BATCH_CASES or size >= BATCH_BYTES:
                self.flush(batch)
                batch, size = [], 0
        self.flush(batch)
        self.drop_pipe()

    def drop_pipe(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    def flush(self, batch: Sequence[HostileCase]) -> None:
        """Pipeline ``batch``, a ping after each case; judge them in order; go on after a broken connection."""
        while batch and not self.done:
            if self.pipe is None:
                self.pipe = Pipe(self.cluster.address)
            first_tag = self.tags
            self.tags += len(batch)
            payload = b"".join(case.frame + ping(first_tag + i) for i, case in enumerate(batch))
            replies, end = self.pipe.exchange(payload, 2 * len(batch), ANSWER_TIMEOUT * 2)
            for i, case in enumerate(batch):
                got = replies[2 * i:2 * i + 2]
                if len(got) == 2 and answered_ping(got[1], first_tag + i):
                    self.record(case, Observed(got[0], OPEN, usable=True))
                    continue
                # The stream ended, stalled or lost its order at this case: judge it, then go on afresh.
                self.drop_pipe()
                if len(got) == 2:
                    observed = Observed(got[0], OPEN, usable=False, died=self.deaths())
                else:
                    reply = got[0] if got else NO_REPLY
                    observed = Observed(reply, end, usable=None, died=self.deaths(DEATH_WAIT))
                self.record(case, observed)
                batch = batch[i + 1:]
                break
            else:
                return

    def fatal(self, case: HostileCase) -> None:
        """One fatal case on a fresh connection: at most an error frame, then EOF."""
        if self.done:
            return
        pipe = Pipe(self.cluster.address)
        try:
            replies, end = pipe.exchange(case.frame, None, ANSWER_TIMEOUT, half_close=case.half_close)
        finally:
            pipe.close()
        if len(replies) > 1:  # more than one frame after a fatal case: the first one that is not the error
            replies = [next((r for r in replies if not hostile.is_error_frame(r)), replies[0])]
        died = self.deaths(DEATH_WAIT if end != CLOSED else 0.0)
        self.record(case, Observed(replies[0] if replies else NO_REPLY, end, died=died))

    def verdict(self, what: str) -> Optional[str]:
        """None if every case passed and no watched process died; else the message, figures first."""
        self.deaths()
        if not self.failures and not self.dead and not self.stopped:
            return None
        lines = [f"hostile input: {self.failed} of {self.judged} {what} failed (seed {self.seed}, "
                 f"{hostile.SEED_VARIABLE}={self.seed} replays the corpus)"
                 + (f"; {self.stopped}" if self.stopped else "")]
        if self.dead:
            lines.append("hostile input: died during the run: "
                         + ", ".join(f"{label} pid {pid}" for pid, label in self.dead.items()))
        lines.extend(self.failures)
        if self.failed > len(self.failures):
            lines.append(f"... and {self.failed - len(self.failures)} more")
        return "\n".join(lines)


def assert_survives(cluster, seed: int, cases: Iterable[HostileCase], what: str) -> HostileRun:
    """Run ``cases`` with a bystander connection open throughout; every case, process and the bystander judged."""
    __tracebackhide__ = True
    workers = sorted(cluster.workers)
    with cluster.client(ANSWER_TIMEOUT) as bystander:
        assert bystander.call("ping", "before") == "before", "liveness: the bystander was not served before the run"
        run = HostileRun(cluster, seed)
        run.run(cases)
        message = run.verdict(what)
        assert message is None, message
        try:
            still = bystander.call("ping", "after")
        except Exception as exc:  # any failure of the bystander is this invariant's failure
            still = exc
        assert still == "after", (f"hostile input: a connection opened before the {what} was not served after them "
                                  f"(seed {seed}): {still!r}")
    assert sorted(cluster.workers) == workers, (
        f"hostile input: worker pids changed over the {what} (seed {seed}): {workers} -> {sorted(cluster.workers)}")
    return run


def test_named_hostile_cases_leave_every_process_alive(fdcluster, hostile_seed):
    """All 65 named cases of the 12 classes, each judged on its own (pipelined, with a ping after each)."""
    cases = hostile.named_cases()
    run = assert_survives(fdcluster, hostile_seed, cases, "named hostile cases")
    assert run.judged >= len(cases) - 3, f"hostile input: only {run.judged} of {len(cases)} named cases were judged"


def test_seeded_fuzz_corpus_leaves_every_process_alive(fdcluster, hostile_seed, record_property):
    """10,000 generated bad frames from the seed; any failure prints the seed and the case to replay."""
    started = time.monotonic()
    run = assert_survives(fdcluster, hostile_seed, hostile.fuzz_corpus(hostile_seed, FUZZ_COUNT), "fuzz cases")
    record_property("hostile_seed", hostile_seed)
    record_property("hostile_fuzz_seconds", round(time.monotonic() - started, 2))
    assert run.judged >= FUZZ_COUNT * 0.98, (
        f"hostile input: only {run.judged} of {FUZZ_COUNT} fuzz cases were judged (seed {hostile_seed})")
