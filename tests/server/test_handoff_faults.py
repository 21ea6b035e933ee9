"""Handoffs that cannot complete: a frozen worker, a worker stuck in a handler; the master idles and requeues."""

from __future__ import annotations

import os
import signal

from conftest import closed_by_peer, connect, recv_frame, wait_for
from probes import IDLE_CPU, answered, cpu_seconds_over, expect_pongs, send_pings

from fdcluster_server import protocol


class TestFrozenWorker:
    def test_master_idles_while_a_full_worker_keeps_clients_pending_also_while_stopping(self, start_server):
        server = start_server("--workers", "1", "--handoff-window", "2", "--graceful-timeout", "30")
        (frozen,) = server.workers()
        os.kill(frozen, signal.SIGSTOP)
        socks = []
        try:
            socks = send_pings(server.address, 4)
            wait_for(lambda: server.stats()["master"]["pending"] == 2, timeout=10,
                     what=f"2 clients pending behind frozen worker {frozen}'s full window")
            cpu = cpu_seconds_over(server.pid)
            assert cpu < IDLE_CPU, f"master {server.pid} used {cpu:.2f} s of CPU in 1 s waiting on frozen {frozen}"
            server.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining" in server.stderr(), what=f"master {server.pid} to start its graceful stop")
            cpu = cpu_seconds_over(server.pid)
            assert cpu < IDLE_CPU, f"master {server.pid} used {cpu:.2f} s of CPU in 1 s draining to frozen {frozen}"
        finally:
            os.kill(frozen, signal.SIGCONT)
        expect_pongs(socks, f"resumed worker {frozen}")
        for sock in socks:
            sock.close()
        assert server.proc.wait(15) == 0

    def test_client_turned_away_by_a_full_channel_goes_to_another_worker_at_once(self, start_server):
        # A frozen worker's channel holds a few hundred handoffs (its socket buffer), far below this window.
        server = start_server("--workers", "2", "--handoff-window", "100000")
        frozen = server.workers()[0]
        os.kill(frozen, signal.SIGSTOP)
        socks = []
        try:
            socks = send_pings(server.address, 1200)
            wait_for(lambda: answered(socks[-1:]), what="the burst's last client to be served")
            unanswered = len(socks) - len(answered(socks, 0.5))
            assert unanswered < len(socks) // 2, f"only {unanswered} clients wait: the channel never filled"
            # One at a time now: when a client's turn falls on the full channel, no later event would retry it.
            for i in range(len(socks), len(socks) + 4):
                socks += send_pings(server.address, 1, first=i)
                wait_for(lambda last=socks[-1]: answered([last]), what=(
                    f"client {i}, turned away by frozen worker {frozen}'s full channel, to be served by the other"))
        finally:
            os.kill(frozen, signal.SIGCONT)
        expect_pongs(socks, f"frozen then resumed worker {frozen} or the other")
        for sock in socks:
            sock.close()


class TestHeartbeat:
    def test_worker_stuck_in_a_handler_is_killed_and_its_handoffs_served_elsewhere(self, start_server, tmp_path):
        server = start_server("--workers", "1", "--heartbeat-timeout", "1", "--handlers", "handlers_for_tests")
        (stuck,) = server.workers()
        marker = tmp_path / "stuck"
        with connect(server.address, timeout=15) as hung:
            hung.sendall(protocol.request("hang", str(marker)))
            wait_for(marker.exists, what=f"worker {stuck} to be stuck in the handler")
            waiting = connect(server.address, timeout=15)  # handed to the stuck worker, never acknowledged
            waiting.sendall(protocol.request("ping", "after the watchdog"))
            assert closed_by_peer(hung) in ("eof", "reset"), f"client of stuck worker {stuck}"
            with waiting:
                assert recv_frame(waiting) == {"out": "pong", "result": "after the watchdog"}, (
                    f"the client behind stuck worker {stuck} was not served by its replacement")
        assert f"(pid {stuck}): no heartbeat" in server.stderr()
        wait_for(lambda: server.workers() and stuck not in server.workers(), what=f"a replacement for {stuck}")
        assert server.stats()["master"]["heartbeat_kills"] == 1

    def test_idle_workers_are_not_killed(self, start_server):
        server = start_server("--workers", "2", "--heartbeat-timeout", "0.5")
        workers = server.workers()
        cpu_seconds_over(server.pid, 1.5)  # three timeouts of idleness
        assert server.workers() == workers and "no heartbeat" not in server.stderr(), server.stderr()
