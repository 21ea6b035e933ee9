"""The matrix's rules, on made-up outcomes: what counts as caught, missed or broken, and how messages are read."""

from __future__ import annotations

import pytest
from mutant_expectations import EXPECTED, MODULES, SCENARIOS, SMOKE, Expectation, selection
from mutant_runs import BROKEN, CAUGHT, MISSED, Outcome, first_line, judge
from mutant_table import cell, markdown

from pytest_fdcluster.plugin import STARTUP_FAILED

OWNER = Expectation("test_memory", ("bounded memory",))


def failed(test, message):
    return Outcome(test, test.split("::")[0], "failed", message)


def passed(test):
    return Outcome(test, test.split("::")[0], "passed", "")


BASELINE = {"test_memory::test_flood": "passed", "test_quiescence::test_idle": "passed",
            "test_memory::test_flaky": "failed"}


class TestVerdict:
    def test_a_named_failure_of_the_owner_that_passes_unbroken_is_a_catch(self):
        row = judge("v", OWNER, [failed("test_memory::test_flood", "bounded memory: grew 30 MiB")], BASELINE)
        assert row["status"] == CAUGHT and row["caught_by"][0].startswith("test_memory::test_flood")

    def test_the_invariant_may_be_named_inside_the_message(self):
        row = judge("v", OWNER, [failed("test_memory::test_flood", "cluster 1: bounded memory broke")], BASELINE)
        assert row["status"] == CAUGHT

    def test_another_invariant_is_no_catch(self):
        row = judge("v", OWNER, [failed("test_memory::test_flood", "liveness: no answer")], BASELINE)
        assert row["status"] == MISSED and "naming 'liveness'" in row["detail"]

    def test_another_module_is_no_catch(self):
        row = judge("v", OWNER, [failed("test_quiescence::test_idle", "bounded memory: x"),
                                 passed("test_memory::test_flood")], BASELINE)
        assert row["status"] == MISSED and "every test of test_memory passed" in row["detail"]

    def test_a_test_failing_on_the_unbroken_server_is_no_catch(self):
        row = judge("v", OWNER, [failed("test_memory::test_flaky", "bounded memory: x")], BASELINE)
        assert row["status"] == MISSED and "also fails on the unbroken server" in row["detail"]

    def test_a_failed_probe_is_broken_whatever_the_tests_say(self):
        row = judge("v", OWNER, [], BASELINE, probe_failure="no ready line")
        assert row["status"] == BROKEN and row["detail"] == "no ready line"

    def test_every_test_failing_to_start_is_broken(self):
        outcomes = [failed("test_memory::test_flood", f"{STARTUP_FAILED}\nexit 1"),
                    failed("test_quiescence::test_idle", STARTUP_FAILED)]
        assert judge("v", OWNER, outcomes, BASELINE)["status"] == BROKEN


class TestMessages:
    @pytest.mark.parametrize("raw, shown", [
        ("AssertionError: quiescence: over 0.5 s\nassert not [...]", "quiescence: over 0.5 s"),
        ("Failed: graceful stop: exit 4", "graceful stop: exit 4"),
        ("pytest_fdcluster.checks.CheckFailed: fd growth in master: slope 1", "fd growth in master: slope 1"),
        ('failed on setup with "Failed: fdcluster: the cluster did not start', STARTUP_FAILED),
    ])
    def test_first_line_drops_the_exception_and_the_phase(self, raw, shown):
        assert first_line(raw) == shown

    def test_the_invariant_is_the_text_before_the_first_colon(self):
        assert failed("test_memory::t", "bounded memory: grew").invariant == "bounded memory"


class TestSelection:
    def test_modules_are_the_scenario_files(self):
        assert MODULES == sorted(p.stem for p in SCENARIOS.glob("test_*.py")) and MODULES

    def test_every_owner_and_smoke_test_exists(self):
        missing = {e.module for e in EXPECTED.values()} - set(MODULES)
        assert not missing, f"mutation matrix: owners with no scenario module: {missing}"
        for node in SMOKE:
            path, name = node.split("::")
            assert f"def {name}(" in (SCENARIOS.parent / path).read_text(), f"smoke test {node} is gone"

    def test_a_variant_runs_its_owner_and_the_smoke_the_baseline_everything(self):
        assert selection("none", False) == [f"scenarios/{m}.py" for m in MODULES]
        nodes = selection("reads-past-high-water", False)
        assert nodes[0] == "scenarios/test_memory.py" and set(nodes[1:]) == set(SMOKE)
        assert selection("reads-past-high-water", True) == selection("none", False)


def test_table_cells():
    row = {"variant": "v", "owner": "test_memory", "status": CAUGHT,
           "modules": {"test_memory": {"passed": 2, "skipped": 0, "failed": ["t (bounded memory)"]},
                       "test_quiescence": {"passed": 1, "skipped": 0, "failed": []}}}
    assert cell(row, "test_memory") == "FAIL* 1/3"
    assert cell(row, "test_quiescence") == "pass 1"
    assert cell(row, "test_ownership") == "·"
    assert "| v | memory | caught |" in markdown({"v": row})
