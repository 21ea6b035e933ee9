"""Running the scenario suite against one variant, and judging whether it caught the bug.

``probe`` starts a variant once and pings it: a variant that cannot start or
serve is BROKEN, whatever the suite would say.  ``run_suite`` runs the
selected scenarios against it in a subprocess (``pytest -p fdcluster``, the
launcher as an external target that declares what the reference server has)
and reads every test's outcome and failure message from junit XML.
``judge`` applies the rule of the matrix: a variant is CAUGHT only by a test
of its owning module that passed on the unbroken server (variant ``none``,
same launcher) and whose failure message names the expected invariant.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

from mutant_expectations import ROOT, Expectation

from fdcluster_server import protocol
from fdcluster_server.config import READY_TAG
from pytest_fdcluster.matrix import invariant_of
from pytest_fdcluster.plugin import STARTUP_FAILED

LAUNCHER = Path(__file__).with_name("mutants.py")
TARGET = "mutant"
#: The launcher runs with this idle timeout and declares it, so the idle-timeout scenario waits seconds, not 10.
IDLE_TIMEOUT = 5
DECLARATIONS = (f"{TARGET}:idle_timeout={IDLE_TIMEOUT}", f"{TARGET}:strategy=round-robin")
RUN_TIMEOUT = 1200.0
PROBE_TIMEOUT = 15.0

CAUGHT, MISSED, BROKEN, BASELINE, NO_OWNER = "caught", "missed", "broken", "baseline", "owner missing"
# "AssertionError: ", "Failed: ", "pytest_fdcluster.checks.CheckFailed: ": the exception's name before the message.
_EXCEPTION_PREFIX = re.compile(r"^[A-Za-z_][\w.]*(Error|Failed|Exception|Failure|Missing|Timeout)?: ")
# junit's message for a failure outside the test's call: 'failed on setup with "Failed: fdcluster: ..."'.
_PHASE_WRAPPER = re.compile(r'^failed on (?:setup|teardown) with "(.*?)"?$')


class Outcome(NamedTuple):
    """One scenario test's result against one variant."""

    test: str  # module::name[params]
    module: str
    outcome: str  # passed, failed, skipped
    message: str  # the failure's first line, exception name removed ('' unless failed)

    @property
    def invariant(self) -> str:
        return invariant_of(self.message, "error") if self.message else ""


def launcher_argv(variant: str) -> List[str]:
    return [sys.executable, str(LAUNCHER), variant, "--idle-timeout", str(IDLE_TIMEOUT)]


def probe(variant: str) -> Optional[str]:
    """Why ``variant`` cannot start and answer one ping (None when it can)."""
    argv = launcher_argv(variant) + ["--port", "0", "--workers", "2", "--log-level", "error"]
    server = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    assert server.stdout is not None and server.stderr is not None
    try:
        line = _ready_line(server)
        if not line.startswith(READY_TAG):
            server.kill()
            return f"no '{READY_TAG}' line within {PROBE_TIMEOUT:g} s: {server.stderr.read()[-800:]!r}"
        info = json.loads(line.split(" ", 1)[1])
        with socket.create_connection((info["host"], info["port"]), timeout=5) as sock:
            sock.sendall(protocol.request("ping", "probe"))
            decoder = protocol.FrameDecoder()
            bodies: List[bytes] = []
            while not bodies:
                data = sock.recv(65536)
                if not data:
                    return "the probe's ping was not answered (connection closed)"
                bodies = decoder.feed(data)
        reply = protocol.decode_body(bodies[0])
        return None if reply == {"out": "pong", "result": "probe"} else f"the probe's ping was answered {reply!r}"
    except OSError as exc:
        return f"the probe's ping failed: {exc!r}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        server.stdout.close()
        server.stderr.close()


def _ready_line(server: subprocess.Popen) -> str:
    import selectors

    assert server.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(server.stdout, selectors.EVENT_READ)
        if not selector.select(PROBE_TIMEOUT):
            return ""
    return server.stdout.readline()


def run_suite(variant: str, nodes: Sequence[str], workdir: Path) -> List[Outcome]:
    """Run the scenario ``nodes`` against ``variant``; every test's outcome."""
    junit = workdir / f"junit-{variant}.xml"
    command = " ".join(launcher_argv(variant)) + " --port {port} --workers {workers} --log-level warning"
    argv = [sys.executable, "-m", "pytest", "-p", "fdcluster", "-p", "no:cacheprovider", "-p", "no:randomly", "-q",
            "-o", "addopts=", f"--junitxml={junit}", "--fdcluster-server", f"{TARGET}={command}",
            "--fdcluster-ready-line", "yes", *[f"--fdcluster-declare={d}" for d in DECLARATIONS], *nodes]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LAUNCHER.parent), env.get("PYTHONPATH")]))
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    if not junit.exists():
        raise AssertionError(f"mutation matrix: the scenario run against {variant} produced no report (exit "
                             f"{result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    outcomes = parse_junit(junit)
    if not outcomes:
        raise AssertionError(f"mutation matrix: the scenario run against {variant} ran no test (a smoke node id "
                             f"gone?): {result.stdout[-2000:]}")
    return outcomes


def parse_junit(path: Path) -> List[Outcome]:
    outcomes = []
    for case in ElementTree.parse(path).iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        name = f"{module}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = first_line(child.get("message") or child.text or child.tag)
                break
            if child.tag == "skipped":
                outcome = "skipped"
        outcomes.append(Outcome(name, module, outcome, message))
    return outcomes


def first_line(message: str) -> str:
    """The message's first non-empty line, without the exception's name."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0].strip()
    wrapped = _PHASE_WRAPPER.match(line)
    if wrapped:
        line = wrapped.group(1)
    return _EXCEPTION_PREFIX.sub("", line, count=1)


def names_invariant(outcome: Outcome, invariants: Sequence[str]) -> bool:
    """Whether a failure names one of ``invariants``: before its first ':', or anywhere in its first line."""
    text = outcome.message.lower()
    return outcome.invariant.lower() in invariants or any(name.lower() in text for name in invariants)


def is_startup_failure(outcome: Outcome) -> bool:
    return outcome.outcome == "failed" and outcome.message.startswith(STARTUP_FAILED)


def judge(variant: str, expectation: Optional[Expectation], outcomes: Sequence[Outcome],
          baseline: Mapping[str, str], probe_failure: Optional[str] = None) -> Dict[str, Any]:
    """The matrix row of ``variant``: its status, the tests that caught it, and every module's outcome."""
    row: Dict[str, Any] = {"variant": variant, "modules": by_module(outcomes), "caught_by": [], "detail": ""}
    if expectation is not None:
        row.update(owner=expectation.module, invariants=list(expectation.invariants))
    if variant == "none":
        failed = [o.test for o in outcomes if o.outcome == "failed"]
        row.update(status=BASELINE, detail="; ".join(f"{o.test}: {o.message[:200]}" for o in outcomes
                                                     if o.outcome == "failed"))
        row["failed"] = failed
        return row
    assert expectation is not None
    startup = [o for o in outcomes if is_startup_failure(o)]
    if probe_failure is not None or (outcomes and len(startup) == len(outcomes)):
        row.update(status=BROKEN, detail=probe_failure or f"every test failed with '{STARTUP_FAILED}'")
        return row
    caught = [o for o in outcomes if o.module == expectation.module and o.outcome == "failed"
              and baseline.get(o.test) == "passed" and names_invariant(o, expectation.invariants)]
    row["caught_by"] = [f"{o.test}: {o.message[:160]}" for o in caught]
    if caught:
        row["status"] = CAUGHT
        return row
    row["status"] = MISSED
    owned = [o for o in outcomes if o.module == expectation.module]
    failures = [o for o in owned if o.outcome == "failed"]
    if not owned:
        row["detail"] = f"no test of {expectation.module} ran"
    elif not failures:
        row["detail"] = f"every test of {expectation.module} passed"
    else:
        row["detail"] = "; ".join(
            f"{o.test} failed " + ("but also fails on the unbroken server" if baseline.get(o.test) != "passed"
                                   else f"naming {o.invariant!r}, not {' or '.join(expectation.invariants)!r}")
            for o in failures)
    return row


def by_module(outcomes: Sequence[Outcome]) -> Dict[str, Dict[str, Any]]:
    """module -> counts of passed and skipped, and the failed tests with the invariant each names."""
    modules: Dict[str, Dict[str, Any]] = {}
    for o in outcomes:
        cell = modules.setdefault(o.module, {"passed": 0, "skipped": 0, "failed": []})
        if o.outcome == "failed":
            cell["failed"].append(f"{o.test.split('::', 1)[1]} ({o.invariant})")
        else:
            cell[o.outcome] += 1
    return modules


def baseline_of(outcomes: Sequence[Outcome]) -> Dict[str, str]:
    return {o.test: o.outcome for o in outcomes}


def timed(function, *args):
    """``function(*args)`` and the seconds it took."""
    start = time.monotonic()
    return function(*args), time.monotonic() - start
