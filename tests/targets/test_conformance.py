"""No false alarms: the whole chaos suite against each independent correct server.

``asyncio_server.py`` (shared accept, asyncio workers, Python's default JSON
spacing) and ``node_handoff_server.js`` (Node, an acknowledged handoff) are
correct servers of the protocol written in other styles than the reference.
The standard suite must pass on both; every failure here is either a bug of
the suite (it cried wolf) or a bug of the target, and the message lists each
failing test with its invariant so it can be told which.

Each target declares what it has, as a user would on the command line: its
idle timeout (started at ``IDLE_TIMEOUT``) and, for the asyncio server, that it
dispatches by shared accept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IDLE_TIMEOUT = 5
RUN_TIMEOUT = 900

needs_node = pytest.mark.skipif(shutil.which("node") is None,
                                reason="node (Node.js 20) is not on PATH: the Node handoff target cannot run")

TARGETS: Dict[str, List[str]] = {
    "asyncio": [
        "--fdcluster-server",
        f"asyncio={sys.executable} {HERE / 'asyncio_server.py'} --port {{port}} --workers {{workers}} "
        f"--idle-timeout {IDLE_TIMEOUT}",
        "--fdcluster-declare", "asyncio:strategy=shared-accept",
        "--fdcluster-declare", f"asyncio:idle_timeout={IDLE_TIMEOUT}",
    ],
    "node": [
        "--fdcluster-server",
        f"node=node {HERE / 'node_handoff_server.js'} --port {{port}} --workers {{workers}} "
        f"--idle-timeout {IDLE_TIMEOUT}",
        "--fdcluster-declare", f"node:idle_timeout={IDLE_TIMEOUT}",
    ],
}


def failures(junit: Path) -> List[str]:
    """'module::test: first line of the message' for every failed or erroring test case."""
    found = []
    for case in ElementTree.parse(junit).iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                message = (child.get("message") or child.text or "").strip().splitlines()
                found.append(f"{case.get('classname')}::{case.get('name')}: {message[0] if message else child.tag}")
    return found


@pytest.mark.parametrize("target", [pytest.param("asyncio"), pytest.param("node", marks=needs_node)])
def test_whole_suite_passes_on_an_independent_correct_server(target: str, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fdcluster", str(ROOT / "scenarios"), "-q", "-p", "no:cacheprovider",
         "-o", "addopts=", f"--junitxml={junit}", "--fdcluster-ready-line", "yes", *TARGETS[target]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert junit.exists(), (
        f"the suite against {target} produced no report (exit {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    failed = failures(junit)
    assert not failed, (
        f"no false alarms: {len(failed)} scenario(s) failed against the correct {target} server "
        "(a suite bug or a target bug; the suite must not cry wolf):\n  " + "\n  ".join(failed)
        + f"\n\n{result.stdout[-4000:]}")
    assert result.returncode == 0, f"the suite against {target} exited {result.returncode}:\n{result.stdout[-3000:]}"
