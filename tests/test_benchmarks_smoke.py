"""The benchmarks still run: ``python -m benchmarks --quick``, smallest sizes, no figure judged.

Benchmarks are not tests (they run on demand, see README "Performance");
this only proves the runner, every benchmark module and its baselines work,
and that the run leaves no process behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_fdcluster.cluster import scm_rights_unavailable

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("handoff", "throughput", "isolation", "memory", "harness")
#: The quick mode takes about 10 s on an idle 2-core machine; the cap is for a loaded CI box.
QUICK_TIMEOUT = 120.0

needs_fd_passing = pytest.mark.skipif(bool(scm_rights_unavailable()),
                                      reason=scm_rights_unavailable() or "the benchmarks hand sockets over SCM_RIGHTS")


@needs_fd_passing
class TestQuickBenchmark:
    def test_quick_mode_runs_every_benchmark_and_writes_json(self, tmp_path):
        out = tmp_path / "results.json"
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=QUICK_TIMEOUT)
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        document = json.loads(out.read_text())
        assert document["mode"] == "quick" and not document["errors"], document["errors"]
        measured = {figure["benchmark"] for figure in document["figures"] if figure["value"] is not None}
        assert measured == set(BENCHMARKS), f"benchmarks without a figure: {set(BENCHMARKS) - measured}"
        header = ["benchmark", "figure", "value", "baseline", "ratio", "target", "met"]
        assert proc.stdout.splitlines()[0].split() == header

    def test_unknown_benchmark_is_a_usage_error(self):
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "nope"], cwd=ROOT,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert "unknown benchmark 'nope'" in proc.stderr
