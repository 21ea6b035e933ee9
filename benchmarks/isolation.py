"""Isolation: p99 latency of normal clients while idle or trickling connections are held open.

Normal clients: keep-alive pings paced at ``RATE`` requests/s in all
(``benchmarks.paced``), from load processes of their own.  Background
connections, opened from this process and each pinged once so a worker holds
it: *idle* ones then send nothing; *trickling* ones send the 4-byte header
of a frame that never completes, then one byte per second each (slowloris).
The server runs with a long ``--idle-timeout`` so the trickle is not cut
off during the run.

Levels are measured in turn, short runs over several rounds in a rotating
order, so a noisy moment of the machine spreads over every level; each
level's p99 is taken over all its requests (merged histograms).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Dict, Iterator, List, Tuple

from fdcluster_server import protocol
from pytest_fdcluster import load

from . import processes
from .figures import Figure, at_most
from .paced import Paced

BENCHMARK = "isolation"
WORKERS = 2
RATE = 1000.0  # requests/s of the normal clients, far below saturation
CLIENTS = 8
IDLE_TIMEOUT = 120.0  # seconds: longer than any run, so trickling frames stay open
TRICKLE_FRAME = 1000  # bytes the trickling frames announce; they never get there
MAX_RATIO = 1.5
CONNECT_TIMEOUT = 5.0
SETTLE_TIMEOUT = 10.0  # for the workers to close the previous level's connections


@contextlib.contextmanager
def background(address: processes.Address, kind: str, count: int) -> Iterator[List[socket.socket]]:
    """``count`` connections held open for the block, each answered once; trickling ones fed by a thread."""
    socks: List[socket.socket] = []
    stop = threading.Event()
    feeder = None
    ping = protocol.request("ping", 0)
    try:
        for _ in range(count):
            sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
            socks.append(sock)
            sock.sendall(ping)
        for sock in socks:  # every one answered: a worker holds it, the master does not
            await_answer(sock)
        if kind == "trickling" and socks:
            for sock in socks:
                sock.sendall(protocol.HEADER.pack(TRICKLE_FRAME))
            feeder = threading.Thread(target=_trickle, args=(socks, stop), name="trickle", daemon=True)
            feeder.start()
        yield socks
    finally:
        stop.set()
        if feeder is not None:
            feeder.join(5.0)
        for sock in socks:
            sock.close()


def await_answer(sock: socket.socket) -> None:
    """Read one response frame from ``sock`` (blocking, with the socket's timeout)."""
    decoder = protocol.FrameDecoder()
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"connection {sock.getsockname()} closed before its ping was answered")
        if decoder.feed(data):
            return


def _trickle(socks: List[socket.socket], stop: threading.Event) -> None:
    """One byte per connection per second, spread evenly over the second."""
    interval = 1.0 / len(socks)
    due = time.monotonic()
    while not stop.is_set():
        for sock in socks:
            if stop.is_set():
                return
            try:
                sock.send(b"x")
            except OSError:
                pass  # closed by the server: it is no longer trickling, nothing to report here
            due += interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def active_connections(cluster) -> int:
    """Client connections the workers hold, from their own counters (0 if the stats are unavailable)."""
    stats = cluster.stats() or {}
    return sum(worker.get("active", 0) or 0 for worker in stats.get("workers", []))


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    levels = [("none", 0), ("idle", 50), ("trickling", 50)] if quick else [
        ("none", 0), ("idle", 100), ("idle", 1000), ("trickling", 100), ("trickling", 1000)]
    rounds = 1 if quick else 6
    duration = 0.5 if quick else 1.5
    procs = 1 if quick else 2
    merged: Dict[Tuple[str, int], load.Histogram] = {level: load.Histogram() for level in levels}
    per_round: Dict[Tuple[str, int], List[float]] = {level: [] for level in levels}
    failed = 0
    settings = processes.reference_settings(WORKERS, idle_timeout=IDLE_TIMEOUT)
    with processes.cluster(settings, "isolation") as cluster:
        load.run_load(cluster.address, clients=CLIENTS, requests=500)
        for round_ in range(rounds):
            # Rotate the order, so no level always follows the closing of a thousand connections.
            for level in levels[round_ % len(levels):] + levels[:round_ % len(levels)]:
                kind, count = level
                with background(cluster.address, kind, count):
                    result = load.run_load(cluster.address, clients=CLIENTS, processes=procs, duration=duration,
                                           payload=Paced(RATE, CLIENTS))
                merged[level].merge(result.histogram)
                per_round[level].append(result.p99)
                failed += result.error_count
                processes.wait_until(lambda: active_connections(cluster) == 0, SETTLE_TIMEOUT)

    base = merged[("none", 0)].percentile(99) * 1e3
    figures = []
    for level in levels:
        kind, count = level
        value = merged[level].percentile(99) * 1e3
        judged = level == ("idle", 1000)
        name = "p99, no other connections" if kind == "none" else f"p99 with {count:,} {kind} connections"
        figures.append(Figure(
            BENCHMARK, name, value, "ms", None if kind == "none" else base, "none open",
            target=f"<= {MAX_RATIO:g}x none" if judged else "",
            met=at_most(value / base, MAX_RATIO) if judged else None,
            note=(f"p50 {merged[level].percentile(50) * 1e3:.2f} ms; {len(merged[level]):,} requests over {rounds} "
                  f"interleaved runs" if kind == "none" or judged else ""),
        ))
    details = {
        "rate": RATE, "clients": CLIENTS, "client_processes": procs, "duration": duration, "rounds": rounds,
        "workers": WORKERS, "failed_requests": failed,
        "p99_ms_per_run": {f"{kind} {count}": [round(v * 1e3, 3) for v in values]
                           for (kind, count), values in per_round.items()},
        "latency_ms": {f"{kind} {count}": {f"p{q:g}": round(h.percentile(q) * 1e3, 3) for q in (50, 90, 99, 99.9)}
                       for (kind, count), h in merged.items()},
    }
    return figures, details
