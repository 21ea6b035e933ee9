"""Out of descriptors: the master and the workers idle at the limit, survive it, and serve everything after it.

The limit is lowered from outside (psutil's prlimit) to the process's lowest
free descriptor number, so no number stays free below it; clients queue in the
kernel's backlog meanwhile.
"""

from __future__ import annotations

import os
import resource
import signal

import psutil
from conftest import closed_by_peer, connect, wait_for
from probes import IDLE_CPU, cpu_seconds_over, descriptors_exhausted, expect_pongs, send_pings

from fdcluster_server import dispatch, protocol

CLIENTS = 5


class TestMasterAtTheLimit:
    def test_ready_line_reports_the_raised_limit(self, start_server):
        server = start_server("--workers", "1")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert server.info["nofile"] == hard, f"ready line {server.info}: soft limit not raised to the hard {hard}"
        assert psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)[0] == hard

    def test_idles_survives_a_worker_death_and_recovers(self, start_server):
        server = start_server("--workers", "2")
        master = f"master {server.pid}"
        socks = []
        try:
            with descriptors_exhausted(server.pid) as limit:
                socks = send_pings(server.address, CLIENTS)
                wait_for(lambda: "Too many open files" in server.stderr(), what=f"master {server.pid} to hit EMFILE")
                cpu = cpu_seconds_over(server.pid)
                assert cpu < IDLE_CPU, f"{master} at its descriptor limit {limit} used {cpu:.2f} s of CPU in 1 s"
                victim = server.workers()[0]
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: "cannot start" in server.stderr(), what=f"master {server.pid} to fail a respawn")
                assert server.proc.poll() is None, f"{master} died respawning at its limit:\n{server.stderr()}"
                cpu = cpu_seconds_over(server.pid)
                assert cpu < IDLE_CPU, f"master {server.pid} with an empty slot used {cpu:.2f} s of CPU in 1 s"
            expect_pongs(socks, f"master {server.pid}")
            wait_for(lambda: len(server.workers()) == 2 and victim not in server.workers(), timeout=10,
                     what=f"slot of killed worker {victim} to be filled once descriptors are back")
            figures = server.stats()["master"]
            assert figures["spawn_failures"] >= 1 and figures["respawns"] >= 1, figures
        finally:
            for sock in socks:
                sock.close()
        lines = server.stderr().count("cannot accept")
        assert lines <= 10, f"master {server.pid} logged 'cannot accept' {lines} times in a few seconds"


class TestWorkerAtTheLimit:
    def test_shared_accept_worker_idles_and_recovers(self, start_server):
        server = start_server("--workers", "1", "--strategy", "shared-accept")
        (worker,) = server.workers()
        socks = []
        try:
            with descriptors_exhausted(worker) as limit:
                socks = send_pings(server.address, CLIENTS)
                wait_for(lambda: "Too many open files" in server.stderr(), what=f"worker {worker} to hit EMFILE")
                cpu = cpu_seconds_over(worker)
                assert cpu < IDLE_CPU, f"worker {worker} at its descriptor limit {limit} used {cpu:.2f} s of CPU in 1 s"
            expect_pongs(socks, f"worker {worker}")
        finally:
            for sock in socks:
                sock.close()

    def test_handoffs_to_a_full_worker_are_closed_after_the_reject_budget(self, start_server):
        server = start_server("--workers", "1")
        (worker,) = server.workers()
        with descriptors_exhausted(worker):
            with connect(server.address) as sock:
                sock.sendall(protocol.request("ping"))
                assert closed_by_peer(sock) in ("eof", "reset"), f"worker {worker} out of descriptors"
            cpu = cpu_seconds_over(server.pid)
            assert cpu < IDLE_CPU, f"master {server.pid} used {cpu:.2f} s of CPU in 1 s after rejects"
        stats = server.stats()
        assert stats["master"]["rejected_closed"] == 1, stats["master"]
        assert stats["workers"][0]["rejected"] == dispatch.REJECT_BUDGET, stats["workers"][0]
        with connect(server.address) as sock:
            sock.sendall(protocol.request("ping", 0))
            expect_pongs([sock], f"worker {worker} after its limit was restored")
