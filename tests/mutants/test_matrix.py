"""The mutation matrix: the chaos suite against each deliberately broken server.

Each variant of ``mutants.py`` carries one real-world bug; the scenario module
meant to catch it must fail, and the unbroken server (variant ``none``, run
through the same launcher) must pass every module.  The matrix is printed in
the terminal summary (see conftest.py) and kept in the README.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = Path(__file__).with_name("mutants.py")
MODULES = ["test_worker_kills", "test_partial_reads", "test_slow_clients", "test_descriptor_leaks",
           "test_load_balance", "test_bad_input"]
RUN_TIMEOUT = 600

# variant -> the scenario modules that must fail against it
EXPECTED = {
    "none": set(),
    "master-keeps-fds": {"test_descriptor_leaks"},
    "close-wait": {"test_descriptor_leaks"},
    "no-respawn": {"test_worker_kills", "test_load_balance"},
    "unfair-dispatch": {"test_load_balance"},
    "single-recv": {"test_partial_reads"},
    "synchronous-worker": {"test_slow_clients"},
    "dies-on-bad-json": {"test_bad_input"},
    "lost-handoff": {"test_worker_kills"},
    "dup-fds": {"test_descriptor_leaks"},
}


def run_suite(variant: str, tmp_path: Path) -> dict:
    """Run the scenario suite against ``variant``; return module -> (failed, passed) counts."""
    junit = tmp_path / "junit.xml"
    server = f"{sys.executable} {MUTANTS} {variant} --port {{port}} --workers {{workers}} --log-level warning"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fdcluster", str(ROOT / "scenarios"), "-q", "-p", "no:cacheprovider",
         f"--junitxml={junit}", "--fdcluster-server", server, "-o", "addopts="],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert junit.exists(), (
        f"the scenario run against {variant} produced no report:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    outcome = {module: [0, 0] for module in MODULES}
    for case in ElementTree.parse(junit).iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        if module not in outcome:
            continue
        failed = any(child.tag in ("failure", "error") for child in case)
        outcome[module][0 if failed else 1] += 1
    return {module: tuple(counts) for module, counts in outcome.items()}


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_suite_catches_variant(variant, tmp_path, record_property):
    outcome = run_suite(variant, tmp_path)
    failed = {module for module, (fails, _) in outcome.items() if fails}
    record_property("mutation_row", {"variant": variant, "outcome": outcome})
    if variant == "none":
        assert not failed, f"the unbroken server fails {sorted(failed)}: {outcome}"
    else:
        missed = EXPECTED[variant] - failed
        assert not missed, (
            f"variant {variant!r} is not caught by {sorted(missed)}; module outcomes (failed, passed): {outcome}")
