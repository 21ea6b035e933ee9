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
the single-process server under the same load as the baseline and the
worker's run-queue wait (time runnable but without a CPU) as evidence of
what the tail is made of.  The p99 is judged with few client threads per
load process (``PACED_LAYOUT``), and shown with the peak's layout too.

Every ping carries the same params (``PAYLOAD``), which the load generator
encodes once: its CPU goes into the exchange, not into JSON.  Answers are
still checked byte for byte.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from fdcluster_server.dispatch import STRATEGIES
from pytest_fdcluster import load

from . import processes
from .figures import Figure, at_least, below
from .paced import Paced

BENCHMARK = "throughput"
WORKERS = 2
PAYLOAD = 0
TARGET_KEEPALIVE = 20000.0  # requests/s, one worker, pipelining off
TARGET_P99_AT_HALF = 2e-3  # seconds
#: (clients, processes) tried for the one-worker peak: the load generator is a
#: GIL-bound Python process, so more of them mostly compete with the worker on a small machine.
PEAK_LAYOUTS = ((8, 1), (8, 2), (16, 2), (32, 2))
#: (clients, processes) for the p99 at half of the peak: the fewest threads per load process that
#: sustain the rate, since a load process's threads queue for its GIL and that wait is counted as latency.
#: The peak's own layout is measured too, for comparison.
PACED_LAYOUT = (8, 2)
QUICK_LAYOUT = (8, 1)  # --quick: no load process to spawn


def _measure(address: processes.Address, quick: bool, rounds: int) -> Tuple[List[float], List[float], int]:
    """(connections/s per round, keep-alive requests/s per round, failed requests)."""
    duration = 0.2 if quick else 2.5
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
    details = {name: {"connections_per_s": [round(v) for v in conns],
                      "keepalive_requests_per_s": [round(v) for v in reqs],
                      "failed_requests": failed}
               for name, (conns, reqs, failed) in measured.items()}
    return figures, details


def _peak(cluster, quick: bool) -> Dict[str, float]:
    """The best keep-alive run over the client layouts, with the CPU each side used."""
    duration = 0.3 if quick else 3.0
    best: Dict[str, float] = {}
    runs = []
    worker = cluster.workers[0]
    for clients, procs in [QUICK_LAYOUT] if quick else PEAK_LAYOUTS:
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


class PacedRuns:
    """Paced runs against one server, merged: latency over every request, the server's run-queue wait."""

    def __init__(self) -> None:
        self.histogram = load.Histogram()
        self.ok = 0
        self.failed = 0
        self.seconds = 0.0
        self.waited = 0.0
        self.wakeups = 0

    def run(self, address: processes.Address, rate: float, clients: int, procs: int, duration: float, pid: int) -> None:
        waited_before, wakeups_before = processes.run_queue_seconds(pid)
        result = load.run_load(address, clients=clients, processes=procs, duration=duration,
                               payload=Paced(rate, clients))
        waited_after, wakeups_after = processes.run_queue_seconds(pid)
        self.histogram.merge(result.histogram)
        self.ok += result.requests_ok
        self.failed += result.error_count
        self.seconds += result.duration
        self.waited += waited_after - waited_before
        self.wakeups += wakeups_after - wakeups_before

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def latency_ms(self) -> Dict[str, float]:
        return {f"p{q:g}": round(self.histogram.percentile(q) * 1e3, 3) for q in (50, 90, 99, 99.9, 100)}


def _one_worker(quick: bool) -> Tuple[List[Figure], processes.Details]:
    duration = 0.3 if quick else 2.0
    rounds = 1 if quick else 3
    with processes.cluster(processes.reference_settings(1), "one worker") as cluster, \
            processes.baseline_server("single_server") as (single_server, single_address):
        worker = cluster.workers[0]
        load.run_load(cluster.address, clients=4, requests=500, payload=PAYLOAD)
        load.run_load(single_address, clients=4, requests=500, payload=PAYLOAD)
        peak = _peak(cluster, quick)
        peak_layout = (int(peak["clients"]), int(peak["processes"]))
        half_rate = max(1.0, peak["requests_per_s"] / 2)
        judged_layout = QUICK_LAYOUT if quick else PACED_LAYOUT
        layouts = [judged_layout] if quick or peak_layout == judged_layout else [judged_layout, peak_layout]
        paced = {layout: (PacedRuns(), PacedRuns()) for layout in layouts}
        for _ in range(rounds):  # interleaved, so the worker and the baseline see the same noise
            for (clients, procs), (half, single) in paced.items():
                half.run(cluster.address, half_rate, clients, procs, duration, worker)
                single.run(single_address, half_rate, clients, procs, duration, single_server.pid)

    worker_cpu, client_cpu = peak["worker_cpu"], peak["client_cpu"]
    capacity = peak["ok"] / worker_cpu if worker_cpu > 0 else float("nan")
    busy = worker_cpu + peak["master_cpu"] + client_cpu
    limits = (f"{peak_layout[0]} connections in {peak_layout[1]} load process(es); the worker was busy "
              f"{worker_cpu / peak['duration']:.0%} of one core, the load generator used "
              f"{client_cpu / peak['duration']:.2f} cores ({client_cpu / busy:.0%} of the CPU the run used)")
    figures = [
        Figure(BENCHMARK, "keep-alive requests/s, 1 worker, no pipelining", peak["requests_per_s"], "req/s",
               target=f">= {TARGET_KEEPALIVE:,.0f}", met=at_least(peak["requests_per_s"], TARGET_KEEPALIVE),
               note=limits),
        Figure(BENCHMARK, "1 worker's capacity: requests per worker CPU second", capacity, "req/s",
               target=f"(>= {TARGET_KEEPALIVE:,.0f} on a core of its own)", met=at_least(capacity, TARGET_KEEPALIVE),
               note=f"{worker_cpu / max(1, peak['ok']) * 1e6:.1f} us of worker CPU per request"),
    ]
    for (clients, procs), (half, single) in paced.items():
        judged = (clients, procs) == judged_layout
        p99 = half.histogram.percentile(99)
        wait_us = half.waited / half.wakeups * 1e6 if half.wakeups else float("nan")
        figures.append(Figure(
            BENCHMARK, f"p99 at half of the peak ({half.rate:,.0f} req/s), 1 worker, {clients} connections in {procs} "
                       f"load process{'es' if procs > 1 else ''}",
            p99 * 1e3, "ms", single.histogram.percentile(99) * 1e3, "single process, same load",
            target=f"< {TARGET_P99_AT_HALF * 1e3:g} ms" if judged else "",
            met=below(p99, TARGET_P99_AT_HALF) if judged else None,
            note=(f"p50 {half.histogram.percentile(50) * 1e3:.2f} ms, "
                  f"p99.9 {half.histogram.percentile(99.9) * 1e3:.1f} ms; "
                  f"the worker waited for a CPU {half.waited / half.seconds:.1%} of the time, {wait_us:.0f} us per "
                  f"wake-up on average"),
        ))
    details = {
        "peak": {key: (round(value, 3) if isinstance(value, float) else value) for key, value in peak.items()},
        "worker_us_per_request": round(worker_cpu / max(1, peak["ok"]) * 1e6, 2),
        "half_rate_target": round(half_rate), "paced_rounds": rounds, "paced_seconds_each": duration,
        "paced": [{"clients": clients, "processes": procs,
                   "cluster": {"requests_per_s": round(half.rate), "failed": half.failed,
                               "latency_ms": half.latency_ms(),
                               "run_queue_s": round(half.waited, 4), "wakeups": half.wakeups},
                   "single_process": {"requests_per_s": round(single.rate), "failed": single.failed,
                                      "latency_ms": single.latency_ms(), "run_queue_s": round(single.waited, 4),
                                      "wakeups": single.wakeups}}
                  for (clients, procs), (half, single) in paced.items()],
    }
    return figures, details


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    figures, details = _strategies(quick)
    one_figures, one_details = _one_worker(quick)
    return figures + one_figures, {"strategies": details, "one_worker": one_details}
