"""The harness itself: a cluster fixture's start-up and teardown, and the scenario suite with -n 1 and -n 2.

- start: ``ClusterFactory.start`` with the plugin's default settings and 4
  workers, from the call until it returns a ready cluster (readiness line,
  ping answered, workers present, baseline snapshot taken) -- what the
  ``fdcluster`` fixture spends before a test runs;
- teardown: ``Cluster.stop`` until every process is reaped and the port
  refuses connections;
- the scenario suite (``scenarios/``) run as ``python -m pytest -p fdcluster
  scenarios/ -q -n 1`` and then ``-n 2``, wall-clock time; full mode only.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import List, Optional, Tuple

from pytest_fdcluster.cluster import ClusterFactory
from pytest_fdcluster.settings import resolve

from . import processes
from .figures import Figure, at_least, at_most

BENCHMARK = "harness"
WORKERS = 4
MAX_READY = 0.150  # seconds
MAX_TEARDOWN = 0.100  # seconds
MIN_SUITE_SPEEDUP = 1.6
SUITE_TIMEOUT = 900.0


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
               target=f"< {MAX_READY * 1e3:g} ms", met=at_most(ready_ms, MAX_READY * 1e3 - 1e-9),
               note=f"median of {rounds}; max {max(ready) * 1e3:.0f} ms; start_target alone "
                    f"{processes.median(target_ready) * 1e3:.0f} ms, the rest is the baseline snapshot"),
        Figure(BENCHMARK, f"teardown to port free ({WORKERS} workers)", teardown_ms, "ms",
               target=f"< {MAX_TEARDOWN * 1e3:g} ms", met=at_most(teardown_ms, MAX_TEARDOWN * 1e3 - 1e-9) and not unclean,
               note=f"median of {rounds}; max {max(teardown) * 1e3:.0f} ms" + (f"; UNCLEAN: {unclean}" if unclean else "")),
    ]
    details = {"rounds": rounds, "ready_ms": processes.describe(ready, 1e3), "teardown_ms": processes.describe(teardown, 1e3),
               "start_target_ms": processes.describe(target_ready, 1e3), "unclean": unclean}
    return figures, details


def run_suite(workers: int) -> Tuple[float, int, str]:
    """(wall seconds, exit code, pytest's summary line) of the scenario suite with ``-n workers``."""
    command = [sys.executable, "-m", "pytest", "-p", "fdcluster", "scenarios/", "-q", "-n", str(workers)]
    began = time.monotonic()
    proc = subprocess.run(command, cwd=processes.REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=SUITE_TIMEOUT)
    seconds = time.monotonic() - began
    lines = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return seconds, proc.returncode, lines[-1].strip("= ") if lines else proc.stdout[-300:]


def scenario_suite() -> Tuple[List[Figure], processes.Details]:
    one, one_code, one_summary = run_suite(1)
    two, two_code, two_summary = run_suite(2)
    speedup = one / two if two else float("nan")
    failed = [f"-n {n}: exit {code}, {summary}" for n, code, summary in ((1, one_code, one_summary), (2, two_code, two_summary))
              if code != 0]
    figures = [
        Figure(BENCHMARK, "scenario suite, -n 2", two, "s", one, "-n 1",
               note=f"-n 1: {one_summary}; -n 2: {two_summary}" + (f"; FAILED {failed}" if failed else "")),
        Figure(BENCHMARK, "scenario suite speed-up, -n 2 over -n 1", speedup, "x",
               target=f">= {MIN_SUITE_SPEEDUP:g}x", met=at_least(speedup, MIN_SUITE_SPEEDUP) and not failed),
    ]
    details = {"seconds_n1": round(one, 2), "seconds_n2": round(two, 2), "summary_n1": one_summary,
               "summary_n2": two_summary, "exit_codes": [one_code, two_code]}
    return figures, details


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    figures, details = fixture_cycle(quick)
    if quick:
        return figures, {"fixture": details, "scenario_suite": "skipped in --quick"}
    suite_figures, suite_details = scenario_suite()
    return figures + suite_figures, {"fixture": details, "scenario_suite": suite_details}
