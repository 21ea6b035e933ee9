"""What the plugin reports: header, terminal summary, JSON, junit properties, replay; and under xdist."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from plugin_test_support import literal, run_subprocess, stubborn_command

from pytest_fdcluster import plugin, report, settings

REPORTED_TESTS = """
import pytest


@pytest.fixture
def faker_seed():
    return 4321


def test_two_clusters(fdcluster_factory):
    first = fdcluster_factory.start()
    second = fdcluster_factory.start(workers=3)
    for n in range(6):
        assert first.call("ping", n) == n and second.call("ping", n) == n


def test_fails_after_a_fault(fdcluster, fdcluster_payloads):
    fdcluster.kill_worker(0)
    assert fdcluster_payloads.params() is None, "fails on purpose"
"""

XDIST_TESTS = """
import json, os, pathlib

import pytest

from pytest_fdcluster import wait_until

PORTS = pathlib.Path({ports!r})


@pytest.mark.parametrize("n", range(4))
def test_cluster(fdcluster, n):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    # Written then renamed: the other worker never reads half a file.  gw0-0 is gw0's first test.
    tmp = PORTS / f".{{worker}}.tmp"
    tmp.write_text(json.dumps({{"port": fdcluster.address[1], "test": n}}))
    tmp.replace(PORTS / f"{{worker}}-{{len(list(PORTS.glob(worker + '-*')))}}")
    # Hold this cluster until the other xdist worker has run one too: the first two overlap.
    wait_until(lambda: {{p.name.split("-")[0] for p in PORTS.glob("gw*-*")}} >= {{"gw0", "gw1"}}, 20.0,
               lambda: "a cluster on each xdist worker")
    assert fdcluster.call("ping", n) == n
"""


class TestReport:
    def test_header(self, pytester: pytest.Pytester) -> None:
        result = pytester.runpytest_inprocess()
        result.stdout.fnmatch_lines([plugin.HEADER.format(
            target=plugin.HEADER_TARGET.format(
                target=plugin.HEADER_REFERENCE.format(strategy=settings.BY_NAME["strategy"].default)),
            workers=settings.BY_NAME["workers"].default, timeout=settings.BY_NAME["startup_timeout"].default,
            grace=settings.BY_NAME["grace"].default,
            seed=plugin.HEADER_SEED.format(seed=plugin.DEFAULT_SEED, source=plugin.SEED_FAKER))])

    def test_header_names_an_external_target(self, pytester: pytest.Pytester) -> None:
        command = stubborn_command()
        result = pytester.runpytest_inprocess("--fdcluster-server", command, "--fdcluster-workers", "4")
        result.stdout.fnmatch_lines([f"fdcluster: target {literal(command)}, 4 workers, *"])

    def test_summary_json_junit_and_replay(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(REPORTED_TESTS)
        result = run_subprocess(pytester, "--fdcluster-report", "--fdcluster-report-json", "report.json",
                                "--junitxml", "junit.xml", "--fdcluster-junit-properties", "yes",
                                "-o", "junit_family=xunit1", faker=True)
        result.assert_outcomes(passed=1, failed=1)

        # The failure says how to replay it: the seed, the target, the faults with their times.
        result.stdout.fnmatch_lines([
            f"*{report.REPLAY_TITLE}*",
            report.REPLAY_SEED.format(seed=4321),
            "cluster 1: *fdcluster_server*",
            "  at *.* s: SIGKILL worker pid *",
        ])

        # The summary: one block per cluster, bars per worker, fd counts at start and end.
        result.stdout.fnmatch_lines([
            f"*= {report.SUMMARY_TITLE} =*",
            "test_summary_json_junit_and_replay.py::test_two_clusters [[]cluster 2]: *fdcluster_server*--workers 3*",
            "  127.0.0.1:*, ready in * ms, stopped in * ms, respawns 0",
            "  connections per worker:",
            "    worker 0 *",
            "    worker 1 *",
            "    worker 2 *",
            "  fds (start->end): master *->*, worker 0 *->*",
            "test_summary_json_junit_and_replay.py::test_two_clusters [[]cluster 1]: *",
            "test_summary_json_junit_and_replay.py::test_fails_after_a_fault [[]cluster 1]: *",
            "  127.0.0.1:*, respawns *, payload seed 4321",
        ])

        records = json.loads((pytester.path / "report.json").read_text())["clusters"]
        by_name = {(r["test"].split("::")[1], r["cluster"]): r for r in records}
        assert sorted(by_name) == [("test_fails_after_a_fault", "cluster 1"), ("test_two_clusters", "cluster 1"),
                                   ("test_two_clusters", "cluster 2")]
        second = by_name["test_two_clusters", "cluster 2"]
        assert second["workers"] == 3 and second["reference"] and second["strategy"] == "round-robin"
        assert second["stop"]["clean"] and second["stop"]["returncode"] == 0
        assert sorted(second["connections_per_worker"]) == ["worker 0", "worker 1", "worker 2"]
        assert sum(second["connections_per_worker"].values()) >= 6
        assert list(second["fd_counts"]) == ["master", "worker 0", "worker 1", "worker 2"]
        assert by_name["test_two_clusters", "cluster 1"]["address"] != second["address"]
        failed = by_name["test_fails_after_a_fault", "cluster 1"]
        assert failed["payload_seed"] == 4321
        assert [what for _, what in failed["events"]][0].startswith("SIGKILL worker pid ")

        # junit: the key figures as properties, not the whole record.
        case = ET.parse(pytester.path / "junit.xml").find(".//testcase[@name='test_two_clusters']")
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        for cluster in ("cluster_1", "cluster_2"):
            for figure in ("port", "ready_ms", "stop_ms", "connections_per_worker", "respawns", "clean_stop"):
                assert f"fdcluster.{cluster}.{figure}" in properties
        assert properties["fdcluster.cluster_2.port"] == str(second["address"][1])
        assert properties["fdcluster.cluster_2.clean_stop"] == "True"
        assert report.RECORD_KEY not in properties

    def test_verbose_shows_the_summary(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("def test_one(fdcluster):\n    assert fdcluster.call('ping', 1) == 1\n")
        result = run_subprocess(pytester, "-v")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*= {report.SUMMARY_TITLE} =*", "*::test_one [[]cluster 1]: *"])


class TestXdist:
    def test_two_workers_four_clusters(self, pytester: pytest.Pytester) -> None:
        ports = pytester.mkdir("ports")
        pytester.makepyfile(XDIST_TESTS.format(ports=str(ports)))
        result = run_subprocess(pytester, "-n", "2", "-v", "--fdcluster-report-json", "report.json",
                                "--junitxml", "junit.xml", "-o", "fdcluster_junit_properties=yes")
        result.assert_outcomes(passed=4)

        # The two clusters that ran at the same time, one per xdist worker, had their own ports.
        first = {worker: json.loads((ports / f"{worker}-0").read_text())["port"] for worker in ("gw0", "gw1")}
        assert first["gw0"] != first["gw1"]

        # Every worker's records reached the controller: its summary and its JSON file.
        records = json.loads((pytester.path / "report.json").read_text())["clusters"]
        assert len(records) == 4
        assert {r["xdist_worker"] for r in records} == {"gw0", "gw1"}
        assert sorted(r["test"].split("::")[1] for r in records) == [f"test_cluster[{n}]" for n in range(4)]
        result.stdout.fnmatch_lines([f"*= {report.SUMMARY_TITLE} =*"])
        assert sum(" on gw" in line for line in result.outlines) == 4
        # junit, written by the controller: each test's key figures, not the records that carried them.
        cases = ET.parse(pytester.path / "junit.xml").findall(".//testcase")
        assert len(cases) == 4
        for case in cases:
            names = {p.get("name") for p in case.iter("property")}
            assert "fdcluster.cluster_1.port" in names and report.RECORD_KEY not in names
