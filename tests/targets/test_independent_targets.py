"""The independent targets under tests/targets/, proved by hand with real processes and sockets.

``asyncio_server.py`` (shared accept, Python) and ``node_handoff_server.js``
(acknowledged handoff, Node) must be correct servers of the protocol, so that
the chaos suite never cries wolf on them.  Each test starts a target on a free
port, talks to it over TCP with a client written here (not the plugin's), and
kills and reaps the whole process group in the fixture's finalizer.
"""

from __future__ import annotations

import errno
import json
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import psutil
import pytest

from pytest_fdcluster import resources, wait_until

HERE = Path(__file__).resolve().parent
HEADER = struct.Struct("<I")
WORKERS = 2
READY_TIMEOUT = 15.0
ANSWER_TIMEOUT = 5.0
GRACE = 3.0
PORT_ATTEMPTS = 5
#: What a target writes to stderr when it runs out of descriptors (errno 24): Node's code, or Python's strerror.
OUT_OF_DESCRIPTORS = ("EMFILE", "Too many open files")

needs_node = pytest.mark.skipif(shutil.which("node") is None,
                                reason="node (Node.js 20) is not on PATH: the Node handoff target cannot run")

COMMANDS = {
    "asyncio": [sys.executable, str(HERE / "asyncio_server.py")],
    "node": ["node", str(HERE / "node_handoff_server.js")],
}
TARGETS = [pytest.param("asyncio", id="asyncio"), pytest.param("node", id="node", marks=needs_node)]


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def request(method: str, params: Any = None) -> bytes:
    return frame(json.dumps({"in": method, "params": params}).encode("utf-8"))


class Conn:
    """A blocking protocol client: raw frames in, parsed replies out."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_raw = b""

    def _exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def recv(self) -> Any:
        (length,) = HEADER.unpack(self._exactly(HEADER.size))
        self.last_raw = self._exactly(length)
        return json.loads(self.last_raw)

    def call(self, method: str, params: Any = None) -> Any:
        self.sock.sendall(request(method, params))
        return self.recv()

    def close(self) -> None:
        self.sock.close()


class Target:
    """One started target: its ready line, its processes, its teardown."""

    def __init__(self, name: str, extra: List[str]) -> None:
        self.name = name
        self.proc: Optional[subprocess.Popen[str]] = None
        self.info: Dict[str, Any] = {}
        self.clients: List[Conn] = []
        for _ in range(PORT_ATTEMPTS):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            flags = ["--port", str(port), "--workers", str(WORKERS), "--grace", str(GRACE)]
            self.command = COMMANDS[name] + flags + extra
            if self._start():
                return
        raise AssertionError(f"{name}: no free port after {PORT_ATTEMPTS} attempts")

    def _start(self) -> bool:
        """True once ready; False if the port was taken meanwhile (the caller picks another)."""
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            ready = selector.select(READY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if line.startswith("fdcluster-ready "):
            self.info = json.loads(line.split(" ", 1)[1])
            return True
        self.kill()
        stderr = self.proc.stderr.read()
        if "in use" in stderr or "EADDRINUSE" in stderr:
            return False
        raise AssertionError(f"{self.name}: no ready line within {READY_TIMEOUT:g} s from {self.command}; "
                             f"got {line!r}, exit status {self.proc.returncode}, stderr: {stderr[-2000:]}")

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> List[int]:
        """Live worker pids (the master's children that are not zombies)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child.pid)
            except psutil.NoSuchProcess:
                pass  # died while listed
        return sorted(alive)

    def wait_for_stderr(self, needles: Sequence[str], timeout: float) -> str:
        """The target's stderr so far, once it contains one of ``needles``; AssertionError after ``timeout``."""
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        seen = bytearray()

        def found() -> bool:
            # Raw reads: the text wrapper's buffer would hide what it already took from the pipe from select().
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # the target closed its stderr (exited)
                seen.extend(chunk)
            text = seen.decode("utf-8", "replace")
            return any(needle in text for needle in needles)

        try:
            wait_until(found, timeout, lambda: f"{self.name} to log one of {list(needles)} on stderr")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stderr so far: {seen.decode('utf-8', 'replace')[-2000:]!r}") from None
        return seen.decode("utf-8", "replace")

    def connect(self) -> Conn:
        conn = Conn(self.port)
        self.clients.append(conn)
        return conn

    def kill(self) -> None:
        """SIGKILL the whole process group and reap the master."""
        for conn in self.clients:
            conn.close()
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is already gone
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed and self.proc.returncode is not None:
                stream.close()
        wait_until(lambda: not [p for p in psutil.process_iter(["pid"]) if _in_group(p, self.pid)], 10.0,
                   lambda: f"every process of {self.name}'s group {self.pid} to be gone")


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    started = Target(request.param, [])
    try:
        yield started
    finally:
        started.kill()


# name -> frame body; each gets an error frame and the connection stays usable
HOSTILE = {
    "invalid UTF-8": b'{"in": "ping", "params": "\xff\xfe"}',
    "invalid JSON": b'{"in": "ping", "params": ',
    "array": b'["ping"]',
    "number": b"42",
    "string": b'"ping"',
    "null": b"null",
    "missing in": b'{"params": 1}',
    "non-string in": b'{"in": 7}',
    "unknown method": b'{"in": "no-such-method", "params": null}',
    "zero-length": b"",
    "deep nesting, unclosed": b"[" * 100_000,
    "deep nesting, closed": b'{"in": "ping", "params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "float overflow": b'{"in": "ping", "params": 1e999}',
    "lone surrogate": b'{"in": "ping", "params": "\\ud800"}',
    "lone low surrogate in a key": b'{"in": "ping", "params": {"\\udc00": 1}}',
    "NaN": b'{"in": "ping", "params": NaN}',
    "Infinity": b'{"in": "ping", "params": Infinity}',
    "-Infinity": b'{"in": "ping", "params": -Infinity}',
    "duplicate keys": b'{"in": "ping", "in": "ping", "params": 1}',
}


class TestProtocol:
    def test_ready_line_names_port_pid_and_workers(self, target: Target) -> None:
        info = target.info
        assert info["pid"] == target.pid, f"{target.name}: ready line pid {info['pid']}, master is {target.pid}"
        assert sorted(info["workers"]) == target.workers(), (
            f"{target.name}: ready line workers {info['workers']}, live children {target.workers()}")
        assert len(info["workers"]) == WORKERS

    def test_ping_round_trip(self, target: Target) -> None:
        params = {"text": "日本語 ✓ 😀", "list": [1, 2.5, None, True], "nested": {"a": {"b": []}}}
        conn = target.connect()
        assert conn.call("ping", params) == {"out": "pong", "result": params}
        if target.name == "asyncio":
            assert b'{"out": "pong", "result": ' in conn.last_raw, (
                f"asyncio: not default json.dumps spacing: {conn.last_raw!r}")

    def test_pipelining_100_frames_in_one_send(self, target: Target) -> None:
        conn = target.connect()
        conn.sock.sendall(b"".join(request("ping", i) for i in range(100)))
        answers = [conn.recv()["result"] for _ in range(100)]
        assert answers == list(range(100)), f"{target.name}: pipelined replies out of order or lost: {answers}"

    def test_frame_split_byte_by_byte(self, target: Target) -> None:
        conn = target.connect()
        for byte in request("ping", {"split": "日本"}):
            conn.sock.sendall(bytes([byte]))
            time.sleep(0.001)  # pacing, so the bytes arrive in separate segments
        assert conn.recv() == {"out": "pong", "result": {"split": "日本"}}

    @pytest.mark.parametrize("name", list(HOSTILE))
    def test_hostile_input_gets_error_frame(self, target: Target, name: str) -> None:
        before = target.workers()
        conn = target.connect()
        conn.sock.sendall(frame(HOSTILE[name]))
        reply = conn.recv()
        assert isinstance(reply, dict) and reply.get("out") == "error", f"{target.name}: {name} answered {reply!r}"
        assert conn.call("ping", "after") == {"out": "pong", "result": "after"}, f"{target.name}: unusable after {name}"
        assert target.workers() == before, f"{target.name}: workers {before} -> {target.workers()} after {name}"

    def test_huge_integer_is_echoed_exactly_or_refused(self, target: Target) -> None:
        conn = target.connect()
        for digits in (30, 5000):
            conn.sock.sendall(frame(b'{"in": "ping", "params": 1' + b"0" * digits + b"}"))
            reply = conn.recv()
            assert reply in ({"out": "pong", "result": 10 ** digits},) or reply.get("out") == "error", (
                f"{target.name}: 1e{digits} as an integer came back altered: {str(reply)[:200]}")
        assert conn.call("ping", 1) == {"out": "pong", "result": 1}

    def test_oversize_frame_error_or_clean_close(self, target: Target) -> None:
        before = target.workers()
        conn = target.connect()
        conn.sock.sendall(HEADER.pack(0xFFFFFFF0) + b"x" * 16)
        try:
            reply = conn.recv()
            assert reply.get("out") == "error", f"{target.name}: oversize frame answered {reply!r}"
            assert conn.sock.recv(1) == b"", f"{target.name}: still open after the oversize error frame"
        except EOFError:
            pass  # a clean close is an answer too; a reset would have raised ConnectionResetError
        assert psutil.pid_exists(target.pid) and target.workers() == before, (
            f"{target.name}: master or workers died: workers {before} -> {target.workers()}")
        assert target.connect().call("ping", "next")["result"] == "next"

    def test_bad_flag_exits_2_with_a_message(self, target: Target) -> None:
        done = subprocess.run(COMMANDS[target.name] + ["--port", "1", "--no-such-flag"], capture_output=True,
                              text=True, timeout=15)
        assert done.returncode == 2 and "no-such-flag" in done.stderr, (
            f"{target.name}: exit {done.returncode}, stderr {done.stderr!r}")


class TestSupervision:
    def test_killed_worker_is_replaced_and_port_answers(self, target: Target) -> None:
        victim = target.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(target.workers()) == WORKERS and victim not in target.workers(), 10.0,
                   lambda: f"{target.name}: worker {victim} replaced; live {target.workers()}")
        for i in range(2 * WORKERS):
            assert target.connect().call("ping", i)["result"] == i, f"{target.name}: connection {i} after the kill"

    def test_every_worker_killed_port_stays_open(self, target: Target) -> None:
        victims = target.workers()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        conn = target.connect()  # the listener must accept while no worker is alive
        conn.sock.sendall(request("ping", "queued"))
        assert conn.recv() == {"out": "pong", "result": "queued"}, f"{target.name}: queued connection lost"
        wait_until(lambda: len(target.workers()) == WORKERS and not set(victims) & set(target.workers()), 10.0,
                   lambda: f"{target.name}: all {victims} replaced; live {target.workers()}")

    def test_sigterm_worker_drains_and_is_replaced(self, target: Target) -> None:
        conns = [target.connect() for _ in range(2 * WORKERS)]
        for i, conn in enumerate(conns):
            assert conn.call("ping", i)["result"] == i
        victim = target.workers()[0]
        for i, conn in enumerate(conns):
            conn.sock.sendall(request("ping", f"in flight {i}"))
        os.kill(victim, signal.SIGTERM)
        for i, conn in enumerate(conns):
            assert conn.recv() == {"out": "pong", "result": f"in flight {i}"}, f"{target.name}: request {i} lost"
        wait_until(lambda: len(target.workers()) == WORKERS and victim not in target.workers(), 10.0,
                   lambda: f"{target.name}: worker {victim} replaced after SIGTERM; live {target.workers()}")

    @pytest.mark.parametrize("served_before", [True, False], ids=["kept-alive", "fresh"])
    def test_sigterm_master_answers_what_was_sent_and_exits_0(self, target: Target, served_before: bool) -> None:
        conn = target.connect()
        if served_before:
            assert conn.call("ping", "first")["result"] == "first"
        conn.sock.sendall(request("ping", "in flight"))
        os.kill(target.pid, signal.SIGTERM)
        assert conn.recv() == {"out": "pong", "result": "in flight"}, f"{target.name}: request sent before SIGTERM lost"
        assert target.proc is not None
        status = target.proc.wait(GRACE + 5)
        stderr = target.proc.stderr.read() if target.proc.stderr is not None else ""
        assert status == 0, f"{target.name}: master exited {status} after SIGTERM; stderr {stderr[-1000:]!r}"
        try:
            assert conn.sock.recv(1) == b"", f"{target.name}: connection not closed at shutdown"
        except ConnectionResetError:
            pytest.fail(f"{target.name}: connection reset instead of closed cleanly at shutdown")

    def test_workers_die_with_their_master(self, target: Target) -> None:
        workers = target.workers()
        os.kill(target.pid, signal.SIGKILL)
        wait_until(lambda: not [pid for pid in workers if _alive(pid)], 5.0,
                   lambda: f"{target.name}: workers {workers} to die with their SIGKILLed master")


class TestDescriptorExhaustion:
    WORKER_FDS = 64
    CLIENTS = 150
    KEPT = 30

    def test_emfile_in_workers_no_spin_no_loss(self, target: Target) -> None:
        """Workers capped at 64 descriptors: no CPU spin, nothing lost, service resumes once clients leave."""
        workers = target.workers()
        for pid in workers:
            psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE, (self.WORKER_FDS, self.WORKER_FDS))
        socks = []
        for i in range(self.CLIENTS):
            sock = socket.create_connection(("127.0.0.1", target.port), timeout=ANSWER_TIMEOUT)
            sock.sendall(request("ping", i))
            socks.append(sock)
        try:
            wait_until(lambda: all(psutil.Process(pid).num_fds() >= self.WORKER_FDS - 2 for pid in workers), 10.0,
                       lambda: f"{target.name}: workers {workers} to reach their descriptor limit")
            tree = [psutil.Process(pid) for pid in [target.pid] + workers]
            before = [sum(p.cpu_times()[:2]) for p in tree]
            time.sleep(1.0)  # a measurement window, not synchronisation
            spent = [round(sum(p.cpu_times()[:2]) - b, 3) for p, b in zip(tree, before)]
            assert max(spent) < 0.3, f"{target.name}: CPU seconds in 1 s at EMFILE (master, workers...): {spent}"
            for sock in socks[:-self.KEPT]:
                sock.close()
            for i, sock in enumerate(socks[-self.KEPT:], self.CLIENTS - self.KEPT):
                sock.settimeout(10.0)
                (length,) = HEADER.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
                assert json.loads(sock.recv(length, socket.MSG_WAITALL)) == {"out": "pong", "result": i}, (
                    f"{target.name}: client {i}, waiting while the workers were out of descriptors")
        finally:
            for sock in socks:
                sock.close()
        assert target.workers() == workers, f"{target.name}: workers {workers} -> {target.workers()} at EMFILE"

    def test_master_at_its_limit_respawns_once_descriptors_are_back(self, target: Target) -> None:
        """A worker dies while the master is out of descriptors: the failed start is retried, not given up."""
        victim = target.workers()[0]
        lowest = resources.lowest_free_fd(target.pid)
        # The soft limit at the lowest free number: the replacement's IPC socketpair (Node) or its event loop
        # (Python, whose child inherits the limit) cannot get a descriptor.
        with resources.nofile_limit(target.pid, lowest):
            os.kill(victim, signal.SIGKILL)
            try:
                target.wait_for_stderr(OUT_OF_DESCRIPTORS, 10.0)  # proof that the fault bit
            except AssertionError as exc:
                pytest.fail(f"{target.name}: no failed start of worker {victim}'s replacement logged with the master "
                            f"at RLIMIT_NOFILE {lowest} (the limit did not bite, or the failure went unnoticed): {exc}")
            assert _alive(target.pid), f"{target.name}: master died replacing worker {victim} at RLIMIT_NOFILE {lowest}"
        wait_until(lambda: len(target.workers()) == WORKERS and victim not in target.workers(), 10.0,
                   lambda: f"{target.name}: worker {victim} replaced once the master's RLIMIT_NOFILE {lowest} was "
                           f"restored; live {target.workers()}")
        for i in range(2 * WORKERS):
            assert target.connect().call("ping", i)["result"] == i, f"{target.name}: connection {i} after the respawn"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_port_in_use_is_reported_not_hung() -> None:
    """Start-up failure on a taken port: exit 1 with a message (what Target's retry relies on)."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for name in COMMANDS:
            if name == "node" and shutil.which("node") is None:
                continue
            done = subprocess.run(COMMANDS[name] + ["--port", str(port), "--workers", "1"], capture_output=True,
                                  text=True, timeout=15)
            assert done.returncode == 1 and ("in use" in done.stderr or "EADDRINUSE" in done.stderr), (
                f"{name}: exit {done.returncode}, stderr {done.stderr!r} (errno {errno.EADDRINUSE} expected)")
