"""Hostile clients against real server processes: no frame, socket or stop may hurt anyone else.

Each test fails on a worker without the matching guard: a frame that killed a
worker, a connection that was never closed, memory that grew with what a client
sent, an answer lost to an RST during a graceful stop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Tuple

import psutil
import pytest
from conftest import call, closed_by_peer, connect, recv_frame, wait_for

from fdcluster_server import protocol
from fdcluster_server.__main__ import parse_config

HANDLERS = ("--handlers", "handlers_for_tests", "--handlers", "hostile_handlers")
ZERO_FRAMES = b"\0\0\0\0" * 16384  # 64 KiB of empty frames: each answered by a ~45-byte error frame


def only_worker(server) -> int:
    workers = server.workers()
    assert len(workers) == 1, f"expected one worker under master {server.pid}, found {workers}"
    return workers[0]


def assert_worker_lived(server, pid: int, what: str) -> None:
    workers = server.workers()
    assert workers == [pid], f"worker {pid} did not survive {what}: workers now {workers}\n{server.stderr()}"


def send_until_full(sock: socket.socket, data: bytes) -> int:
    """Send what a non-blocking socket takes of ``data`` until the kernel's buffers are full; return the count."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            break
    return sent


def worker_stats(server) -> dict:
    (entry,) = server.stats()["workers"]
    return entry


def read_frames_until_eof(sock: socket.socket, timeout: float) -> Tuple[list, str]:
    """Every frame the server sends, then how it ended the connection ('eof' or 'reset')."""
    decoder = protocol.FrameDecoder(max_frame=1 << 30)
    frames = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return frames, "reset"
        if not data:
            return frames, "eof"
        frames += [json.loads(body) for body in decoder.feed(data)]
    raise AssertionError(f"no EOF from the server within {timeout} s; {len(frames)} frames read")


class TestOneFrameCannotKillAWorker:
    HOSTILE = [
        (b"[" * 1024, "nested too deeply"),
        (b'{"in": "ping", "params": ' + b"[" * 50000 + b"]" * 50000 + b"}", "nested too deeply"),
        (b'{"in": "ping", "params": 1e999999}', "out of range"),
        (b'{"in": "ping", "params": NaN}', "NaN is not a JSON value"),
        (b'{"in": "ping", "params": [-Infinity]}', "-Infinity is not a JSON value"),
        (b'{"in": "ping", "params": ' + b"7" * 5000 + b"}", "4300"),
        (b"\xed\xa0\x80", "invalid UTF-8"),
        (b"\xef\xbb\xbf{}", "malformed JSON"),
    ]

    def test_hostile_bodies_get_error_frames_on_a_usable_connection(self, start_server):
        server = start_server("--workers", "1")
        pid = only_worker(server)
        with connect(server.address) as sock:
            for body, reason in self.HOSTILE:
                sock.sendall(protocol.encode_body(body))
                try:
                    reply = recv_frame(sock)
                except (EOFError, ConnectionResetError):
                    pytest.fail(f"worker {pid} closed the connection on body {body[:40]!r}...\n{server.stderr()}")
                assert reply["out"] == "error" and reason in reply["result"], f"body {body[:40]!r}: {reply}"
                assert call(sock, "ping", "after")["result"] == "after", f"connection unusable after {body[:40]!r}"
        assert_worker_lived(server, pid, "hostile bodies")

    def test_lone_surrogate_is_echoed_in_the_escaped_form_it_came_in(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            sock.sendall(protocol.encode_body(b'{"in": "ping", "params": "a\\ud800b"}'))
            frame = sock.recv(65536)
            assert frame[4:] == b'{"out":"pong","result":"a\\ud800b"}'
            assert call(sock, "ping", 1)["result"] == 1

    def test_duplicate_keys_last_one_wins(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            sock.sendall(protocol.encode_body(b'{"in": "nope", "in": "ping", "params": 1, "params": 2}'))
            assert recv_frame(sock) == {"out": "pong", "result": 2}

    def test_huge_integer_costs_nothing_even_with_the_interpreter_limit_off(self, start_server):
        server = start_server("--workers", "1", env={"PYTHONINTMAXSTRDIGITS": "0"})
        with connect(server.address) as sock:
            sock.sendall(protocol.encode_body(b'{"in": "ping", "params": ' + b"9" * 1_000_000 + b"}"))
            sock.settimeout(3.0)  # int() of a million digits takes seconds of CPU
            reply = recv_frame(sock)
            assert reply["out"] == "error" and "exceeds the limit of 4300" in reply["result"], reply

    @pytest.mark.parametrize(
        "method, params, reason",
        [
            ("boom", "\ud800", "handler 'boom' raised ValueError: boom \ud800"),  # a lone surrogate in the message
            ("raise_surrogate", None, "raised ValueError: a lone \ud800 in the message"),
            ("raise_unprintable", None, "raised Unprintable: <its message cannot be printed>"),
            ("return_nan", None, "returned what JSON cannot carry: ValueError"),
            ("return_set", None, "returned what JSON cannot carry: TypeError"),
            ("return_deep", None, "returned what JSON cannot carry: RecursionError"),
        ],
    )
    def test_handler_failure_always_makes_an_error_frame(self, start_server, method, params, reason):
        server = start_server("--workers", "1", *HANDLERS)
        pid = only_worker(server)
        with connect(server.address) as sock:
            try:
                reply = call(sock, method, params)
            except (EOFError, ConnectionResetError):
                pytest.fail(f"worker {pid} dropped the connection on {method}({params!r})\n{server.stderr()}")
            assert reply["out"] == "error" and reason in reply["result"], reply
            assert call(sock, "ping", 1)["result"] == 1
        assert_worker_lived(server, pid, f"{method}({params!r})")


class TestTimeouts:
    def test_idle_keepalive_connection_is_closed_with_a_fin(self, start_server):
        server = start_server("--workers", "1", "--keepalive-timeout", "0.3")
        with connect(server.address) as busy, connect(server.address) as idle:
            assert call(idle, "ping", 1)["result"] == 1
            started = time.monotonic()
            # The busy connection keeps asking for longer than the timeout; it must stay open.
            while time.monotonic() - started < 0.6:
                assert call(busy, "ping", "busy")["result"] == "busy"
            assert closed_by_peer(idle) == "eof", "the idle connection gets a FIN, not an RST"
            assert call(busy, "ping", "still")["result"] == "still"
        assert worker_stats(server)["timeouts"] >= 1

    def test_keepalive_and_write_timeouts_accept_zero_for_never(self):
        config, _ = parse_config(["--keepalive-timeout", "0", "--write-timeout", "0"])
        assert (config.keepalive_timeout, config.write_timeout) == (0, 0)
        assert parse_config([])[0].keepalive_timeout == 60.0 and parse_config([])[0].write_timeout == 30.0

    def test_client_that_never_reads_is_closed_after_the_write_timeout(self, start_server):
        server = start_server("--workers", "1", "--write-timeout", "0.5")
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            hog.connect(server.address)
            assert call(hog, "ping", 0)["result"] == 0  # held by a worker from here on
            stream = protocol.request("ping", "y" * 100_000) * 100  # ~10 MB of answers asked for, none read
            hog.setblocking(False)
            send_until_full(hog, stream)
            wait_for(lambda: server.owner(hog) is None, timeout=10.0,
                     what=f"worker {only_worker(server)} to close {hog.getsockname()}, a client that never reads")
            assert worker_stats(server)["timeouts"] >= 1
        finally:
            hog.close()

    def test_timeout_error_frame_queues_behind_a_half_sent_answer(self, start_server):
        server = start_server("--workers", "1", "--idle-timeout", "0.3", "--max-frame", str(8 << 20))
        # Loopback takes ~2.8 MB into the kernel; the rest stays in the worker, below its 4 MiB high-water
        # mark, so the connection is still read and its incomplete second frame times out mid-answer.
        payload = "z" * (4 << 20)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with client:
            client.connect(server.address)
            client.sendall(protocol.request("ping", payload) + protocol.request("ping")[:5])
            wait_for(lambda: worker_stats(server).get("timeouts", 0) >= 1, timeout=10.0,
                     what="the incomplete second frame to time out")
            if worker_stats(server).get("buffered") == 0:
                pytest.skip("this kernel's socket buffers took the whole answer: nothing was half-sent")
            frames, ending = read_frames_until_eof(client, timeout=10.0)
        assert [f["out"] for f in frames] == ["pong", "error"], "the whole answer, then the timeout's error frame"
        assert frames[0]["result"] == payload
        assert "incomplete frame timed out" in frames[1]["result"]
        assert ending == "eof"


class TestMemory:
    def test_worker_output_budget_bounds_memory_against_clients_that_never_read(self, start_server):
        server = start_server("--workers", "1", "--max-output-per-worker", str(4 << 20))
        pid = only_worker(server)
        with connect(server.address) as probe:
            assert call(probe, "ping", 0)["result"] == 0
        worker = psutil.Process(pid)
        rss_before = worker.memory_info().rss
        hogs = []
        sent = 0
        try:
            for _ in range(16):
                hog = socket.socket()
                hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                hog.connect(server.address)
                hog.setblocking(False)
                hogs.append(hog)
            for hog in hogs:  # at most 2 MiB each: ~24 MiB of error frames asked for per connection
                sent += send_until_full(hog, ZERO_FRAMES * 32)
            settled = _wait_until_requests_settle(server)
            grown = worker.memory_info().rss - rss_before
            asked = sent // 4 * 45
            assert grown < 24 << 20, (f"worker {pid} grew {grown >> 20} MiB of RSS for {asked >> 20} MiB of answers "
                                      f"asked by 16 clients that never read ({settled} requests answered)")
            buffered = worker_stats(server)["buffered"]
            assert buffered <= (4 << 20) + (1 << 20), f"worker {pid} buffers {buffered} bytes, over its 4 MiB budget"
        finally:
            for hog in hogs:
                hog.close()
        with connect(server.address) as after:  # closed connections free the budget; the worker reads again
            assert call(after, "ping", "after")["result"] == "after"
        assert_worker_lived(server, pid, "16 clients that never read")

    def test_high_water_holds_input_back_and_serves_it_when_the_client_reads(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            count = 16384 * 8  # 512 KiB in, ~5.9 MB of error frames out: past the 4 MiB high-water mark
            sender = threading.Thread(target=sock.sendall, args=(ZERO_FRAMES * 8 + protocol.request("ping", "last"),))
            sender.start()
            decoder = protocol.FrameDecoder()
            frames = 0
            last = None
            deadline = time.monotonic() + 30
            while frames < count + 1 and time.monotonic() < deadline:
                for body in decoder.feed(sock.recv(1 << 20)):
                    frames += 1
                    last = body
            sender.join(10)
            assert frames == count + 1, f"{frames} of {count + 1} answers"
            assert json.loads(last) == {"out": "pong", "result": "last"}


def _wait_until_requests_settle(server, quiet: float = 0.5, timeout: float = 30.0) -> int:
    """Poll the worker's request counter until it stops moving for ``quiet`` seconds; return it."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        requests = worker_stats(server).get("requests")  # missing while the worker is too busy to report
        if requests is None or requests != last:
            last, since = requests, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return requests
        time.sleep(0.05)
    raise AssertionError(f"the worker kept answering for {timeout} s ({last} requests)")


class TestConnectionCap:
    def test_worker_at_its_cap_rejects_handoffs_until_a_connection_closes(self, start_server):
        server = start_server("--workers", "1", "--max-connections-per-worker", "2")
        first, second = connect(server.address), connect(server.address)
        waiting = connect(server.address)
        try:
            assert call(first, "ping", 1)["result"] == 1 and call(second, "ping", 2)["result"] == 2
            waiting.sendall(protocol.request("ping", 3))
            wait_for(lambda: worker_stats(server)["rejected"] >= 1, what="the worker at its cap to reject a handoff")
            waiting.setblocking(False)
            with pytest.raises(BlockingIOError):
                waiting.recv(1)  # not served while the worker is full
            waiting.setblocking(True)
            first.close()
            assert recv_frame(waiting) == {"out": "pong", "result": 3}, "served once a slot freed"
            assert worker_stats(server)["active"] == 2
        finally:
            for sock in (first, second, waiting):
                sock.close()


class TestGracefulStop:
    def test_request_in_the_kernel_queue_at_sigterm_is_answered_then_fin(self, start_server):
        server = start_server("--workers", "1")
        pid = only_worker(server)
        with connect(server.address) as sock:
            assert call(sock, "ping", 1)["result"] == 1
            os.kill(pid, signal.SIGSTOP)
            try:
                sock.sendall(protocol.request("ping", 2))
                os.kill(pid, signal.SIGTERM)
            finally:
                os.kill(pid, signal.SIGCONT)
            frames, ending = read_frames_until_eof(sock, timeout=10.0)
        assert frames == [{"out": "pong", "result": 2}] and ending == "eof"
        _wait_for_exit_line(server, pid)

    def test_requests_held_back_past_the_high_water_mark_are_answered_before_the_fin(self, start_server):
        server = start_server("--workers", "1")
        pid = only_worker(server)
        with connect(server.address) as sock:
            assert call(sock, "ping", 1)["result"] == 1
            count = 16384 * 8  # ~5.9 MB of answers: the worker stops reading at 4 MiB, the rest stays queued
            sender = threading.Thread(target=sock.sendall, args=(ZERO_FRAMES * 8 + protocol.request("ping", "last"),),
                                      daemon=True)
            os.kill(pid, signal.SIGSTOP)
            try:
                sender.start()
                wait_for(lambda: _queued_to(server, sock) > 0, what=f"bytes queued to frozen worker {pid}")
                os.kill(pid, signal.SIGTERM)
            finally:
                os.kill(pid, signal.SIGCONT)
            frames, ending = read_frames_until_eof(sock, timeout=30.0)
            sender.join(10)
        assert len(frames) == count + 1, f"{len(frames)} of {count + 1} answers before the worker closed ({ending})"
        assert frames[-1] == {"out": "pong", "result": "last"}
        assert ending == "eof", "a FIN after the last answer, not an RST"
        _wait_for_exit_line(server, pid)


def _queued_to(server, sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its server side has not read (the worker's receive queue), from /proc."""
    host, port = sock.getsockname()
    local = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[2] == local:  # the server side: its remote address is our local one
                return int(fields[4].split(":")[1], 16)
    return 0


def _wait_for_exit_line(server, pid: int) -> None:
    wait_for(lambda: any(f"pid {pid}) exited with code 0" in line for line in server.stderr().splitlines()),
             timeout=10.0, what=f"the master to log worker {pid}'s exit with code 0")
