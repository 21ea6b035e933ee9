"""The control socket: what it answers, its address, and that a paused worker delays a stats reply but never blocks it.

``TestInProcess`` drives a ``ControlServer`` with a fake master over real
sockets, for what needs a timer shortened or a bug injected.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Set

import psutil
import pytest
from conftest import wait_for

from fdcluster_server import control, protocol
from fdcluster_server.control import STATS_TIMEOUT


class TestMethods:
    def test_workers_ping_and_errors_answered_in_order(self, start_server):
        server = start_server("--workers", "2")
        replies = server.control(protocol.request("workers"), protocol.request("ping"),
                                 protocol.request("reboot"), protocol.encode_body(b"{not json"))
        assert [r["out"] for r in replies] == ["workers", "pong", "error", "error"], replies
        table = replies[0]["result"]
        assert [w["index"] for w in table] == [0, 1]
        assert sorted(w["pid"] for w in table) == server.workers()
        assert "unknown control method 'reboot'" in replies[2]["result"]

    def test_stats_names_every_worker_slot(self, start_server):
        server = start_server("--workers", "3")
        stats = server.stats()
        assert stats["master"]["pid"] == server.pid and stats["master"]["stopping"] is None
        assert [w["index"] for w in stats["workers"]] == [0, 1, 2]
        assert all(w["reported"] and w["respawns"] == 0 for w in stats["workers"]), stats["workers"]


class TestPausedWorker:
    def test_stats_answered_after_the_timeout_without_the_paused_worker(self, start_server):
        server = start_server("--workers", "2")
        paused = server.workers()[0]
        os.kill(paused, signal.SIGSTOP)
        try:
            wait_for(lambda: psutil.Process(paused).status() == psutil.STATUS_STOPPED, what=f"worker {paused} stopped")
            started = time.monotonic()
            stats = server.stats()
            waited = time.monotonic() - started
        finally:
            os.kill(paused, signal.SIGCONT)
        reported = {w["pid"]: w["reported"] for w in stats["workers"]}
        assert reported[paused] is False, f"paused worker {paused} reported counters: {stats['workers']}"
        assert [r for pid, r in reported.items() if pid != paused] == [True], reported
        assert waited >= STATS_TIMEOUT * 0.9, f"stats answered after {waited:.2f} s, before the timeout"


class TestAddress:
    def test_default_address_is_abstract_and_unguessable(self, start_server):
        server = start_server("--workers", "1")
        address = server.info["control"]
        assert re.fullmatch(rf"@fdcluster-{server.pid}-[0-9a-f]{{16}}", address), address
        assert server.control(protocol.request("ping")) == [{"out": "pong", "result": None}]

    def test_address_in_use_is_a_one_line_start_up_error(self):
        address = f"@fdcluster-test-{secrets.token_hex(8)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as taken:
            taken.bind("\0" + address[1:])
            result = subprocess.run([sys.executable, "-m", "fdcluster_server", "--workers", "1", "--control", address],
                                    capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        assert result.returncode == 1, result.stderr
        assert f"cannot open control socket {address}: Address already in use" in result.stderr
        assert "Traceback" not in result.stderr, result.stderr

    def test_socket_file_is_private_to_the_owner(self, start_server, tmp_path):
        path = tmp_path / "control.sock"
        server = start_server("--workers", "1", "--control", str(path))
        assert server.info["control"] == str(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"control socket {path} has mode {mode:o}: others may connect"


class FakeSource:
    """A master with one worker (index 0) that never answers a stats query."""

    def request_counters(self, query_id: int) -> Set[int]:
        return {0}

    def stats(self, counters: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        return {"workers": sorted(counters)}

    def worker_table(self) -> List[Dict[str, int]]:
        return [{"index": 0, "pid": 1}]


class InProcess:
    """A ControlServer on a private abstract address, served by ``pump`` as the master's loop would."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.server = control.ControlServer(self.selector, FakeSource())
        self.server.open(f"@fdcluster-test-{secrets.token_hex(8)}", os.getpid())

    def connect(self) -> socket.socket:
        assert self.server.address is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect("\0" + self.server.address[1:])
        sock.setblocking(False)
        return sock

    def pump(self, until: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        """Run the selector as the master does until ``until()``; any exception escapes, as it would the master's."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"in-process control server: timed out waiting for {what}"
            for key, mask in self.selector.select(0.02):
                key.data(mask)
            self.server.expire_queries()

    def close(self) -> None:
        self.server.close()
        self.selector.close()


@pytest.fixture
def in_process():
    harness = InProcess()
    yield harness
    harness.close()


def received(sock: socket.socket, into: bytearray) -> bool:
    """Read what has arrived into ``into``; True once the peer has closed."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    into += data
    return not data


class TestInProcess:
    def test_any_exception_from_a_frame_closes_only_that_client(self, in_process, monkeypatch, caplog):
        parse = protocol.parse_request

        def buggy(body: bytes):
            if b"boom" in body:
                raise RuntimeError("a future decoder bug")
            return parse(body)

        monkeypatch.setattr(control.protocol, "parse_request", buggy)
        bomber, bystander = in_process.connect(), in_process.connect()
        bomber.sendall(protocol.request("boom"))
        out = bytearray()
        in_process.pump(lambda: received(bomber, out), what="the master to close the client whose frame raised")
        assert [json.loads(b)["out"] for b in protocol.FrameDecoder().feed(bytes(out))] == ["error"]
        assert "RuntimeError: a future decoder bug" in caplog.text
        bystander.sendall(protocol.request("ping"))
        bystander.shutdown(socket.SHUT_WR)
        out = bytearray()
        in_process.pump(lambda: received(bystander, out), what="the bystander's pong")
        assert protocol.FrameDecoder().feed(bytes(out)) == [b'{"out":"pong","result":null}']
        bomber.close()
        bystander.close()

    def test_two_queries_of_a_gone_client_expiring_in_one_turn(self, in_process, monkeypatch):
        monkeypatch.setattr(control, "STATS_TIMEOUT", 0.2)
        gone, waiting = in_process.connect(), in_process.connect()
        gone.sendall(protocol.request("stats") * 2)
        in_process.pump(lambda: len(in_process.server.queries) == 2, what="two queries from one client")
        gone.close()  # its first reply fails, which closes it and drops its second query
        waiting.sendall(protocol.request("stats"))
        waiting.shutdown(socket.SHUT_WR)
        out = bytearray()
        in_process.pump(lambda: received(waiting, out), what="the other client's stats reply")
        assert protocol.FrameDecoder().feed(bytes(out)) == [b'{"out":"stats","result":{"workers":[]}}']
        assert in_process.server.queries == {}
        waiting.close()

    def test_idle_client_is_closed(self, in_process, monkeypatch):
        monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.2)
        idle = in_process.connect()
        started = time.monotonic()
        in_process.pump(lambda: received(idle, bytearray()), what="the master to close an idle control client")
        assert time.monotonic() - started >= 0.2
        idle.close()
