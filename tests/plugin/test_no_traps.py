"""What a new user meets first: the README's kill-and-wait test under xdist, short tracebacks, live logs, blind checks.

Each test runs an inner pytest in a subprocess (clusters fork) and asserts
the lines the user reads, built from the package's own message constants.
"""

from __future__ import annotations

import pytest
from plugin_test_support import run_subprocess

from pytest_fdcluster import observe

#: How many copies of the user's first test run side by side under ``-n 2``.
COPIES = 6

USERS_FIRST_TEST = """
def test_kill_and_wait_{n}(fdcluster):
    victim = fdcluster.kill_worker(0)
    fdcluster.wait_for_workers(2)
    assert victim not in fdcluster.workers
"""


class TestKillAndWait:
    def test_the_users_first_test_passes_under_xdist(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(**{
            f"test_copy_{file}": "".join(USERS_FIRST_TEST.format(n=n) for n in range(COPIES // 2))
            for file in range(2)
        })
        result = run_subprocess(pytester, "-n", "2", "--fdcluster-workers", "2")
        result.assert_outcomes(passed=COPIES)


HIDDEN_HELPERS = """
from pytest_fdcluster import assert_round_robin


def test_round_robin(fdcluster):
    assert_round_robin({"worker 0": 9, "worker 1": 1})  # USER LINE round robin


def test_wait_for_workers(fdcluster):
    fdcluster.wait_for_workers(5, timeout=0.2)  # USER LINE wait


def test_kill_worker(fdcluster):
    fdcluster.kill_worker(99)  # USER LINE kill
"""


class TestTracebacks:
    def test_a_failure_points_at_the_users_line_not_the_helpers_body(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(HIDDEN_HELPERS)
        result = run_subprocess(pytester, "--tb=long", "--fdcluster-workers", "1")
        result.assert_outcomes(failed=3)
        result.stdout.fnmatch_lines([
            ">*assert_round_robin(*# USER LINE round robin",
            "E*FairnessError: round-robin: spread 8 exceeds 1*",
            ">*fdcluster.wait_for_workers(5, timeout=0.2)  # USER LINE wait",
            "E*ClusterError: timed out after 0.2 s waiting for 5 live workers in cluster 1*",
            ">*fdcluster.kill_worker(99)  # USER LINE kill",
            "E*ClusterError: 99 is neither a worker pid nor an index*",
        ])
        # No frame of the helpers: not their source lines, not their file locations.
        for helper in ("checks.py", "cluster.py", "polling.py"):
            result.stdout.no_fnmatch_line(f"*pytest_fdcluster/{helper}:*")
        result.stdout.no_fnmatch_line("*raise FairnessError(*")
        result.stdout.no_fnmatch_line("*return wait_until(settled*")


LOGGED_FAULTS = """
def test_faults_are_logged(fdcluster):
    victim = fdcluster.kill_worker(0)
    fdcluster.pause_worker(0)
    fdcluster.resume_worker()
    assert victim == "the test fails on purpose, to show its captured log"
"""


class TestLogging:
    def test_live_and_captured_logs_tell_what_happened(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(LOGGED_FAULTS)
        result = run_subprocess(pytester, "--log-cli-level=INFO", "--fdcluster-workers", "2")
        result.assert_outcomes(failed=1)
        # Live, in order: start, each fault, the stop.
        result.stdout.fnmatch_lines([
            "*live log setup*",
            "INFO *fdcluster.cluster*cluster 1 started: master pid *, workers [[]*, *], 127.0.0.1:*, ready in *s",
            "*live log call*",
            "INFO *fdcluster.cluster*cluster 1: SIGKILL worker pid *",
            "INFO *fdcluster.cluster*cluster 1: SIGSTOP worker pid * (paused)",
            "INFO *fdcluster.cluster*cluster 1: SIGCONT worker pid * (resumed)",
            "*live log teardown*",
            "INFO *fdcluster.cluster*cluster 1: stopped in * s: master exited 0 after SIGTERM",
        ])
        # And the failed test carries them in its report.
        result.stdout.fnmatch_lines([
            "*Captured log setup*",
            "INFO *cluster 1 started: master pid *",
            "*Captured log call*",
            "INFO *cluster 1: SIGKILL worker pid *",
        ])


BLIND_TESTS = """
import pytest

from pytest_fdcluster import assert_no_close_wait
from pytest_fdcluster.observe import ProcessView, Snapshot


def unreadable(blind):
    master = ProcessView(4242, 1, "master", "srv", {}, fds_visible=False, user="postgres",
                         fds_error="PermissionError reading /proc/4242/fd", blind=blind)
    return Snapshot(4242, {4242: master})


@pytest.mark.parametrize("blind", ["fail", "skip"])
def test_blind(blind):
    assert_no_close_wait(unreadable(blind))
"""


class TestBlindChecks:
    """How pytest reports a blind check (the real unreadable process is in tests/integration/test_cluster_api.py)."""

    def test_a_blind_check_fails_or_skips_and_says_why(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(BLIND_TESTS)
        result = run_subprocess(pytester, "-rs")
        result.assert_outcomes(failed=1, skipped=1)
        seen = dict(process="master", pid=4242, user="postgres", reason="PermissionError reading /proc/4242/fd",
                    option=observe.BLIND_OPTION)
        result.stdout.fnmatch_lines([
            "*test_blind?fail?*",
            "E*ObservationError: " + observe.BLIND_FAILED.format(**seen),
        ])
        result.stdout.fnmatch_lines(["SKIPPED*" + observe.BLIND_SKIPPED.format(**seen)])
