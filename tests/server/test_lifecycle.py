"""Respawn back-off for any stream of deaths, signals around fork, SIGHUP."""

from __future__ import annotations

import os
import signal
import time

import psutil
from conftest import call, closed_by_peer, connect, recv_frame, wait_for

from fdcluster_server import protocol

SLOW_START = 0.5  # slow_worker_start.START_DELAY


def new_worker(server, old):
    (pid,) = wait_for(lambda: [p for p in server.workers() if p != old], timeout=10, what=f"a replacement for {old}")
    return pid


class TestRespawnBackoff:
    def test_deaths_after_the_first_second_back_off_too(self, start_server):
        server = start_server("--workers", "1")
        worker = server.workers()[0]
        gaps = []
        for _ in range(4):
            # Older than one second: the age the old rule took for a healthy worker.
            wait_for(lambda w=worker: time.time() - psutil.Process(w).create_time() > 1.2, what=f"{worker} aged 1.2 s")
            killed = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            worker = new_worker(server, worker)
            gaps.append(time.monotonic() - killed)
        assert "4 deaths in a row" in server.stderr(), server.stderr()
        assert gaps[-1] >= 0.5, f"the 4th death in 5 s was respawned after {gaps[-1]:.2f} s: no back-off ({gaps})"
        with connect(server.address) as sock:
            assert call(sock, "ping")["out"] == "pong"


class TestSignals:
    def test_sigterm_to_a_worker_still_starting_is_not_lost(self, start_server):
        server = start_server("--workers", "1", "--handlers", "slow_worker_start")
        old = server.workers()[0]
        os.kill(old, signal.SIGKILL)
        starting = new_worker(server, old)
        os.kill(starting, signal.SIGTERM)  # within SLOW_START of its fork: its handlers are not installed yet
        wait_for(lambda: f"(pid {starting}) exited with code 0" in server.stderr(), timeout=5 + SLOW_START,
                 what=f"worker {starting}, sent SIGTERM while starting, to drain and exit 0")

    def test_sighup_stops_gracefully(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as client:
            call(client, "ping")  # held by the worker from now on
            frame = protocol.request("ping", "in flight")
            client.sendall(frame[:7])
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: f"master {server.pid}: SIGHUP, draining" in server.stderr(), what="a graceful stop")
            client.sendall(frame[7:])
            assert recv_frame(client) == {"out": "pong", "result": "in flight"}, "SIGHUP dropped a request in flight"
            assert closed_by_peer(client) == "eof"
        assert server.proc.wait(10) == 0, f"master {server.pid} after SIGHUP"
