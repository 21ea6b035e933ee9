"""Memory: the master's RSS across a connection storm, and a worker's RSS per idle connection.

- master: RSS before and after ``STORM`` connections (connect, one ping,
  close; bounded concurrency), sampled during the storm for its peak; the
  growth must stay flat whatever the number of connections.
- worker: one worker's RSS before and after ``IDLE`` connections are opened
  and answered once, divided by their number.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import List, Tuple

from fdcluster_server import protocol
from pytest_fdcluster import load

from . import processes
from .figures import Figure, below
from .isolation import CONNECT_TIMEOUT, await_answer

BENCHMARK = "memory"
MAX_MASTER_GROWTH = 2 * 1024 * 1024  # bytes over the storm
MAX_PER_CONNECTION = 16 * 1024  # bytes per idle connection in a worker
SAMPLE_INTERVAL = 0.005
SETTLE_TIMEOUT = 10.0
MiB = 1024 * 1024


class PeakSampler:
    """Samples a process's RSS in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = processes.rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            try:
                self.peak = max(self.peak, processes.rss(self.pid))
            except Exception:
                return  # the process is gone; the caller finds out on its own

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5.0)
        return self.peak


def _held(cluster) -> int:
    stats = cluster.stats() or {}
    return (stats.get("master") or {}).get("held", 0)


def master_storm(quick: bool) -> Tuple[Figure, processes.Details]:
    storm = 1000 if quick else 10000
    clients, procs = (4, 1) if quick else (16, 2)
    with processes.cluster(processes.reference_settings(2), "storm") as cluster:
        load.run_load(cluster.address, clients=clients, requests=200, keepalive=False)  # first-use allocations
        before = processes.rss(cluster.master)
        sampler = PeakSampler(cluster.master)
        try:
            result = load.run_load(cluster.address, clients=clients, processes=procs, requests=storm, keepalive=False)
        finally:
            peak = sampler.stop()
        processes.wait_until(lambda: _held(cluster) == 0, SETTLE_TIMEOUT)
        after = processes.rss(cluster.master)
    growth = after - before
    figure = Figure(BENCHMARK, f"master RSS growth over {storm:,} connections", growth / 1024, "KiB",
                    target=f"< {MAX_MASTER_GROWTH / MiB:g} MiB", met=below(growth, MAX_MASTER_GROWTH),
                    note=f"RSS {before / MiB:.1f} MiB before, peak {peak / MiB:.1f} MiB during, "
                         f"{after / MiB:.1f} MiB after")
    return figure, {"connections": storm, "failed": result.error_count, "rss_before": before, "rss_peak": peak,
                    "rss_after": after}


def worker_idle(quick: bool) -> Tuple[Figure, processes.Details]:
    count = 100 if quick else 1000
    socks: List[socket.socket] = []
    with processes.cluster(processes.reference_settings(1), "idle") as cluster, contextlib.ExitStack() as stack:
        worker = cluster.workers[0]
        load.run_load(cluster.address, clients=4, requests=200)  # first-use allocations
        before = processes.rss(worker)
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection(cluster.address, timeout=CONNECT_TIMEOUT))
            sock.sendall(protocol.request("ping"))
            socks.append(sock)
        for sock in socks:
            await_answer(sock)
        after = processes.rss(worker)
    per = (after - before) / count
    figure = Figure(BENCHMARK, f"worker RSS per idle connection ({count:,} open)", per / 1024, "KiB",
                    target=f"< {MAX_PER_CONNECTION // 1024} KiB", met=below(per, MAX_PER_CONNECTION),
                    note=f"worker RSS {before / MiB:.1f} MiB with none, {after / MiB:.1f} MiB with {count:,}")
    return figure, {"connections": count, "rss_before": before, "rss_after": after}


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    storm, storm_details = master_storm(quick)
    idle, idle_details = worker_idle(quick)
    return [storm, idle], {"master_storm": storm_details, "worker_idle": idle_details}
