"""What the plugin tells the user after the tests: per-cluster figures, JSON, junit properties.

Records are built on the side that ran the test (an xdist worker, possibly)
and travel in the teardown report's ``user_properties``, which xdist ships to
the controller and junitxml writes as properties.  The controller gathers them
for the terminal summary and the JSON file.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Dict, List, Optional

import pytest

from . import checks, observe
from .cluster import Cluster
from .target import StopResult

PLUGIN_NAME = "fdcluster-report"
RECORD_KEY = "fdcluster.record"
PAYLOAD_SEED = pytest.StashKey[Any]()
CLUSTERS = pytest.StashKey[List[Cluster]]()
SUMMARY_TITLE = "fdcluster clusters"


def record_start(item: pytest.Item, cluster: Cluster) -> None:
    """Remember a cluster started by ``item``, for failure sections."""
    item.stash.setdefault(CLUSTERS, []).append(cluster)


def record_stop(item: pytest.Item, cluster: Cluster, result: StopResult) -> Dict[str, Any]:
    """Build the cluster's record and attach it (and key figures) to the item's properties."""
    record = build_record(item.nodeid, cluster, result)
    prefix = f"fdcluster.{cluster.name.replace(' ', '_')}"
    item.user_properties.append((f"{prefix}.ready_ms", round(record["ready_seconds"] * 1000, 1)))
    item.user_properties.append((f"{prefix}.stop_ms", round(record["stop_seconds"] * 1000, 1)))
    if record["connections_per_worker"] is not None:
        item.user_properties.append((f"{prefix}.connections_per_worker", json.dumps(record["connections_per_worker"])))
    if record["respawns"] is not None:
        item.user_properties.append((f"{prefix}.respawns", record["respawns"]))
    item.user_properties.append((RECORD_KEY, json.dumps(record)))
    return record


def build_record(nodeid: str, cluster: Cluster, result: StopResult) -> Dict[str, Any]:
    stats = cluster.final_stats
    per_worker = None
    respawns = None
    if stats:
        per_worker = {observe.worker_label(w["index"]): w.get("accepted", 0) for w in stats["workers"]}
        respawns = stats["master"]["respawns"]
    fd_counts: Dict[str, List[Optional[int]]] = {}
    before = {p.label: p.fd_count for p in cluster.baseline.processes.values()} if cluster.baseline else {}
    after = {p.label: p.fd_count for p in cluster.final.processes.values()} if cluster.final else {}
    for label in sorted(set(before) | set(after), key=_label_order):
        fd_counts[label] = [before.get(label), after.get(label)]
    return {
        "test": nodeid,
        "cluster": cluster.name,
        "target": " ".join(shlex.quote(arg) for arg in cluster.target.argv),
        "reference": cluster.is_reference,
        "strategy": cluster.settings.strategy,
        "workers": cluster.settings.workers,
        "ready_seconds": round(cluster.ready_seconds, 4),
        "stop_seconds": round(result.seconds, 4),
        "stop": {"returncode": result.returncode, "master_killed": result.master_killed,
                 "survivors_killed": list(result.survivors_killed), "remaining": list(result.remaining),
                 "port_released": result.port_released},
        "connections_per_worker": per_worker,
        "fd_counts": fd_counts,
        "respawns": respawns,
        "events": cluster.events,
    }


def _label_order(label: str) -> tuple:
    kind, _, number = label.partition(" ")
    return (kind != observe.MASTER, int(number) if number.isdigit() else 0, label)


def format_record(record: Dict[str, Any]) -> str:
    """The terminal summary block of one cluster."""
    lines = [f"{record['test']} [{record['cluster']}]: {record['target']}",
             f"  ready in {record['ready_seconds'] * 1000:.0f} ms, stopped in {record['stop_seconds'] * 1000:.0f} ms"
             + (", SIGKILL needed" if record["stop"]["master_killed"] else "")
             + (f", respawns {record['respawns']}" if record["respawns"] is not None else "")]
    if record["connections_per_worker"]:
        lines.append("  connections per worker:")
        lines += ["    " + line for line in checks.format_distribution(record["connections_per_worker"]).splitlines()]
    deltas = [f"{label} {b}->{a}" for label, (b, a) in record["fd_counts"].items() if b is not None and a is not None]
    if deltas:
        lines.append("  fds (start->end): " + ", ".join(deltas))
    return "\n".join(lines)


class ClusterReporter:
    """Report hooks, registered by the plugin's ``pytest_configure``."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: List[Dict[str, Any]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Any:
        outcome = yield
        report = outcome.get_result()
        if report.failed and report.when == "call":
            section = replay_section(item)
            if section:
                report.sections.append(("fdcluster: to replay", section))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        for key, value in report.user_properties:
            if key == RECORD_KEY:
                self.records.append(json.loads(value))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.records or not (self.config.getoption("fdcluster_report") or self.config.getoption("verbose") > 0):
            return
        terminalreporter.write_sep("=", SUMMARY_TITLE)
        for record in self.records:
            terminalreporter.write_line(format_record(record))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.config.getoption("fdcluster_report_json")
        if not path or hasattr(self.config, "workerinput"):
            return  # xdist workers ship their records to the controller, which writes the file
        with open(path, "w", encoding="utf-8") as out:
            json.dump({"clusters": self.records}, out, indent=2)


def replay_section(item: pytest.Item) -> str:
    """The seed, the fault schedule and the target command of a failed test."""
    lines = []
    seed = item.stash.get(PAYLOAD_SEED, None)
    if seed is not None:
        lines.append(f"payload seed: {seed!r} (replay with a faker_seed fixture returning it)")
    for cluster in item.stash.get(CLUSTERS, []):
        lines.append(f"{cluster.name}: {' '.join(shlex.quote(arg) for arg in cluster.target.argv)}")
        for at, what in cluster.events:
            lines.append(f"  at {at:.3f} s: {what}")
    return "\n".join(lines)
