"""The fixtures a test uses, and what a user sees when a cluster cannot start.

Each test runs one inner pytest session in a subprocess (clusters fork), with
several inner tests per session to keep the suite fast.
"""

from __future__ import annotations

import sys
import uuid

import psutil
import pytest
from plugin_test_support import INNER_CONFTEST, assert_all_gone, read_records, run_subprocess

from pytest_fdcluster import plugin, report

FIXTURE_TESTS = """
import signal

import psutil
import pytest
from conftest import write_pids

from pytest_fdcluster import ClusterError, process_alive, wait_until

PIDS = {pids!r}


def test_address_client_and_call(fdcluster):
    host, port = fdcluster.address
    assert host == "127.0.0.1" and port > 0
    assert fdcluster.call("ping", [1, "\u00e9\U0001f600"]) == [1, "\u00e9\U0001f600"]
    with fdcluster.client() as client:
        assert client.call("whoami")["pid"] in fdcluster.workers
    assert fdcluster.master not in fdcluster.workers


def test_kill_worker_then_wait_for_the_respawn(fdcluster):
    victim = fdcluster.kill_worker(0)
    workers = fdcluster.wait_for_workers(2, timeout=10, gone=[victim])
    assert victim not in workers
    assert fdcluster.call("ping", "after") == "after"


def test_kill_worker_by_label_with_a_signal(fdcluster):
    victim = fdcluster.kill_worker("worker 1", signal.SIGTERM)
    fdcluster.wait_for_workers(timeout=10, gone=[victim])
    assert not process_alive(victim)


def test_kill_worker_by_pid(fdcluster):
    victim = fdcluster.workers[1]
    assert fdcluster.kill_worker(victim) == victim
    assert victim not in fdcluster.wait_for_workers(timeout=10, gone=[victim])


def test_wait_for_workers_says_what_it_waited_for(fdcluster):
    with pytest.raises(ClusterError, match=r"timed out after 0.2 s waiting for 5 live workers in cluster 1"):
        fdcluster.wait_for_workers(5, timeout=0.2)


def test_pause_and_resume(fdcluster):
    pid = fdcluster.pause_worker(0)
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
    assert fdcluster.resume_worker(pid) == pid
    wait_until(lambda: psutil.Process(pid).status() != psutil.STATUS_STOPPED, 5.0, lambda: f"pid {{pid}} to resume")
    for n in range(4):  # round-robin: the resumed worker answers its share
        assert fdcluster.call("ping", n) == n


def test_a_paused_worker_does_not_stall_teardown(fdcluster):
    fdcluster.pause_worker(1)


def test_factory_starts_clusters_on_different_ports(fdcluster_factory):
    first = fdcluster_factory.start()
    second = fdcluster_factory.start(workers=1)
    assert first.address[1] != second.address[1]
    assert (first.name, second.name) == ("cluster 1", "cluster 2")
    assert first.call("ping", "a") == "a" and second.call("ping", "b") == "b"
    assert len(second.workers) == 1 and not set(first.workers) & set(second.workers)
    assert fdcluster_factory.clusters == [first, second]
    write_pids(PIDS, first, second)


def test_fdcluster_and_factory_together(fdcluster, fdcluster_factory):
    other = fdcluster_factory.start()
    assert other.address != fdcluster.address and other.name == "cluster 2"


def test_snapshot_labels(fdcluster):
    snapshot = fdcluster.snapshot()
    assert [view.label for view in snapshot.processes.values()] == ["master", "worker 0", "worker 1"]
    assert snapshot.master.pid == fdcluster.master
    assert sorted(view.pid for view in snapshot.workers) == sorted(fdcluster.workers)
    assert snapshot.master.listening, "the master holds the listening socket"
"""

PAYLOAD_TESTS = """
import pytest

from pytest_fdcluster.payloads import Payloads


@pytest.fixture
def faker_seed():
    return 4321


def test_payloads_are_seeded_by_faker_seed(fdcluster, fdcluster_payloads, faker):
    assert fdcluster_payloads.seed == 4321
    replay = Payloads(4321)
    for _ in range(5):
        params = fdcluster_payloads.params()
        assert params == replay.params()
        assert fdcluster.call("ping", params) == params
"""


class TestFixtures:
    def test_fixtures(self, pytester: pytest.Pytester) -> None:
        pids = pytester.path / "factory-pids.json"
        pytester.makeconftest(INNER_CONFTEST)
        pytester.makepyfile(FIXTURE_TESTS.format(pids=str(pids)))
        result = run_subprocess(pytester)
        result.assert_outcomes(passed=10)
        # Both of the factory's clusters were stopped at the end of their test.
        assert_all_gone(read_records(pids), "the factory's clusters")
        # No -v and no --fdcluster-report: no summary.
        result.stdout.no_fnmatch_line(f"*{report.SUMMARY_TITLE}*")

    def test_payloads(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(PAYLOAD_TESTS)
        result = run_subprocess(pytester, faker=True)
        result.assert_outcomes(passed=1)


class TestStartupFailures:
    def test_exit_timeout_and_missing_command(self, pytester: pytest.Pytester) -> None:
        # A token in the never-ready target's command line, to find it if it outlived its start-up.
        token = f"never-ready-{uuid.uuid4().hex}"
        exits = [sys.executable, "-c",
                 "import sys; sys.stderr.write('fake-target: unknown flag --frobnicate\\nusage: fake-target PORT\\n');"
                 " sys.exit(2)", "{port}"]
        never_ready = [sys.executable, "-c", f"import signal  # {token}\nsignal.pause()", "{port}"]
        pytester.makepyfile(f"""
            import pytest

            @pytest.mark.fdcluster(server={exits!r})
            def test_exits(fdcluster):
                pass

            @pytest.mark.fdcluster(server={never_ready!r}, startup_timeout=0.5)
            def test_never_ready(fdcluster):
                pass

            @pytest.mark.fdcluster(server=["/nonexistent/fdcluster-target", "{{port}}"])
            def test_missing_command(fdcluster):
                pass
        """)
        result = run_subprocess(pytester)
        result.assert_outcomes(errors=3)
        result.stdout.fnmatch_lines([
            "*ERROR at setup of test_exits*",
            f"*{plugin.STARTUP_FAILED}",
            "*fdcluster target failed to start: exited with status 2 after *",
            f"*  command: {sys.executable} -c *sys.exit(2)* [0-9]*",
            "*  last stderr lines:",
            "*    fake-target: unknown flag --frobnicate",
            "*    usage: fake-target PORT",
        ])
        result.stdout.fnmatch_lines([
            "*ERROR at setup of test_never_ready*",
            f"*{plugin.STARTUP_FAILED}",
            "*fdcluster target failed to start: did not become ready within 0.5 s: port * not accepting*",
            f"*  command: {sys.executable} -c *{token}*",
        ])
        result.stdout.fnmatch_lines([
            "*ERROR at setup of test_missing_command*",
            f"*{plugin.STARTUP_FAILED}",
            "*fdcluster target failed to start: cannot run it: *No such file or directory*",
        ])
        # Said once in the error report: not repeated as a chained exception.  (The short
        # summary may repeat it: under CI=true pytest does not truncate its lines.)
        report = result.outlines[: next(i for i, line in enumerate(result.outlines) if "short test summary" in line)]
        assert sum("exited with status 2" in line for line in report) == 1
        leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or ())]
        assert leftovers == [], f"the never-ready target outlived its start-up: {leftovers}"
