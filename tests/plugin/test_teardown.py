"""Nothing of a cluster outlives its test, nor pytest: failures, Ctrl-C, SIGKILL, timeouts.

The inner pytest that is interrupted or killed is started with ``Popen`` in
its own session; its test records its cluster's processes and blocks (at
most 60 s).  The outer test also records every descendant of the inner
pytest (the orphan guard included) before it strikes, then waits (at most
``DEADLINE``) until none of them is alive.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import SimpleNamespace
from typing import List, Sequence

import psutil
import pytest
from plugin_test_support import (
    DEADLINE,
    INNER_CONFTEST,
    ProcessRecord,
    Reaper,
    assert_all_gone,
    literal,
    needs_node,
    node_command,
    read_records,
    run_subprocess,
    stubborn_command,
)

from pytest_fdcluster import plugin, report, target, wait_until
from pytest_fdcluster.target import StopResult

#: Bound on an inner pytest's start-up until its cluster runs, and on its exit after Ctrl-C.
INNER_DEADLINE = 30.0

BLOCKING_TEST = """
import threading

from conftest import write_pids


def test_blocks(fdcluster):
    write_pids({pids!r}, fdcluster)
    threading.Event().wait(60)
"""

TARGETS = [
    pytest.param([], id="reference server"),
    pytest.param(["--fdcluster-server", stubborn_command(), "--fdcluster-grace", "0.2"], id="SIGTERM-ignoring target"),
    pytest.param(["--fdcluster-server", node_command()], id="node target", marks=needs_node),
]


def start_blocking_run(pytester: pytest.Pytester, reaper: Reaper, args: Sequence[str]) -> subprocess.Popen:
    """Start an inner pytest whose test blocks with a running cluster; return once the cluster runs."""
    pids = pytester.path / "pids.json"
    pytester.makeconftest(INNER_CONFTEST)
    test_file = pytester.makepyfile(BLOCKING_TEST.format(pids=str(pids)))
    with open(pytester.path / "inner.log", "wb") as log:
        proc = reaper.popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:faker",
                             str(test_file), *args], cwd=pytester.path, stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: pids.exists() or proc.poll() is not None, INNER_DEADLINE,
               lambda: f"the inner test to record its cluster; its output:\n{inner_log(pytester)}")
    assert proc.poll() is None, f"the inner pytest exited early:\n{inner_log(pytester)}"
    return proc


def inner_log(pytester: pytest.Pytester) -> str:
    return (pytester.path / "inner.log").read_text(errors="replace")


def everything_of(pytester: pytest.Pytester, reaper: Reaper, proc: subprocess.Popen) -> List[ProcessRecord]:
    """The cluster's recorded processes and every descendant of the inner pytest, all tracked."""
    descendants = psutil.Process(proc.pid).children(recursive=True)
    reaper.track_processes(descendants)
    records = read_records(pytester.path / "pids.json")
    reaper.track_records(records)
    records += [(child.pid, child.create_time()) for child in descendants]
    return records


class TestTeardown:
    def test_a_failing_tests_cluster_is_torn_down(self, pytester: pytest.Pytester) -> None:
        pids = pytester.path / "pids.json"
        pytester.makeconftest(INNER_CONFTEST)
        pytester.makepyfile(f"""
            from conftest import write_pids

            def test_fails(fdcluster):
                write_pids({str(pids)!r}, fdcluster)
                assert fdcluster.call("ping", 1) == 2
        """)
        result = run_subprocess(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([f"*{report.REPLAY_TITLE}*", "cluster 1: *fdcluster_server*"])
        assert_all_gone(read_records(pids), "the failed test's cluster")

    @pytest.mark.parametrize("args", TARGETS)
    def test_sigkill_of_pytest_leaves_nothing_behind(self, pytester: pytest.Pytester, reaper: Reaper,
                                                     args: List[str]) -> None:
        proc = start_blocking_run(pytester, reaper, args)
        records = everything_of(pytester, reaper, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE)
        assert_all_gone(records, "every process the SIGKILLed pytest started")

    # The SIGTERM-ignoring target's stop is not graceful: after Ctrl-C the plugin must not raise that
    # (a teardown error then crashes pytest's session finish: exit 1 and a raw traceback).
    @pytest.mark.parametrize("args", TARGETS[:2])
    def test_ctrl_c_tears_down(self, pytester: pytest.Pytester, reaper: Reaper, args: List[str]) -> None:
        proc = start_blocking_run(pytester, reaper, args)
        records = everything_of(pytester, reaper, proc)
        proc.send_signal(signal.SIGINT)
        try:
            returncode = proc.wait(INNER_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pytest did not exit after Ctrl-C; its output:\n{inner_log(pytester)}")
        assert returncode == pytest.ExitCode.INTERRUPTED, inner_log(pytester)
        assert "KeyboardInterrupt" in inner_log(pytester)
        assert_all_gone(records, "every process the interrupted pytest started")

    @pytest.mark.parametrize("method", ["signal", "thread"])
    def test_pytest_timeout_tears_down(self, pytester: pytest.Pytester, method: str) -> None:
        pytest.importorskip("pytest_timeout", reason="pytest-timeout is not installed")
        pids = pytester.path / "pids.json"
        pytester.makeconftest(INNER_CONFTEST)
        pytester.makepyfile(BLOCKING_TEST.format(pids=str(pids)))
        result = run_subprocess(pytester, "--timeout", "2", "--timeout-method", method)
        assert result.ret != 0
        result.stdout.fnmatch_lines(["*Timeout*"])
        assert_all_gone(read_records(pids), f"the cluster of a test timed out by pytest-timeout ({method})")

    def test_teardown_errors_name_what_was_left(self, pytester: pytest.Pytester, reaper: Reaper) -> None:
        escaped = pytester.path / "escaped.pid"
        pids = pytester.path / "pids.json"
        pytester.makeconftest(INNER_CONFTEST)
        # It exits 0 on SIGTERM, so the port its escaped daemon keeps is the only fault.
        server = stubborn_command("--escape", str(escaped), "--term-exit", "0")
        pytester.makepyfile(f"""
            import dataclasses

            import pytest
            import pytest_fdcluster.target
            from conftest import write_pids

            # The escaped listener never lets the port go: do not wait the full 5 s for it.
            pytest_fdcluster.target.SETTLE_TIMEOUT = 0.5

            @pytest.mark.fdcluster(server={server!r}, workers=1, grace=0.1)
            def test_escaped_listener_keeps_the_port(fdcluster):
                assert fdcluster.call("ping", 1) == 1

            def test_survivor(monkeypatch, fdcluster):
                real_stop = fdcluster.target.stop

                def stop_reporting_a_survivor(grace=None):
                    return dataclasses.replace(real_stop(grace), remaining=(424242,))

                monkeypatch.setattr(fdcluster.target, "stop", stop_reporting_a_survivor)

            def test_one_stop_raises(monkeypatch, fdcluster_factory):
                first, second = fdcluster_factory.start(), fdcluster_factory.start()
                write_pids({str(pids)!r}, first, second)
                real_stop = second.stop

                def stop_then_raise():
                    real_stop()
                    raise RuntimeError("stop failed on purpose")

                monkeypatch.setattr(second, "stop", stop_then_raise)
        """)
        try:
            result = run_subprocess(pytester)
        finally:
            if escaped.exists():
                daemon = psutil.Process(int(escaped.read_text()))
                if "stubborn_target.py" in " ".join(daemon.cmdline()):
                    reaper.track_processes([daemon])
        result.assert_outcomes(passed=3, errors=3)
        result.stdout.fnmatch_lines([
            "*ERROR at teardown of test_escaped_listener_keeps_the_port*",
            plugin.TEARDOWN_UNCLEAN,
            plugin.LEFT_PORT.format(cluster="cluster 1 (*stubborn_target.py*)", host="127.0.0.1", port="*"),
        ])
        result.stdout.fnmatch_lines([
            "*ERROR at teardown of test_survivor*",
            plugin.TEARDOWN_UNCLEAN,
            plugin.LEFT_PIDS.format(cluster="cluster 1 (*fdcluster_server*)", pids=literal("[424242]")),
        ])
        result.stdout.fnmatch_lines([
            "*ERROR at teardown of test_one_stop_raises*",
            "*RuntimeError: stop failed on purpose",
        ])
        # The other cluster was stopped all the same.
        assert_all_gone(read_records(pids), "both clusters of the test whose second stop raised")

    def test_a_stop_that_is_not_graceful_fails_the_teardown(self, pytester: pytest.Pytester) -> None:
        ignores = stubborn_command()
        exits_1 = stubborn_command("--term-exit", "1")
        pytester.makepyfile(f"""
            import signal

            import pytest

            @pytest.mark.fdcluster(server={ignores!r}, workers=1, grace=0.2)
            def test_ignores_sigterm(fdcluster):
                assert fdcluster.call("ping", 1) == 1

            @pytest.mark.fdcluster(server={exits_1!r}, workers=1)
            def test_exits_1_on_sigterm(fdcluster):
                assert fdcluster.call("ping", 1) == 1

            @pytest.mark.fdcluster(server={ignores!r}, workers=1, grace=0.2)
            def test_the_test_signalled_the_master(fdcluster):
                fdcluster.kill_master(signal.SIGTERM)  # ignored: the test's choice, not the target's fault

            def test_the_reference_server_stops_gracefully(fdcluster):
                assert fdcluster.call("ping", 1) == 1
        """)
        result = run_subprocess(pytester)
        result.assert_outcomes(passed=4, errors=2)
        result.stdout.fnmatch_lines([
            "*ERROR at teardown of test_ignores_sigterm*",
            "*GracefulStopError: cluster 1: " + target.GRACEFUL_SIGKILLED.format(pid="*", grace=0.2),
        ])
        result.stdout.fnmatch_lines([
            "*ERROR at teardown of test_exits_1_on_sigterm*",
            "*GracefulStopError: cluster 1: " + target.GRACEFUL_STATUS.format(pid="*", status=1),
        ])
        result.stdout.no_fnmatch_line("*ERROR at teardown of test_the_*")

    def test_unclean_teardown_lines(self) -> None:
        cluster = SimpleNamespace(name="cluster 1", target=SimpleNamespace(argv=["srv", "--port", "5"]),
                                  address=("127.0.0.1", 5))
        result = StopResult(returncode=-9, exited_before_stop=False, master_killed=True, survivors_killed=(7,),
                            remaining=(7, 8), port_released=False, seconds=1.0)
        name = "cluster 1 (srv --port 5)"
        assert plugin.unclean_teardown(cluster, result) == [
            plugin.LEFT_PIDS.format(cluster=name, pids=[7, 8]),
            plugin.LEFT_PORT.format(cluster=name, host="127.0.0.1", port=5),
        ]
        clean = StopResult(returncode=0, exited_before_stop=False, master_killed=False, survivors_killed=(),
                           remaining=(), port_released=True, seconds=0.1)
        assert plugin.unclean_teardown(cluster, clean) == []
