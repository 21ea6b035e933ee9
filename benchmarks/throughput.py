"""Throughput: connections and keep-alive requests per second, per strategy, against one process with no handoff.

- connections per second: each request on its own connection (connect, one
  ping, close), ``CONN_CLIENTS`` clients in ``CLIENT_PROCESSES`` processes;
- keep-alive requests per second over ``KEEPALIVE_CLIENTS`` connections,
  one request in flight per connection (no pipelining);

for each strategy of the reference server (``WORKERS`` workers) and for
``benchmarks.single_server``, which serves the same protocol in one process
with no master and no handoff: the cluster's figures are ratios of its.

Then the keep-alive target for one worker process: the peak over many
connections, the worker's CPU time per request (its capacity were it to
have a core to itself), the clients' share of the CPU, and the p99 latency
at half of the measured peak, paced (``benchmarks.paced``).
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

from pytest_fdcluster import load
from fdcluster_server.dispatch import STRATEGIES

from . import processes
from .figures import Figure, at_least, at_most
from .paced import Paced

BENCHMARK = "throughput"
WORKERS = 2
TARGET_KEEPALIVE = 20000.0  # requests/s, one worker, pipelining off
TARGET_P99_AT_HALF = 2e-3  # seconds


def _measure(address: processes.Address, quick: bool, rounds: int) -> Tuple[List[float], List[float], int]:
    """(connections/s per round, keep-alive requests/s per round, failed requests)."""
    duration = 0.3 if quick else 2.5
    conn_clients, keepalive_clients, procs = (4, 8, 1) if quick else (16, 32, 2)
    conns, requests, failed = [], [], 0
    for _ in range(rounds):
        result = load.run_load(address, clients=conn_clients, processes=procs, duration=duration, keepalive=False)
        conns.append(result.throughput)
        failed += result.error_count
        result = load.run_load(address, clients=keepalive_clients, processes=procs, duration=duration)
        requests.append(result.throughput)
        failed += result.error_count
    return conns, requests, failed


def _strategies(quick: bool) -> Tuple[List[Figure], processes.Details]:
    rounds = 1 if quick else 2
    measured: Dict[str, Tuple[List[float], List[float], int]] = {}
    with processes.baseline_server("single_server") as (_, address):
        load.run_load(address, clients=4, requests=200, keepalive=False)
        measured["single process"] = _measure(address, quick, rounds)
    for strategy in STRATEGIES:
        with processes.cluster(processes.reference_settings(WORKERS, strategy), strategy) as cluster:
            load.run_load(cluster.address, clients=4, requests=200, keepalive=False)
            measured[strategy] = _measure(cluster.address, quick, rounds)

    single_conns = processes.median(measured["single process"][0])
    single_requests = processes.median(measured["single process"][1])
    figures = []
    for strategy in STRATEGIES:
        conns, requests, failed = measured[strategy]
        note = f"{failed} failed requests" if failed else ""
        figures.append(Figure(BENCHMARK, f"connections/s, {strategy}, {WORKERS} workers", processes.median(conns),
                              "conn/s", single_conns, "single process", note=note))
        figures.append(Figure(BENCHMARK, f"keep-alive requests/s, {strategy}, {WORKERS} workers",
                              processes.median(requests), "req/s", single_requests, "single process", note=note))
    details = {name: {"connections_per_s": [round(v) for v in conns], "keepalive_requests_per_s": [round(v) for v in reqs],
                      "failed_requests": failed}
               for name, (conns, reqs, failed) in measured.items()}
    return figures, details


def _one_worker(quick: bool) -> Tuple[List[Figure], processes.Details]:
    duration = 0.5 if quick else 4.0
    clients, procs = (8, 1) if quick else (64, 3)
    with processes.cluster(processes.reference_settings(1), "one worker") as cluster:
        worker = cluster.workers[0]
        load.run_load(cluster.address, clients=4, requests=500)
        worker_before, master_before = processes.cpu_seconds(worker), processes.cpu_seconds(cluster.master)
        client_before = processes.children_cpu_seconds() + processes.own_cpu_seconds()
        peak = load.run_load(cluster.address, clients=clients, processes=procs, duration=duration)
        worker_cpu = processes.cpu_seconds(worker) - worker_before
        master_cpu = processes.cpu_seconds(cluster.master) - master_before
        client_cpu = processes.children_cpu_seconds() + processes.own_cpu_seconds() - client_before
        half_rate = max(1.0, peak.throughput / 2)
        half = load.run_load(cluster.address, clients=clients, processes=procs, duration=duration,
                             payload=Paced(half_rate, clients))

    capacity = peak.requests_ok / worker_cpu if worker_cpu > 0 else float("nan")
    busy = worker_cpu + master_cpu + client_cpu
    client_share = client_cpu / busy if busy else float("nan")
    worker_load = worker_cpu / peak.duration if peak.duration else float("nan")
    limits = (f"worker busy {worker_load:.0%} of one core; the load generator used {client_cpu / peak.duration:.2f} cores "
              f"({client_share:.0%} of the CPU the run used)")
    figures = [
        Figure(BENCHMARK, f"keep-alive requests/s, 1 worker, {clients} connections, no pipelining", peak.throughput,
               "req/s", target=f">= {TARGET_KEEPALIVE:,.0f}", met=at_least(peak.throughput, TARGET_KEEPALIVE),
               note=limits),
        Figure(BENCHMARK, "1 worker's capacity: requests per worker CPU second", capacity, "req/s",
               target=f"(>= {TARGET_KEEPALIVE:,.0f} with a core to itself)", met=at_least(capacity, TARGET_KEEPALIVE)),
        Figure(BENCHMARK, f"p99 at half of the peak ({half.throughput:,.0f} req/s), 1 worker", half.p99 * 1e3, "ms",
               target=f"< {TARGET_P99_AT_HALF * 1e3:g} ms", met=at_most(half.p99, TARGET_P99_AT_HALF),
               note=f"p50 {half.p50 * 1e3:.2f} ms, p90 {half.p90 * 1e3:.2f} ms, max {half.max * 1e3:.1f} ms"),
    ]
    details = {
        "clients": clients, "client_processes": procs, "duration": duration,
        "peak_requests_per_s": round(peak.throughput), "peak_failed": peak.error_count,
        "peak_p99_ms": round(peak.p99 * 1e3, 3),
        "worker_cpu_s": round(worker_cpu, 3), "master_cpu_s": round(master_cpu, 3), "client_cpu_s": round(client_cpu, 3),
        "worker_us_per_request": round(worker_cpu / max(1, peak.requests_ok) * 1e6, 2),
        "half_rate_target": round(half_rate), "half_requests_per_s": round(half.throughput), "half_failed": half.error_count,
        "half_latency_ms": {name: round(value * 1e3, 3) for name, value in
                            (("p50", half.p50), ("p90", half.p90), ("p99", half.p99), ("p99.9", half.p999), ("max", half.max))},
    }
    return figures, details


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    figures, details = _strategies(quick)
    one_figures, one_details = _one_worker(quick)
    return figures + one_figures, {"strategies": details, "one_worker": one_details}
