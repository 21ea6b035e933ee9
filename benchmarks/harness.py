"""The harness itself: a cluster fixture's start-up and teardown, and the scenario suite with -n 1 and -n 2.

- start: ``ClusterFactory.start`` with the plugin's default settings and 4
  workers, from the call until it returns a ready cluster (readiness line,
  ping answered, workers present, baseline snapshot taken) -- what the
  ``fdcluster`` fixture spends before a test runs;
- teardown: ``Cluster.stop`` until every process is reaped and the port
  refuses connections;
- the scenario suite (``scenarios/``) run as ``python -m pytest -p fdcluster
  scenarios/ -q -n 1`` and then ``-n 2``, twice each, alternating; the
  wall-clock time of the faster run of each, and the CPU it used; full mode only.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import List, Tuple

from pytest_fdcluster.cluster import ClusterFactory
from pytest_fdcluster.settings import resolve

from . import processes
from .figures import Figure, at_least, below

BENCHMARK = "harness"
WORKERS = 4
MAX_READY = 0.150  # seconds
MAX_TEARDOWN = 0.100  # seconds
MIN_SUITE_SPEEDUP = 1.6
SUITE_TIMEOUT = 900.0
SUITE_ROUNDS = 2


def fixture_cycle(quick: bool) -> Tuple[List[Figure], processes.Details]:
    rounds = 2 if quick else 10
    settings = resolve({}, processes.no_setting, processes.no_setting)._replace(workers=WORKERS)
    ready, teardown, target_ready, unclean = [], [], [], []
    for _ in range(rounds):
        factory = ClusterFactory(settings)
        try:
            began = time.monotonic()
            cluster = factory.start(name="harness")
            ready.append(time.monotonic() - began)
            target_ready.append(cluster.ready_seconds)
            began = time.monotonic()
            result = cluster.stop()
            teardown.append(time.monotonic() - began)
            if not result.clean:
                unclean.append(f"remaining {list(result.remaining)}, port released {result.port_released}")
        finally:
            factory.close()
    ready_ms, teardown_ms = processes.median(ready) * 1e3, processes.median(teardown) * 1e3
    figures = [
        Figure(BENCHMARK, f"fixture start to ready ({WORKERS} workers)", ready_ms, "ms",
               target=f"< {MAX_READY * 1e3:g} ms", met=below(ready_ms, MAX_READY * 1e3),
               note=f"median of {rounds}; max {max(ready) * 1e3:.0f} ms; start_target alone "
                    f"{processes.median(target_ready) * 1e3:.0f} ms, the rest is the baseline snapshot"),
        Figure(BENCHMARK, f"teardown to port free ({WORKERS} workers)", teardown_ms, "ms",
               target=f"< {MAX_TEARDOWN * 1e3:g} ms", met=below(teardown_ms, MAX_TEARDOWN * 1e3) and not unclean,
               note=f"median of {rounds}; max {max(teardown) * 1e3:.0f} ms"
               + (f"; UNCLEAN: {unclean}" if unclean else "")),
    ]
    details = {"rounds": rounds, "ready_ms": processes.describe(ready, 1e3),
               "teardown_ms": processes.describe(teardown, 1e3),
               "start_target_ms": processes.describe(target_ready, 1e3), "unclean": unclean}
    return figures, details


def run_suite(workers: int) -> Tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, exit code, pytest's summary line) of the scenario suite with ``-n workers``.

    CPU seconds are those of every process of the run that was reaped (pytest,
    its xdist workers, the clusters and load processes they started).
    """
    command = [sys.executable, "-m", "pytest", "-p", "fdcluster", "scenarios/", "-q", "-n", str(workers)]
    cpu_before = processes.children_cpu_seconds()
    began = time.monotonic()
    proc = subprocess.run(command, cwd=processes.REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=SUITE_TIMEOUT)
    seconds = time.monotonic() - began
    cpu = processes.children_cpu_seconds() - cpu_before
    lines = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return seconds, cpu, proc.returncode, lines[-1].strip("= ") if lines else proc.stdout[-300:]


def scenario_suite() -> Tuple[List[Figure], processes.Details]:
    runs = {1: [], 2: []}  # -n -> [(wall, cpu, code, summary)]
    for _ in range(SUITE_ROUNDS):
        for workers in (1, 2):
            runs[workers].append(run_suite(workers))
    best = {workers: min(results) for workers, results in runs.items()}  # the least disturbed run of each
    (one, one_cpu, _, one_summary), (two, two_cpu, _, two_summary) = best[1], best[2]
    speedup = one / two if two else float("nan")
    failed = [f"-n {n}: exit {code}, {summary}" for n, results in runs.items() for _, _, code, summary in results
              if code != 0]
    cores = f"cores busy: {one_cpu / one:.2f} with -n 1, {two_cpu / two:.2f} with -n 2"
    figures = [
        Figure(BENCHMARK, "scenario suite, -n 2", two, "s", one, "-n 1",
               note=f"best of {SUITE_ROUNDS}; {cores}; -n 1: {one_summary}; -n 2: {two_summary}"
                    + (f"; FAILED {failed}" if failed else "")),
        Figure(BENCHMARK, "scenario suite speed-up, -n 2 over -n 1", speedup, "x",
               target=f">= {MIN_SUITE_SPEEDUP:g}x", met=at_least(speedup, MIN_SUITE_SPEEDUP) and not failed,
               note=cores),
    ]
    details = {workers: [{"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "exit": code, "summary": summary}
                         for wall, cpu, code, summary in results] for workers, results in runs.items()}
    return figures, {"runs_by_n": details}


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    figures, details = fixture_cycle(quick)
    if quick:
        return figures, {"fixture": details, "scenario_suite": "skipped in --quick"}
    suite_figures, suite_details = scenario_suite()
    return figures + suite_figures, {"fixture": details, "scenario_suite": suite_details}
