"""The payload seed the header names, and junit testcase properties only when asked."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from plugin_test_support import literal, run_subprocess

from pytest_fdcluster import plugin, report

#: A stand-in with pytest-randomly's plugin name and option (pytest-randomly itself is not a dependency).
RANDOMLY_STAND_IN = """
def pytest_addoption(parser):
    parser.addoption("--randomly-seed", dest="randomly_seed", type=int, default=None)
"""

PAYLOAD_TESTS = """
import pytest


@pytest.fixture
def faker_seed():
    return 4321


def test_payloads(fdcluster_payloads):
    assert fdcluster_payloads.seed == 4321
"""


def seed_line(seed: object, source: str) -> str:
    return "fdcluster: *; payload seed " + literal(plugin.HEADER_SEED.format(seed=seed, source=source))


class TestSeed:
    def test_fakers_default(self, pytester: pytest.Pytester) -> None:
        result = pytester.runpytest_inprocess("--collect-only")
        result.stdout.fnmatch_lines([seed_line(0, plugin.SEED_FAKER)])

    def test_pytest_randomly_seed(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(randomly=RANDOMLY_STAND_IN)
        pytester.syspathinsert()
        result = pytester.runpytest_inprocess("-p", "randomly", "--randomly-seed", "98765", "--collect-only")
        result.stdout.fnmatch_lines([seed_line(98765, plugin.SEED_RANDOMLY)])

    def test_a_tests_own_faker_seed_is_per_test(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(test_payloads=PAYLOAD_TESTS)
        result = pytester.runpytest_inprocess("-p", "faker")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([literal(plugin.SEED_PER_TEST.format(where="test_payloads.py",
                                                                         replay=report.REPLAY_TITLE))])

    def test_no_per_test_line_without_payloads(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("def test_plain():\n    pass\n")
        result = pytester.runpytest_inprocess()
        assert not [line for line in result.outlines if "payload seed per test" in line]


class TestJunitProperties:
    @pytest.mark.parametrize(("args", "expected"), [
        ((), False),
        (("--fdcluster-junit-properties", "yes", "-o", "junit_family=xunit1"), True),
        (("-o", "fdcluster_junit_properties=on", "-o", "junit_family=xunit1"), True),
    ], ids=["default off", "command line", "ini"])
    def test_opt_in(self, pytester: pytest.Pytester, args: tuple, expected: bool) -> None:
        pytester.makepyfile("def test_one(fdcluster):\n    assert fdcluster.call('ping', 1) == 1\n")
        result = run_subprocess(pytester, "--junitxml", "junit.xml", *args)
        result.assert_outcomes(passed=1)
        case = ET.parse(pytester.path / "junit.xml").find(".//testcase[@name='test_one']")
        names = {p.get("name") for p in case.iter("property")}
        assert ("fdcluster.cluster_1.port" in names) == expected
        assert report.RECORD_KEY not in names and report.TARGET_KEY not in names
