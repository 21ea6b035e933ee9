"""The control socket: what it answers, and that a paused worker delays a stats reply but never blocks it."""

from __future__ import annotations

import os
import signal
import time

import psutil
from conftest import wait_for

from fdcluster_server import protocol
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
