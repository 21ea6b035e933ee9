"""Hostile clients of the master's control socket: bombs, slow readers, floods, disconnects, foreign users.

Every test runs a real server and attacks its control socket from outside,
then checks that the master is the same process, its workers the same pids,
and that it still answers a control query and a TCP client.  One client's
frame, pace or number must never stop the master serving everyone else.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from typing import List

import psutil
import pytest
from conftest import Server, call, connect, wait_for

from fdcluster_server import protocol
from fdcluster_server.control import MAX_REQUEST, STATS_TIMEOUT


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
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
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


class TestDisconnectsMidQuery:
    def test_client_gone_while_stats_wait_for_a_paused_worker(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        os.kill(workers[0], signal.SIGSTOP)
        try:
            with open_control(server) as sock:
                sock.sendall(protocol.request("stats") * 2)
                wait_for(lambda: control_connections(server) == 1, what=f"master {server.pid} to accept the client")
            # This query expires after the two above, so once it is answered they have been.
            stats = server.stats()
        finally:
            os.kill(workers[0], signal.SIGCONT)
        assert [w["reported"] for w in stats["workers"]] == [False, True], stats["workers"]
        assert_unharmed(server, workers)

    def test_half_closed_client_gets_every_stats_reply_after_the_timeout(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        os.kill(workers[1], signal.SIGSTOP)
        try:
            with open_control(server) as sock:
                sock.sendall(protocol.request("stats") * 2)
                sock.shutdown(socket.SHUT_WR)
                answers = replies(read_to_end(sock, timeout=STATS_TIMEOUT + 5))
        finally:
            os.kill(workers[1], signal.SIGCONT)
        assert [r["out"] for r in answers] == ["stats", "stats"], answers
        assert_unharmed(server, workers)

    def test_many_clients_gone_mid_query(self, start_server):
        server = start_server("--workers", "2")
        workers = server.workers()
        os.kill(workers[0], signal.SIGSTOP)
        try:
            for _ in range(10):
                with open_control(server) as sock:
                    sock.sendall(protocol.request("stats") * 4 + protocol.request("workers"))
            stats = server.stats()
        finally:
            os.kill(workers[0], signal.SIGCONT)
        assert stats["master"]["pid"] == server.pid
        assert_unharmed(server, workers)
