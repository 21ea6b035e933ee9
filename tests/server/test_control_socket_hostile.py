"""Hostile clients of the master's control socket: bombs, slow readers, floods, disconnects, foreign users.

Every test runs a real server and attacks its control socket from outside,
then checks that the master is the same process, its workers the same pids,
and that it still answers a control query and a TCP client.  One client's
frame, pace or number must never stop the master serving everyone else.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import socket
import threading
import time
from typing import Callable, Iterator, List, Optional

import psutil
import pytest
from conftest import Server, call, connect, wait_for

from fdcluster_server import protocol
from fdcluster_server.control import MAX_CLIENTS, MAX_QUERIES, MAX_REQUEST, STATS_TIMEOUT

NOBODY = 65534
PING_LIMIT = 0.5  # a fresh TCP client's ping on an idle loopback cluster takes milliseconds
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user (nobody) needs root")


def open_control(server: Server, timeout: float = 5.0) -> socket.socket:
    """A new connection to ``server``'s control socket (an abstract address)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect("\0" + server.info["control"][1:])
            return sock
        except BlockingIOError:  # the listener's backlog is full until the master accepts
            if time.monotonic() > deadline:
                sock.close()
                raise AssertionError(f"master {server.pid}'s control backlog stayed full for {timeout} s") from None
            time.sleep(0.005)


def read_to_end(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the master sends until it closes the connection (EOF or reset); fails if it never does."""
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks)
        except socket.timeout:
            break
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"control connection fd {sock.fileno()} still open after {timeout} s; "
                         f"expected the master to close it")


def replies(data: bytes) -> List[dict]:
    return [json.loads(body) for body in protocol.FrameDecoder().feed(data)]


def ping_latency(server: Server) -> float:
    """Seconds for a ping on a fresh TCP connection: accept, handoff and a worker's answer."""
    started = time.monotonic()
    with connect(server.address) as sock:
        assert call(sock, "ping", "still there")["out"] == "pong"
    return time.monotonic() - started


def assert_unharmed(server: Server, workers: List[int]) -> None:
    """The master lives, its workers are the same processes, and it answers control and TCP clients."""
    assert server.proc.poll() is None, f"master {server.pid} exited with {server.proc.poll()}:\n{server.stderr()}"
    assert server.workers() == workers, f"workers changed from {workers} to {server.workers()}"
    assert server.control(protocol.request("ping")) == [{"out": "pong", "result": None}]
    assert ping_latency(server) < 5.0


def master_cpu(server: Server) -> float:
    times = psutil.Process(server.pid).cpu_times()
    return times.user + times.system


def control_connections(server: Server) -> int:
    """Control clients the master holds: its sockets named by the control address, less the listener."""
    address = server.info["control"]
    return sum(1 for c in psutil.Process(server.pid).net_connections("unix") if c.laddr == address) - 1


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


HOSTILE_FRAMES = {
    "nested-arrays-1KiB": protocol.encode_body(b"[" * 1024),
    "nested-arrays-60KiB": protocol.encode_body(b"[" * 60_000),
    "nested-params": protocol.encode_body(b'{"in": "ping", "params": ' + deep(5000) + b"}"),
    "nested-objects": protocol.encode_body(b'{"a":' * 3000 + b"1" + b"}" * 3000),
    "invalid-utf8": protocol.encode_body(b'{"in": "\xff\xfe\xc3"}'),
    "lone-surrogate": protocol.encode_body(b'{"in": "\\ud800", "params": "\\udfff"}'),
    "garbage": protocol.encode_body(random.Random(9).randbytes(4096)),
    "not-an-object": protocol.encode_body(b"[1, 2, 3]"),
    "zero-length": protocol.HEADER.pack(0),
    "many-zero-length": protocol.HEADER.pack(0) * 16_384,
    "huge-length-prefix": protocol.HEADER.pack(MAX_REQUEST + 1) + b"{" * 100,
    "4GiB-length-prefix": protocol.HEADER.pack(0xFFFFFFFF),
    "truncated": protocol.HEADER.pack(100) + b'{"in": "st',
}


class TestBombs:
    @pytest.mark.parametrize("frame", HOSTILE_FRAMES.values(), ids=HOSTILE_FRAMES.keys())
    def test_one_frame_never_harms_the_master(self, start_server, frame: bytes):
        server = start_server("--workers", "2")
        workers = server.workers()
        with open_control(server) as sock:
            try:
                sock.sendall(frame)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed mid-frame (its replies overflowed): what it was sent is still readable
            answers = replies(read_to_end(sock))
        assert all(r["out"] == "error" for r in answers), f"hostile frame answered with {answers[:3]}"
        assert_unharmed(server, workers)

    def test_bomb_then_ping_from_another_client(self, start_server):
        server = start_server("--workers", "1")
        workers = server.workers()
        with open_control(server) as bomber, open_control(server) as bystander:
            bystander.sendall(protocol.request("ping"))
            bomber.sendall(HOSTILE_FRAMES["nested-arrays-60KiB"])
            bystander.shutdown(socket.SHUT_WR)
            assert replies(read_to_end(bystander)) == [{"out": "pong", "result": None}]
        assert_unharmed(server, workers)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Worker ``pid`` stopped (SIGSTOP) for the block, so stats queries wait for it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, what=f"worker {pid} stopped")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class TestDisconnectsMidQuery:
    def test_client_gone_while_stats_wait_for_a_paused_worker(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        with paused(workers[0]):
            with open_control(server) as sock:
                sock.sendall(protocol.request("stats") * 2)
                wait_for(lambda: control_connections(server) == 1, what=f"master {server.pid} to accept the client")
            # This query expires after the two above, so once it is answered they have been.
            stats = server.stats()
        assert [w["reported"] for w in stats["workers"]] == [False, True], stats["workers"]
        assert_unharmed(server, workers)

    def test_half_closed_client_gets_every_stats_reply_after_the_timeout(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        with paused(workers[1]), open_control(server) as sock:
            sock.sendall(protocol.request("stats") * 2)
            sock.shutdown(socket.SHUT_WR)
            answers = replies(read_to_end(sock, timeout=STATS_TIMEOUT + 5))
        assert [r["out"] for r in answers] == ["stats", "stats"], answers
        assert_unharmed(server, workers)

    def test_many_clients_gone_mid_query(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        with paused(workers[0]):
            for _ in range(10):
                with open_control(server) as sock:
                    sock.sendall(protocol.request("stats") * MAX_QUERIES + protocol.request("workers"))
            stats = server.stats()
        assert stats["master"]["pid"] == server.pid
        assert_unharmed(server, workers)


def pings_while(server: Server, busy: Callable[[], bool], at_least: float, timeout: float) -> List[float]:
    """Fresh-connection ping latencies for at least ``at_least`` seconds and while ``busy()``."""
    started = time.monotonic()
    latencies = []
    while time.monotonic() - started < at_least or busy():
        assert time.monotonic() - started < timeout, f"still busy after {timeout} s"
        latencies.append(ping_latency(server))
    return latencies


class FloodSender(threading.Thread):
    """Sends ``payload`` on ``sock`` and never reads; stops when the master closes the connection."""

    def __init__(self, sock: socket.socket, payload: bytes) -> None:
        super().__init__(daemon=True)
        self.sock, self.payload = sock, payload
        self.error: Optional[OSError] = None

    def run(self) -> None:
        try:
            self.sock.sendall(self.payload)
        except OSError as exc:
            self.error = exc  # the master closed it: what the test expects


class TestSlowReaders:
    def test_client_that_never_reads_does_not_delay_the_master(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        cpu_before = master_cpu(server)
        with open_control(server, timeout=30) as sock:
            sender = FloodSender(sock, protocol.request("stats") * 10_000)
            sender.start()
            latencies = pings_while(server, sender.is_alive, at_least=2.0, timeout=30)
            sender.join(5)
            read_to_end(sock)  # the master closed it; what it sent before does not matter
        cpu = master_cpu(server) - cpu_before
        assert max(latencies) < PING_LIMIT, f"slowest of {len(latencies)} pings took {max(latencies):.3f} s"
        assert cpu < 2.0, f"master {server.pid} used {cpu:.2f} s of CPU for one flooding control client"
        assert_unharmed(server, workers)

    def test_client_that_reads_slowly_is_closed_and_does_not_delay_the_master(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        closed = threading.Event()
        with open_control(server, timeout=30) as sock:

            def read_slowly() -> None:
                for _ in range(2000):  # 4 KiB every 20 ms, far slower than the replies come
                    try:
                        if not sock.recv(4096):
                            break
                    except OSError:
                        break
                    time.sleep(0.02)  # the slow reader's pace, not synchronisation
                closed.set()

            reader = threading.Thread(target=read_slowly, daemon=True)
            reader.start()
            sender = FloodSender(sock, protocol.request("workers") * 10_000)
            sender.start()
            latencies = pings_while(server, lambda: not closed.is_set(), at_least=2.0, timeout=40)
            sender.join(5)
            reader.join(5)
        assert closed.is_set(), "the master never closed the slow reader"
        assert max(latencies) < PING_LIMIT, f"slowest of {len(latencies)} pings took {max(latencies):.3f} s"
        assert_unharmed(server, workers)


class TestFloods:
    def test_clients_over_the_cap_are_refused_and_the_rest_served(self, start_server):
        server = start_server("--workers", "1")
        workers = server.workers()
        held = [open_control(server) for _ in range(MAX_CLIENTS)]
        try:
            wait_for(lambda: control_connections(server) == MAX_CLIENTS,
                     what=f"master {server.pid} to accept {MAX_CLIENTS} control clients")
            extra = [open_control(server) for _ in range(20)]
            for sock in extra:
                answers = replies(read_to_end(sock))
                sock.close()
                assert [r["out"] for r in answers] == ["error"], answers
                assert "too many control clients" in answers[0]["result"]
            for sock in held[:5]:  # the accepted ones are still served
                sock.sendall(protocol.request("ping"))
                sock.shutdown(socket.SHUT_WR)
                assert replies(read_to_end(sock)) == [{"out": "pong", "result": None}]
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: control_connections(server) == 0, what=f"master {server.pid} to close its control clients")
        assert_unharmed(server, workers)

    def test_stats_queries_over_the_limit_are_refused_in_order(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        answers = server.control(*[protocol.request("stats")] * (MAX_QUERIES + 3), protocol.request("ping"))
        assert [r["out"] for r in answers] == ["stats"] * MAX_QUERIES + ["error"] * 3 + ["pong"], answers
        assert f"more than {MAX_QUERIES} stats queries in flight" in answers[MAX_QUERIES]["result"]
        assert_unharmed(server, workers)

    def test_many_pipelined_queries_all_answered_in_order(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        answers = server.control(*[protocol.request("workers"), protocol.request("ping")] * 500)
        assert [r["out"] for r in answers] == ["workers", "pong"] * 500
        assert_unharmed(server, workers)

    def test_accept_pauses_without_spinning_when_out_of_descriptors(self, start_server):
        server = start_server("--workers", "1")
        workers = server.workers()
        master = psutil.Process(server.pid)
        limits = master.rlimit(resource.RLIMIT_NOFILE)
        master.rlimit(resource.RLIMIT_NOFILE, (master.num_fds(), limits[1]))
        clients = []
        try:
            clients = [open_control(server) for _ in range(5)]  # left in the backlog: accept fails with EMFILE
            wait_for(lambda: "cannot accept control clients" in server.stderr(), what="the EMFILE log line")
            cpu_before, started = master_cpu(server), time.monotonic()
            wait_for(lambda: time.monotonic() - started >= 1.5, what="1.5 s at the descriptor limit")
            cpu = master_cpu(server) - cpu_before
            lines = server.stderr().count("cannot accept control clients")
        finally:
            master.rlimit(resource.RLIMIT_NOFILE, limits)
        assert cpu < 0.5, f"master {server.pid} used {cpu:.2f} s of CPU in 1.5 s at its descriptor limit"
        assert lines <= 3, f"{lines} log lines about the paused accept in about 1.5 s"
        for sock in clients:  # the limit is back: the paused accept resumes and serves them
            sock.sendall(protocol.request("ping"))
            sock.shutdown(socket.SHUT_WR)
            assert replies(read_to_end(sock, timeout=10)) == [{"out": "pong", "result": None}]
            sock.close()
        assert_unharmed(server, workers)


def connect_as(uid: int, address: str) -> str:
    """Fork a child that becomes ``uid`` and asks ``address`` for a ping: 'refused', 'answered' or an error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe and never return into pytest
        result = "error"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect("\0" + address[1:])
                try:
                    sock.sendall(protocol.request("ping"))
                    sock.shutdown(socket.SHUT_WR)
                    data = b"".join(iter(lambda: sock.recv(65536), b""))
                except (BrokenPipeError, ConnectionResetError):
                    data = b""
            result = f"{os.getpid()} " + ("answered" if data else "refused")
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = f"{os.getpid()} error {exc!r}"
        finally:
            os.write(write_end, result.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


class TestForeignUser:
    @needs_root
    def test_client_of_another_uid_is_refused_and_logged(self, start_server):
        server = start_server("--workers", "1")
        workers = server.workers()
        child, outcome = connect_as(NOBODY, server.info["control"]).split(" ", 1)
        assert outcome == "refused", f"client pid {child} as uid {NOBODY}: {outcome}"
        wait_for(lambda: f"pid {child} uid {NOBODY}" in server.stderr(),
                 what=f"master {server.pid} to log the refused peer pid {child}")
        assert_unharmed(server, workers)
