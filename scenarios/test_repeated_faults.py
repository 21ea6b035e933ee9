"""Repeated and compound faults: a cluster recovers from the same fault again and again, and from faults combined.

Invariant checked (repeated faults, 8):

- the same worker slot SIGKILLed ``KILLS`` times in a row, each time as soon
  as its replacement appeared, is replaced every time, and the replacement
  serves.  A slot that dies young may be respawned after a back-off that grows
  with its quick deaths (the reference server doubles it from 0.2 s up to
  5 s); each replacement is awaited up to ``REPLACE_TIMEOUT``, twice that cap.
  On a round-robin target each replacement must also take connections.
- two workers SIGKILLed during a connection storm, one running and one
  frozen with its share of the storm waiting (which also keeps the storm
  going until both kills): every storm connection is answered except those
  the killed workers held, which see EOF or RST, never a hang; the master
  keeps listening (nothing refused); the cluster serves afterwards.  The
  running worker holds at most the storm's ``CONCURRENCY`` connections in
  flight, and the frozen one could accept none (a descriptor passed to a
  stopped process waits in its socket's queue), so at most ``CONCURRENCY``
  may end unanswered.  With two workers both die, so the target must
  declare that it respawns (``require``).
- a worker paused long enough to fill its handoff window (connections keep
  arriving and are passed to the others) answers what it was handed once it
  resumes, and then gets its share again: sequential connections spread
  round-robin within one per worker.  Only a round-robin target is judged on
  that: it ``require``s ``strategy=round-robin``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict

import pytest

from pytest_fdcluster import (
    ClientError,
    ClusterError,
    FairnessError,
    assert_round_robin,
    faults,
    require,
    wait_until,
)

ANSWER_TIMEOUT = 5.0
KILLS = 5
REPLACE_TIMEOUT = 10.0
TAKES_CONNECTIONS_TIMEOUT = 3.0
STORM = 400
CONCURRENCY = 40
STORM_TIMEOUT = 5.0
PROGRESS_TIMEOUT = 5.0
FILL_PER_WORKER = 8
FILL_WINDOW = 1.0  # how long the paused worker's share of the fill is left waiting; others answer within it
SHARE_PER_WORKER = 4


def serves(cluster, what):
    for number in range(2 * len(cluster.workers)):
        try:
            assert cluster.call("ping", number, timeout=ANSWER_TIMEOUT) == number
        except (ClientError, OSError, AssertionError) as exc:
            pytest.fail(f"repeated faults: new connection {number} not served {what}: {exc!r:.200}")


def takes_connections(cluster, pid, what):
    """repeated faults: on a round-robin target, worker ``pid`` is handed one of a few new connections."""
    label = cluster.labels().get(pid, f"pid {pid}")
    deadline = time.monotonic() + TAKES_CONNECTIONS_TIMEOUT
    owners = []
    # A replacement may need a moment to join the rotation; one connection at a time, bounded in time and count.
    for number in range(64):
        with cluster.client(ANSWER_TIMEOUT) as client:
            assert client.call("ping", number) == number, f"repeated faults: ping {number} not echoed {what}"
            owner = cluster.snapshot().owner_of(client.local_address)
        if owner is not None and owner.pid == pid:
            return
        owners.append(owner.label if owner else "nobody")
        if time.monotonic() > deadline:
            break
    pytest.fail(f"repeated faults: {label} (pid {pid}) took none of {len(owners)} new connections {what} "
                f"within {TAKES_CONNECTIONS_TIMEOUT:g} s; they went to: {', '.join(owners)}")


def test_same_slot_killed_repeatedly_is_replaced_every_time(fdcluster):
    require(fdcluster, "respawns")
    round_robin = fdcluster.capabilities.strategy == "round-robin"
    victim = fdcluster.workers[0]
    lineage = [victim]
    for kill in range(1, KILLS + 1):
        before = set(fdcluster.workers)
        fdcluster.kill_worker(victim)
        began = time.monotonic()
        try:
            workers = fdcluster.wait_for_workers(timeout=REPLACE_TIMEOUT, gone=[victim])
        except ClusterError as exc:
            pytest.fail(f"repeated faults: kill {kill} of {KILLS} of the same slot (pids so far {lineage}) was not "
                        f"replaced within {REPLACE_TIMEOUT:g} s, back-off included: {exc}")
        newcomers = [pid for pid in workers if pid not in before]
        assert len(newcomers) == 1, (
            f"repeated faults: after kill {kill} of pid {victim}, expected one new worker, got {newcomers} "
            f"(workers before {sorted(before)}, now {workers})")
        victim = newcomers[0]
        lineage.append(victim)
        what = f"after kill {kill} of {KILLS} (replaced in {time.monotonic() - began:.2f} s)"
        serves(fdcluster, what)
        if round_robin:
            takes_connections(fdcluster, victim, what)
    assert fdcluster.target.alive(), f"repeated faults: the master died after {KILLS} kills of one slot {lineage}"


def test_workers_killed_during_a_connection_storm(fdcluster):
    require(fdcluster, "respawns")  # every worker of a two-worker cluster dies: only replacements can finish it
    # hold=True: answered connections stay open, so their count shows the storm's progress from this thread.
    storm = faults.ConnectionStorm(fdcluster, STORM, concurrency=CONCURRENCY, hold=True, timeout=STORM_TIMEOUT)
    outcome: Dict[str, Any] = {}

    def run():
        try:
            outcome["result"] = storm.run()
        except BaseException as exc:  # re-raised in the test below, never swallowed
            outcome["error"] = exc

    running = fdcluster.workers[0]
    # A frozen worker holds its share of the storm, so the storm cannot end before both kills.
    frozen = fdcluster.pause_worker(len(fdcluster.workers) - 1)
    thread = threading.Thread(target=run, name="connection storm", daemon=True)
    victims = []
    thread.start()
    try:
        try:
            wait_until(lambda: len(storm.held) >= STORM // 4 or not thread.is_alive(), PROGRESS_TIMEOUT,
                       lambda: f"a quarter of the storm's {STORM} connections to be answered")
        except ClusterError as exc:
            pytest.fail(f"repeated faults: the storm made no progress with worker pid {frozen} frozen: {exc}")
        storm_running = thread.is_alive()
        victims = [fdcluster.kill_worker(running), fdcluster.kill_worker(frozen)]
    finally:
        if not victims:
            fdcluster.resume_worker(frozen)
        thread.join(STORM_TIMEOUT + ANSWER_TIMEOUT)
        storm.close()
    assert not thread.is_alive(), (
        f"repeated faults: the storm of {STORM} connections did not end {STORM_TIMEOUT + ANSWER_TIMEOUT:g} s "
        f"after workers {victims} were killed in it")
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    lost = result.eof + result.reset
    bound = CONCURRENCY  # the running victim's most; the frozen one could take none of the storm's connections
    problems = []
    if result.timed_out:
        problems.append(f"{result.timed_out} connections hung: no answer, no EOF, no RST within {STORM_TIMEOUT:g} s")
    if result.refused or result.other:
        problems.append(f"the master stopped taking connections: {result.refused} refused, other errors "
                        f"{dict(result.other)}, {result.connected} of {result.attempted} connected")
    if result.mismatched:
        problems.append(f"{result.mismatched} answered with something other than their echo")
    if lost > bound:
        problems.append(f"{lost} ended unanswered (EOF or RST), more than the {bound} connections in flight that "
                        f"the running worker can have held (the frozen one accepted none)")
    assert storm_running, f"repeated faults: the storm ended before workers {victims} were killed: {result}"
    assert not problems, (f"repeated faults: running worker pid {victims[0]} and frozen worker pid {victims[1]} "
                          f"SIGKILLed during a storm of {STORM} connections: " + "; ".join(problems) + f" ({result})")
    try:
        fdcluster.wait_for_workers(timeout=REPLACE_TIMEOUT, gone=victims)
    except ClusterError as exc:
        pytest.fail(f"repeated faults: workers {victims} killed during the storm were not replaced: {exc}")
    serves(fdcluster, f"after workers {victims} were killed during a storm")


def test_paused_worker_gets_its_share_after_resume(fdcluster):
    require(fdcluster, "strategy", "round-robin")
    paused = fdcluster.pause_worker(0)
    label = fdcluster.labels().get(paused, f"pid {paused}")
    fill = [fdcluster.client(ANSWER_TIMEOUT) for _ in range(FILL_PER_WORKER * len(fdcluster.workers))]
    share = []
    try:
        for number, client in enumerate(fill):
            client.send_frame({"in": "ping", "params": {"fill": number}})
        deadline = time.monotonic() + FILL_WINDOW
        waiting = []
        for number, client in enumerate(fill):
            try:
                client.recv_frame(max(0.0, deadline - time.monotonic()))
            except (ClientError, OSError):
                waiting.append(number)  # handed to the paused worker, or queued for it
        assert waiting, (f"repeated faults: all {len(fill)} connections were answered while {label} (pid {paused}) "
                         f"was paused: it was handed none, so its window never filled")
        assert len(waiting) < len(fill), (
            f"repeated faults: none of {len(fill)} connections answered within {FILL_WINDOW:g} s while only "
            f"{label} (pid {paused}) was paused: the others did not take the load")
        fdcluster.resume_worker(paused)
        late = []
        for number in waiting:
            try:
                reply = fill[number].recv_frame(ANSWER_TIMEOUT)
            except (ClientError, OSError) as exc:
                reply = exc
            if not isinstance(reply, dict) or reply.get("result") != {"fill": number}:
                late.append(f"client {number}: {reply!r:.80}")
        assert not late, (f"repeated faults: {len(late)} of {len(waiting)} connections left waiting on {label} "
                          f"(pid {paused}) were not answered after it resumed: " + "; ".join(late))
        for client in fill:
            client.close()
        for number in range(SHARE_PER_WORKER * len(fdcluster.workers)):
            client = fdcluster.client(ANSWER_TIMEOUT)
            share.append(client)
            assert client.call("ping", number) == number, f"repeated faults: ping {number} after resume not echoed"
        counts = fdcluster.connections_per_worker(share)
        workers = {label for label in fdcluster.labels().values() if label != "master"}
        assert set(counts) == workers, (
            f"repeated faults: after {label} (pid {paused}) resumed, {len(share)} answered connections are held "
            f"by {counts}, not each by one of the workers {sorted(workers)}")
        try:
            assert_round_robin(counts, tolerance=1)
        except FairnessError as exc:
            pytest.fail(f"repeated faults: after {label} (pid {paused}) was paused with {len(waiting)} connections "
                        f"waiting and resumed, {len(share)} sequential connections did not spread round-robin: {exc}")
    finally:
        for client in fill + share:
            client.close()
