"""Worker deaths, respawns and shutdown: the master survives and loses no connection."""

from __future__ import annotations

import os
import signal
import socket
import threading

import psutil
import pytest
from conftest import call, closed_by_peer, connect, recv_frame, wait_for

from fdcluster_server import protocol, signals
from fdcluster_server.master import HANDLED_SIGNALS, Master


def gone(pids):
    """True once none of ``pids`` runs (zombies waiting for a reaper count as gone)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


class TestWorkerDeath:
    def test_sigkill_under_load_master_lives_and_replacement_appears(self, start_server):
        server = start_server("--workers", "3")
        victim = server.workers()[0]
        stop = threading.Event()
        errors, served = [], []

        def client_loop(sock):
            owner = server.owner(sock)
            try:
                for i in range(100000):  # bounded; stops on the event
                    if stop.is_set():
                        return
                    call(sock, "ping", i)
                    served.append(owner)
            except (OSError, EOFError) as exc:
                errors.append((owner, exc))

        socks = [connect(server.address) for _ in range(6)]
        for sock in socks:
            call(sock, "ping")
        threads = [threading.Thread(target=client_loop, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(served) > 100, what="load to start")
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: victim not in server.workers() and len(server.workers()) == 3, what="a replacement worker")
            before = len(served)
            wait_for(lambda: len(served) > before + 100, what="the surviving clients to keep being served")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for s in socks:
                s.close()
        assert server.proc.poll() is None, "the master died"
        assert all(owner == victim for owner, _ in errors), f"clients of live workers failed: {errors}"
        assert server.stats()["master"]["respawns"] == 1

    def test_frozen_worker_killed_before_acknowledging_loses_nothing(self, start_server):
        server = start_server("--workers", "2", "--handoff-window", "4")
        frozen = server.workers()[0]
        os.kill(frozen, signal.SIGSTOP)
        socks = []
        try:
            for i in range(8):
                sock = connect(server.address)
                sock.sendall(protocol.request("ping", i))
                socks.append(sock)

            def unacked_on_frozen():
                return sum(w.get("unacked", 0) for w in server.stats()["workers"] if w["pid"] == frozen)

            wait_for(lambda: unacked_on_frozen() == 4, what="4 unacknowledged handoffs to the frozen worker")
            os.kill(frozen, signal.SIGKILL)
            for i, sock in enumerate(socks):
                assert recv_frame(sock) == {"out": "pong", "result": i}, f"client {i} lost"
            assert server.stats()["master"]["redistributed"] == 4
        finally:
            for s in socks:
                s.close()

    def test_client_of_killed_worker_sees_eof_or_reset(self, start_server):
        server = start_server("--workers", "2")
        with connect(server.address) as sock:
            call(sock, "ping")
            owner = wait_for(lambda: server.owner(sock), what="the socket's owner")
            os.kill(owner, signal.SIGKILL)
            assert closed_by_peer(sock) in ("eof", "reset")

    def test_crashing_worker_is_reaped_and_respawned(self, start_server):
        server = start_server("--workers", "1", "--handlers", "handlers_for_tests")
        for _ in range(3):
            before = server.workers()
            with connect(server.address) as sock:
                sock.sendall(protocol.request("die"))
                assert closed_by_peer(sock) in ("eof", "reset")
            wait_for(lambda before=before: server.workers() and server.workers() != before, timeout=10, what="respawn")
            assert server.zombies() == []
        assert "exited with code 7" in server.stderr()
        with connect(server.address) as sock:
            assert call(sock, "ping")["out"] == "pong"

    def test_master_keeps_no_channel_of_a_dead_worker(self, start_server):
        server = start_server("--workers", "2")
        unix_before = len([c for c in psutil.Process(server.pid).net_connections("unix")])
        os.kill(server.workers()[0], signal.SIGKILL)
        wait_for(lambda: server.stats()["master"]["respawns"] == 1 and len(server.workers()) == 2, what="respawn")
        unix_after = len([c for c in psutil.Process(server.pid).net_connections("unix")])
        assert unix_after == unix_before


class TestSignals:
    def test_every_signal_the_master_queues_has_its_handler(self):
        names = [signals.handler_name(signum) for signum in HANDLED_SIGNALS]
        missing = [name for name in names if not callable(getattr(Master, name, None))]
        assert missing == [], f"the master queues signals it has no handle_<name> method for: {missing}"


class TestShutdown:
    def test_master_sigkill_leaves_no_worker(self, start_server):
        server = start_server("--workers", "3")
        workers = server.workers()
        os.kill(server.pid, signal.SIGKILL)
        wait_for(lambda: gone(workers), timeout=2.0, what=f"workers {workers} to die with their master")

    def test_sigterm_drains_in_flight_requests_and_exits_0(self, start_server):
        server = start_server("--workers", "2")
        with connect(server.address) as busy, connect(server.address) as idle:
            call(idle, "ping")
            frame = protocol.request("ping", "in flight")
            busy.sendall(frame[:7])
            wait_for(lambda: sum(w["active"] for w in server.stats()["workers"]) == 2, what="both connections held")
            server.proc.send_signal(signal.SIGTERM)
            assert closed_by_peer(idle) == "eof"  # idle keep-alive closed at once
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(server.address, timeout=2).close()
            busy.sendall(frame[7:])
            assert recv_frame(busy) == {"out": "pong", "result": "in flight"}
            assert closed_by_peer(busy) == "eof"
        assert server.proc.wait(10) == 0

    def test_sigterm_kills_stragglers_after_grace(self, start_server):
        server = start_server("--workers", "1", "--graceful-timeout", "0.5")
        with connect(server.address) as stuck:
            stuck.sendall(protocol.request("ping")[:3])  # never completed
            wait_for(lambda: server.stats()["workers"][0]["active"] == 1, what="connection held")
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(10) == 0
            assert closed_by_peer(stuck) in ("eof", "reset")
        assert "still running after the grace period" in server.stderr()

    @pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
    def test_sigint_and_sigquit_stop_fast(self, start_server, signum):
        server = start_server("--workers", "2")
        workers = server.workers()
        with connect(server.address) as sock:
            call(sock, "ping")
            server.proc.send_signal(signum)
            assert server.proc.wait(10) == 0
            assert closed_by_peer(sock) in ("eof", "reset")
        wait_for(lambda: gone(workers), what=f"workers {workers} to exit")
        assert f"master {server.pid}: fast stop" in server.stderr(), f"{signum.name} did not take the fast path"
