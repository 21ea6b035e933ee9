"""What the plugin tells the user after the tests: per-cluster figures, the target matrix, JSON, junit properties.

Records are built on the side that ran the test (an xdist worker, possibly)
and travel in the reports' ``user_properties``, which xdist ships to the
controller: each cluster's record, the test's target, and the invariant a
failure names.  The process that consumes the reports (the controller, or the
only process without xdist) takes them out of the properties before junitxml
sees them, so junit gets only the key figures, and those only when asked
(``--fdcluster-junit-properties``: pytest's default xunit2 family does not
allow testcase properties); it gathers the records for the terminal summary
and the JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, cast

import pytest

from . import checks, observe
from .cluster import Cluster
from .matrix import MATRIX_TITLE, Matrix, invariant_of
from .target import StopResult
from .text import label_order, shell_join

PLUGIN_NAME = "fdcluster-report"
HELP_REPORT = "show per-cluster figures in the terminal summary"
HELP_REPORT_JSON = "write per-cluster figures and the target-by-module matrix as JSON to this path"
RECORD_KEY = "fdcluster.record"
#: The name of the target a test ran against, set by the plugin's fixtures; and the invariant its failure names.
TARGET_KEY = "fdcluster.target"
INVARIANT_KEY = "fdcluster.invariant"
#: Only the key figures reach junit, and only when asked.
PROPERTY_PREFIX = "fdcluster."
PAYLOAD_SEED = pytest.StashKey[Any]()
CLUSTERS = pytest.StashKey[List[Cluster]]()
SUMMARY_TITLE = "fdcluster clusters"
REPLAY_TITLE = "fdcluster: to replay"
REPLAY_SEED = "payload seed: {seed!r} (replay with a faker_seed fixture returning it)"


def record_start(item: pytest.Item, cluster: Cluster) -> None:
    """Remember a cluster started by ``item``, for failure sections."""
    item.stash.setdefault(CLUSTERS, []).append(cluster)


def record_stop(item: pytest.Item, cluster: Cluster, result: StopResult) -> Dict[str, Any]:
    """Build the cluster's record and attach it (and key figures) to the item's properties."""
    worker = getattr(item.config, "workerinput", {}).get("workerid")
    record = build_record(item.nodeid, cluster, result, seed=item.stash.get(PAYLOAD_SEED, None), xdist_worker=worker)
    prefix = f"fdcluster.{cluster.name.replace(' ', '_')}"
    item.user_properties.append((f"{prefix}.port", record["address"][1]))
    item.user_properties.append((f"{prefix}.ready_ms", round(record["ready_seconds"] * 1000, 1)))
    item.user_properties.append((f"{prefix}.stop_ms", round(record["stop_seconds"] * 1000, 1)))
    if record["connections_per_worker"] is not None:
        item.user_properties.append((f"{prefix}.connections_per_worker", json.dumps(record["connections_per_worker"])))
    if record["respawns"] is not None:
        item.user_properties.append((f"{prefix}.respawns", record["respawns"]))
    item.user_properties.append((f"{prefix}.clean_stop", record["stop"]["clean"]))
    item.user_properties.append((RECORD_KEY, json.dumps(record, default=repr)))
    return record


def build_record(
    nodeid: str, cluster: Cluster, result: StopResult, seed: Any = None, xdist_worker: Optional[str] = None
) -> Dict[str, Any]:
    """The JSON-ready figures of one stopped cluster."""
    stats = cluster.final_stats
    per_worker = None
    respawns = None
    if stats:
        per_worker = {observe.worker_label(w["index"]): w.get("accepted", 0) for w in stats["workers"]}
        respawns = stats["master"]["respawns"]
    fd_counts: Dict[str, List[Optional[int]]] = {}
    before = {p.label: p.fd_count for p in cluster.baseline.processes.values()} if cluster.baseline else {}
    after = {p.label: p.fd_count for p in cluster.final.processes.values()} if cluster.final else {}
    for label in sorted(set(before) | set(after), key=label_order):
        fd_counts[label] = [before.get(label), after.get(label)]
    return {
        "test": nodeid,
        "cluster": cluster.name,
        "target": shell_join(cluster.target.argv),
        "address": list(cluster.address),
        "xdist_worker": xdist_worker,
        "payload_seed": seed if seed is None or isinstance(seed, (int, float, str)) else repr(seed),
        "reference": cluster.is_reference,
        "target_name": cluster.settings.target,
        "capabilities": dataclasses.asdict(cluster.settings.capabilities),
        "strategy": cluster.settings.strategy,
        "workers": cluster.settings.workers,
        "ready_seconds": round(cluster.ready_seconds, 4),
        "stop_seconds": round(result.seconds, 4),
        "stop": {"returncode": result.returncode, "master_killed": result.master_killed,
                 "survivors_killed": list(result.survivors_killed), "remaining": list(result.remaining),
                 "port_released": result.port_released, "nothing_left": result.nothing_left,
                 "graceful_failure": result.graceful_failure, "clean": result.clean},
        "connections_per_worker": per_worker,
        "fd_counts": fd_counts,
        "respawns": respawns,
        "events": cluster.events,
    }


def format_record(record: Dict[str, Any]) -> str:
    """The terminal summary block of one cluster."""
    stop = record["stop"]
    host, port = record["address"]
    lines = [f"{record['test']} [{record['cluster']}]: {record['target']}",
             f"  {host}:{port}" + (f" on {record['xdist_worker']}" if record.get("xdist_worker") else "")
             + f", ready in {record['ready_seconds'] * 1000:.0f} ms, stopped in {record['stop_seconds'] * 1000:.0f} ms"
             + (", SIGKILL needed" if stop["master_killed"] or stop["survivors_killed"] else "")
             + ("" if stop.get("nothing_left", True) else ", LEFT SOMETHING BEHIND")
             + (f", {stop['graceful_failure']}" if stop.get("graceful_failure") else "")
             + (f", respawns {record['respawns']}" if record["respawns"] is not None else "")
             + (f", payload seed {record['payload_seed']!r}" if record.get("payload_seed") is not None else "")]
    if record["connections_per_worker"]:
        lines.append("  connections per worker:")
        lines += ["    " + line for line in checks.format_distribution(record["connections_per_worker"]).splitlines()]
    deltas = [f"{label} {b}->{a}" for label, (b, a) in record["fd_counts"].items() if b is not None and a is not None]
    if deltas:
        lines.append("  fds (start->end): " + ", ".join(deltas))
    return "\n".join(lines)


class ClusterReporter:
    """Report hooks, registered by the plugin's ``pytest_configure``."""

    def __init__(self, config: pytest.Config, junit_properties: bool = False) -> None:
        self.config = config
        self.junit_properties = junit_properties
        self.records: List[Dict[str, Any]] = []
        self.matrix = Matrix()

    @pytest.hookimpl(hookwrapper=True)  # old style on purpose: new-style wrappers need pluggy 1.1
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Any:
        outcome = yield
        report = outcome.get_result()
        if report.failed and report.when in ("setup", "call"):
            section = replay_section(item)
            if section:
                report.sections.append((REPLAY_TITLE, section))
        if report.failed and call.excinfo is not None and any(key == TARGET_KEY for key, _ in item.user_properties):
            # Named here, where the exception is at hand; the controller only sees its text.
            invariant = invariant_of(str(call.excinfo.value), call.excinfo.typename)
            report.user_properties.append((INVARIANT_KEY, invariant))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if hasattr(self.config, "workerinput"):
            return  # an xdist worker leaves the records in place: they travel to the controller
        properties = dict(report.user_properties)
        if TARGET_KEY in properties:
            outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
            invariant = properties.get(INVARIANT_KEY)
            self.matrix.add(report.nodeid, str(properties[TARGET_KEY]), outcome,
                            None if invariant is None else str(invariant))
        kept = []
        for key, value in report.user_properties:
            if key == RECORD_KEY and report.when == "teardown":
                self.records.append(json.loads(cast(str, value)))  # record_stop wrote it with json.dumps
            elif key.startswith(PROPERTY_PREFIX) and (key in (RECORD_KEY, TARGET_KEY, INVARIANT_KEY)
                                                      or not self.junit_properties):
                continue
            else:
                kept.append((key, value))
        # tryfirst: junitxml, which runs after us, writes only the key figures, and only when asked.
        report.user_properties = kept

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        asked = self.config.getoption("fdcluster_report") or self.config.getoption("verbose") > 0
        if self.matrix.tests and (asked or len(self.matrix.targets) > 1):
            terminalreporter.write_sep("=", MATRIX_TITLE)
            terminalreporter.write_line(self.matrix.format())
        if not self.records or not asked:
            return
        terminalreporter.write_sep("=", SUMMARY_TITLE)
        for record in self.records:
            terminalreporter.write_line(format_record(record))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.config.getoption("fdcluster_report_json")
        if not path or hasattr(self.config, "workerinput"):
            return  # xdist workers ship their records to the controller, which writes the file
        # Relative to where pytest was invoked, like --junitxml, whatever the tests did to the cwd.
        path = os.path.join(self.config.invocation_params.dir, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            json.dump({"clusters": self.records, "matrix": self.matrix.as_json()}, out, indent=2, default=repr)


def replay_section(item: pytest.Item) -> str:
    """The seed, the fault schedule and the target command of a failed test."""
    lines = []
    seed = item.stash.get(PAYLOAD_SEED, None)
    if seed is not None:
        lines.append(REPLAY_SEED.format(seed=seed))
    for cluster in item.stash.get(CLUSTERS, []):
        lines.append(f"{cluster.name}: {shell_join(cluster.target.argv)}")
        for at, what in cluster.events:
            lines.append(f"  at {at:.3f} s: {what}")
    return "\n".join(lines)
