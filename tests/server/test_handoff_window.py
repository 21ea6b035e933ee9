"""A wide handoff window, from outside: many sockets in a worker's channel, acknowledged a turn's worth at a time.

What must hold however many handoffs wait unacknowledged: no accepted client
is lost when its worker dies before acknowledging, the master keeps nothing
once a storm is served (closes riding on acknowledgements, not CLOSED records,
under round-robin), and a worker short of descriptors serves those that fit.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil
from conftest import closed_by_peer, wait_for
from probes import descriptors_exhausted, expect_pongs, send_pings

from fdcluster_server import dispatch

WINDOW = 16


def master_tcp_sockets(pid: int) -> list:
    """The master's TCP sockets other than its listener: client copies it still holds."""
    return [c for c in psutil.Process(pid).net_connections("tcp") if c.status != psutil.CONN_LISTEN]


class TestWideWindow:
    def test_a_frozen_workers_unacknowledged_handoffs_go_to_its_replacement(self, start_server):
        server = start_server("--workers", "1", "--handoff-window", str(WINDOW))
        (frozen,) = server.workers()
        os.kill(frozen, signal.SIGSTOP)
        socks = []
        try:
            socks = send_pings(server.address, WINDOW)
            wait_for(lambda: server.stats()["workers"][0].get("unacked") == WINDOW, timeout=10,
                     what=f"{WINDOW} handoffs in frozen worker {frozen}'s channel, unacknowledged")
            os.kill(frozen, signal.SIGKILL)
            expect_pongs(socks, f"the replacement of worker {frozen}, killed before acknowledging")
            assert server.stats()["master"]["redistributed"] == WINDOW
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
            for sock in socks:
                sock.close()

    def test_a_storm_is_served_and_the_master_keeps_no_client(self, start_server):
        server = start_server("--workers", "2", "--handoff-window", str(WINDOW))
        socks = send_pings(server.address, 300)
        try:
            expect_pongs(socks, f"2 workers with a window of {WINDOW}")
            wait_for(lambda: not master_tcp_sockets(server.pid), what=(
                f"master {server.pid} to close its copy of every handed-off client (still holds "
                f"{len(master_tcp_sockets(server.pid))})"))
            stats = server.stats()
            assert (stats["master"]["held"], stats["master"]["pending"]) == (0, 0), stats["master"]
            assert sum(w["acked"] for w in stats["workers"]) == 300, stats["workers"]
        finally:
            for sock in socks:
                sock.close()

    def test_a_worker_short_of_descriptors_serves_the_sockets_that_fit(self, start_server):
        server = start_server("--workers", "1", "--handoff-window", str(WINDOW))
        (worker,) = server.workers()
        os.kill(worker, signal.SIGSTOP)  # the handoffs wait in its channel while its descriptors run out
        socks = []
        try:
            socks = send_pings(server.address, 6)
            wait_for(lambda: server.stats()["workers"][0].get("unacked") == 6, timeout=10,
                     what=f"6 handoffs waiting for frozen worker {worker}")
            with descriptors_exhausted(worker) as limit:
                process = psutil.Process(worker)
                used = {int(name) for name in os.listdir(f"/proc/{worker}/fd")}
                room = len({limit, limit + 1} - used)  # descriptors it may open below the new limit
                process.rlimit(psutil.RLIMIT_NOFILE, (limit + 2, process.rlimit(psutil.RLIMIT_NOFILE)[1]))
                os.kill(worker, signal.SIGCONT)
                wait_for(lambda: server.stats()["master"]["rejected_closed"] == 6 - room, what=(
                    f"the {6 - room} sockets beyond worker {worker}'s {room} free descriptors closed after "
                    f"{dispatch.REJECT_BUDGET} rejects"))
                expect_pongs(socks[:room], f"worker {worker}: the first handed, those that fit")
                for i, sock in enumerate(socks[room:], room):
                    assert closed_by_peer(sock) in ("eof", "reset"), (
                        f"client {i}, beyond worker {worker}'s {room} free descriptors, was not closed")
        finally:
            os.kill(worker, signal.SIGCONT)
            for sock in socks:
                sock.close()
