"""Throughput: connections and keep-alive requests per second, per strategy, against one process with no handoff.

- connections per second: each request on its own connection (connect, one
  ping, close), ``CONN_CLIENTS`` clients;
- keep-alive requests per second over ``KEEPALIVE_CLIENTS`` connections,
  one request in flight per connection (no pipelining);

for each strategy of the reference server (``WORKERS`` workers) and for
``benchmarks.single_server``, which serves the same protocol in one process
with no master and no handoff: the cluster's figures are ratios of its.

Then the keep-alive target for one worker process: the peak over a few
client layouts, the worker's CPU time per request (its capacity, were it to
have a core to itself), the load generator's share of the CPU, and the p99
latency at half of the measured peak, paced (``benchmarks.paced``), with
the single-process server at the same rate as the baseline and the
worker's run-queue wait (time runnable but without a CPU) as evidence of
what the tail is made of.

Every ping carries the same params (``PAYLOAD``), which the load generator
encodes once: its CPU goes into the exchange, not into JSON.  Answers are
still checked byte for byte.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from fdcluster_server.dispatch import STRATEGIES
from pytest_fdcluster import load

from . import processes
from .figures import Figure, at_least, at_most
from .paced import Paced

BENCHMARK = "throughput"
WORKERS = 2
PAYLOAD = 0
TARGET_KEEPALIVE = 20000.0  # requests/s, one worker, pipelining off
TARGET_P99_AT_HALF = 2e-3  # seconds
#: (clients, processes) tried for the one-worker peak: the load generator is a
#: GIL-bound Python process, so more of them mostly compete with the worker on a small machine.
PEAK_LAYOUTS = ((8, 1), (16, 2), (32, 2))


def _measure(address: processes.Address, quick: bool, rounds: int) -> Tuple[List[float], List[float], int]:
    """(connections/s per round, keep-alive requests/s per round, failed requests)."""
    duration = 0.3 if quick else 2.5
    conn_clients, keepalive_clients, procs = (4, 8, 1) if quick else (16, 32, 2)
    conns, requests, failed = [], [], 0
    for _ in range(rounds):
        result = load.run_load(address, clients=conn_clients, processes=procs, duration=duration, keepalive=False,
                               payload=PAYLOAD)
        conns.append(result.throughput)
        failed += result.error_count
        result = load.run_load(address, clients=keepalive_clients, processes=procs, duration=duration, payload=PAYLOAD)
        requests.append(result.throughput)
        failed += result.error_count
    return conns, requests, failed


def _strategies(quick: bool) -> Tuple[List[Figure], processes.Details]:
    rounds = 1 if quick else 2
    measured: Dict[str, Tuple[List[float], List[float], int]] = {}
    with processes.baseline_server("single_server") as (_, address):
        load.run_load(address, clients=4, requests=200, keepalive=False, payload=PAYLOAD)
        measured["single process"] = _measure(address, quick, rounds)
    for strategy in STRATEGIES:
        with processes.cluster(processes.reference_settings(WORKERS, strategy), strategy) as cluster:
            load.run_load(cluster.address, clients=4, requests=200, keepalive=False, payload=PAYLOAD)
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


def _peak(cluster, quick: bool) -> Dict[str, float]:
    """The best keep-alive run over the client layouts, with the CPU each side used."""
    duration = 0.5 if quick else 3.0
    best: Dict[str, float] = {}
    runs = []
    worker = cluster.workers[0]
    for clients, procs in PEAK_LAYOUTS[:1] if quick else PEAK_LAYOUTS:
        worker_before, master_before = processes.cpu_seconds(worker), processes.cpu_seconds(cluster.master)
        client_before = processes.children_cpu_seconds() + processes.own_cpu_seconds()
        result = load.run_load(cluster.address, clients=clients, processes=procs, duration=duration, payload=PAYLOAD)
        run = {
            "clients": clients, "processes": procs, "requests_per_s": result.throughput, "ok": result.requests_ok,
            "failed": result.error_count, "duration": result.duration, "p99_ms": result.p99 * 1e3,
            "worker_cpu": processes.cpu_seconds(worker) - worker_before,
            "master_cpu": processes.cpu_seconds(cluster.master) - master_before,
            "client_cpu": processes.children_cpu_seconds() + processes.own_cpu_seconds() - client_before,
        }
        runs.append({key: round(value, 3) if isinstance(value, float) else value for key, value in run.items()})
        if run["requests_per_s"] > best.get("requests_per_s", -1.0):
            best = run
    best["runs"] = runs  # type: ignore[assignment]
    return best


def _paced(address: processes.Address, rate: float, clients: int, procs: int, duration: float,
           pid: int) -> Tuple[load.LoadResult, float, int]:
    """A paced run, with ``pid``'s run-queue wait (seconds) and number of times it was scheduled in."""
    waited_before, slices_before = processes.run_queue_seconds(pid)
    result = load.run_load(address, clients=clients, processes=procs, duration=duration, payload=Paced(rate, clients))
    waited_after, slices_after = processes.run_queue_seconds(pid)
    return result, waited_after - waited_before, slices_after - slices_before


def _one_worker(quick: bool) -> Tuple[List[Figure], processes.Details]:
    duration = 0.5 if quick else 4.0
    with processes.cluster(processes.reference_settings(1), "one worker") as cluster:
        worker = cluster.workers[0]
        load.run_load(cluster.address, clients=4, requests=500, payload=PAYLOAD)
        peak = _peak(cluster, quick)
        clients, procs = int(peak["clients"]), int(peak["processes"])
        half_rate = max(1.0, peak["requests_per_s"] / 2)
        half, waited, slices = _paced(cluster.address, half_rate, clients, procs, duration, worker)
    with processes.baseline_server("single_server") as (server, address):
        load.run_load(address, clients=4, requests=500, payload=PAYLOAD)
        single, single_waited, single_slices = _paced(address, half_rate, clients, procs, duration, server.pid)

    worker_cpu, client_cpu = peak["worker_cpu"], peak["client_cpu"]
    capacity = peak["ok"] / worker_cpu if worker_cpu > 0 else float("nan")
    busy = worker_cpu + peak["master_cpu"] + client_cpu
    limits = (f"{clients} connections in {procs} load process(es); the worker was busy {worker_cpu / peak['duration']:.0%} "
              f"of one core, the load generator used {client_cpu / peak['duration']:.2f} cores "
              f"({client_cpu / busy:.0%} of the CPU the run used)")
    wait_ms = waited / slices * 1e3 if slices else float("nan")
    tail = (f"p50 {half.p50 * 1e3:.2f} ms, p90 {half.p90 * 1e3:.2f} ms, max {half.max * 1e3:.1f} ms; "
            f"the worker waited for a CPU {waited / half.duration:.1%} of the run, {wait_ms:.2f} ms per wake-up on average")
    figures = [
        Figure(BENCHMARK, "keep-alive requests/s, 1 worker, no pipelining", peak["requests_per_s"], "req/s",
               target=f">= {TARGET_KEEPALIVE:,.0f}", met=at_least(peak["requests_per_s"], TARGET_KEEPALIVE), note=limits),
        Figure(BENCHMARK, "1 worker's capacity: requests per worker CPU second", capacity, "req/s",
               target=f"(>= {TARGET_KEEPALIVE:,.0f} on a core of its own)", met=at_least(capacity, TARGET_KEEPALIVE),
               note=f"{worker_cpu / max(1, peak['ok']) * 1e6:.1f} us of worker CPU per request"),
        Figure(BENCHMARK, f"p99 at half of the peak ({half.throughput:,.0f} req/s), 1 worker", half.p99 * 1e3, "ms",
               single.p99 * 1e3, "single process, same rate", target=f"< {TARGET_P99_AT_HALF * 1e3:g} ms",
               met=at_most(half.p99, TARGET_P99_AT_HALF), note=tail),
    ]

    def latency(result: load.LoadResult) -> Dict[str, float]:
        return {name: round(value * 1e3, 3) for name, value in
                (("p50", result.p50), ("p90", result.p90), ("p99", result.p99), ("p99.9", result.p999), ("max", result.max))}

    details = {
        "peak": {key: (round(value, 3) if isinstance(value, float) else value) for key, value in peak.items()},
        "worker_us_per_request": round(worker_cpu / max(1, peak["ok"]) * 1e6, 2),
        "half_rate_target": round(half_rate), "half_requests_per_s": round(half.throughput),
        "half_failed": half.error_count, "half_latency_ms": latency(half),
        "half_worker_run_queue_s": round(waited, 4), "half_worker_wakeups": slices,
        "single_half_requests_per_s": round(single.throughput), "single_half_latency_ms": latency(single),
        "single_half_run_queue_s": round(single_waited, 4), "single_half_wakeups": single_slices,
    }
    return figures, details


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    figures, details = _strategies(quick)
    one_figures, one_details = _one_worker(quick)
    return figures + one_figures, {"strategies": details, "one_worker": one_details}
