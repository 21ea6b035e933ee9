"""Several targets in one run: naming, test ids per target, the target-by-module matrix (also under xdist).

Runs that only resolve settings stay in process; anything that starts a
cluster runs pytest in a subprocess.
"""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from plugin_test_support import literal, run_subprocess

from pytest_fdcluster import matrix, plugin, settings, targets

#: A second target that is fast to start: the reference server run as an external command.
OTHER = shlex.join([sys.executable, "-m", "fdcluster_server", "--port", "{port}", "--workers", "{workers}"])
TWO_TARGETS = ("--fdcluster-server", "reference", "--fdcluster-server", f"other={OTHER}")

MATRIX_TESTS = """
import pytest


def test_ping(fdcluster):
    assert fdcluster.call("ping", 1) == 1


@pytest.mark.parametrize("n", [1, 2])
def test_kept_parametrization(fdcluster_factory, n):
    assert fdcluster_factory.start().call("ping", n) == n


def test_fails_on_other(fdcluster, fdcluster_target):
    assert fdcluster_target != "other", "exactly one holder: failed on purpose on other"


def test_no_cluster():
    pass
"""


class TestNaming:
    @pytest.mark.parametrize(("command", "name"), [
        ("node tests/targets/node_handoff_server.js --port {port}", "node_handoff_server"),
        ("python -m fdcluster_server --port {port}", "fdcluster_server"),
        ("python3.11 -u server/app.py {port}", "app"),
        ("/usr/local/bin/my-server --port {port}", "my-server"),
    ])
    def test_a_bare_command_is_named_from_its_script(self, command: str, name: str) -> None:
        assert targets.name_from_command(shlex.split(command)) == name

    def test_names_are_unique_and_reference_is_the_bundled_server(self) -> None:
        parsed = targets.parse_targets(
            ["reference", "node a/srv.js {port}", "node b/srv.js {port}", "mine=reference", "x=srv --port {port}"],
            "--fdcluster-server")
        assert [t.name for t in parsed] == ["reference", "srv", "srv-2", "mine", "x"]
        assert [t.is_reference for t in parsed] == [True, False, False, True, False]
        assert parsed[4].command == ("srv", "--port", "{port}")

    def test_one_ini_line_per_target(self) -> None:
        resolved = settings.resolve_all({}.get, {"fdcluster_server": ["reference", "b=srv {port}"]}.get, "tox.ini")
        assert list(resolved) == ["reference", "b"]
        assert resolved["reference"].is_reference and resolved["b"].command == ("srv", "{port}")


class TestUsageErrors:
    @pytest.mark.parametrize(("args", "ini", "problem"), [
        (["--fdcluster-server", "a=srv", "--fdcluster-server", "a=other"], "",
         "Invalid server 'a' from --fdcluster-server: two targets are named 'a'"),
        (["--fdcluster-server", "srv 'unclosed"], "",
         "Invalid server \"srv 'unclosed\" from --fdcluster-server: cannot split it like a shell: *"),
        ([], "fdcluster_server =\n    reference\n    srv 'unclosed\n",
         "Invalid server \"srv 'unclosed\" from pytest.ini (fdcluster_server): cannot split it like a shell: *"),
        (["--fdcluster-server", "srv", "--fdcluster-declare", "nod:respawns=no"], "",
         "Invalid declaration 'nod:respawns=no' from --fdcluster-declare: no target named 'nod'; targets are srv"),
        (["--fdcluster-server", "srv", "--fdcluster-declare", "srv:speed=9"], "",
         "Invalid declaration 'srv:speed=9' from --fdcluster-declare: capabilities are *"),
        (["--fdcluster-server", "srv"], "fdcluster_declare = srv:respawns=maybe\n",
         settings.INVALID_VALUE.format(name="respawns", value="maybe", source="pytest.ini (fdcluster_declare)")
         + ": expected yes or no"),
        (["--fdcluster-server", "srv", "--fdcluster-declare", "strategy=fastest"], "",
         settings.INVALID_VALUE.format(name="strategy", value="fastest", source="--fdcluster-declare")
         + ": choose one of round-robin, least-connections, shared-accept, unknown"),
        (["--fdcluster-declare", "reference:idle_timeout=3"], "",
         "Invalid declaration 'reference:idle_timeout=3' from --fdcluster-declare: the reference server's *"),
        (["--fdcluster-junit-properties", "maybe"], "",
         settings.INVALID_VALUE.format(name="junit_properties", value="maybe", source="--fdcluster-junit-properties")
         + ": expected yes or no"),
    ])
    def test_exit_code_4_names_the_source(self, pytester: pytest.Pytester, args: list, ini: str, problem: str) -> None:
        if ini:
            pytester.makefile(".ini", pytest="[pytest]\n" + ini)
        pytester.makepyfile("def test_plain():\n    pass\n")
        result = pytester.runpytest_inprocess(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: {plugin.SETTINGS_INVALID}: {literal(problem).replace('[*]', '*')}"])


class TestTargets:
    def test_one_target_keeps_the_ids(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(MATRIX_TESTS)
        result = pytester.runpytest_inprocess("--collect-only", "-q")
        result.stdout.fnmatch_lines(["*::test_ping", "*::test_kept_parametrization[[]1]",
                                     "*::test_kept_parametrization[[]2]", "*::test_fails_on_other",
                                     "*::test_no_cluster"])

    def test_two_targets_ids_header(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(MATRIX_TESTS)
        result = pytester.runpytest_inprocess("--collect-only", "-q", *TWO_TARGETS)
        result.stdout.fnmatch_lines([
            "*::test_ping[[]reference]", "*::test_ping[[]other]",
            "*::test_kept_parametrization[[]reference-1]", "*::test_kept_parametrization[[]reference-2]",
            "*::test_kept_parametrization[[]other-1]", "*::test_kept_parametrization[[]other-2]",
            "*::test_fails_on_other[[]reference]", "*::test_fails_on_other[[]other]",
            "*::test_no_cluster",
        ])
        targets_text = plugin.HEADER_TARGETS.format(targets="; ".join([
            "reference: " + plugin.HEADER_REFERENCE.format(strategy="round-robin"), "other: " + OTHER]))
        header = pytester.runpytest_inprocess("--collect-only", *TWO_TARGETS)  # -q leaves the header out
        header.stdout.fnmatch_lines([f"fdcluster: {literal(targets_text)}, 2 workers, *"])

    @pytest.mark.parametrize("xdist", [False, True], ids=["one process", "-n 2"])
    def test_matrix_in_summary_and_json(self, pytester: pytest.Pytester, xdist: bool) -> None:
        pytester.makepyfile(MATRIX_TESTS)
        result = run_subprocess(pytester, *TWO_TARGETS, "--fdcluster-report-json", "report.json",
                                *(["-n", "2"] if xdist else []))
        result.assert_outcomes(passed=8, failed=1)
        result.stdout.fnmatch_lines([
            f"*= {matrix.MATRIX_TITLE} =*",
            f"{matrix.MODULE_HEADING}  *reference  *other",
            "test_matrix_in_summary_and_json.py  4 passed  *3 passed, 1 failed",
            "failing invariants (tests):",
            "  " + matrix.FAILING_LINE.format(target="other", module="test_matrix_in_summary_and_json.py",
                                              invariants="exactly one holder (1)"),
        ])
        data = json.loads((pytester.path / "report.json").read_text())
        assert data["matrix"]["targets"] in (["reference", "other"], ["other", "reference"])
        cells = data["matrix"]["modules"]["test_matrix_in_summary_and_json.py"]
        assert cells["reference"]["passed"] == 4 and cells["reference"]["failed"] == 0
        assert cells["other"]["passed"] == 3 and cells["other"]["failed"] == 1
        assert cells["other"]["failing"] == {
            "exactly one holder": ["test_matrix_in_summary_and_json.py::test_fails_on_other[other]"]}
        by_target = {record["target_name"] for record in data["clusters"]}
        assert by_target == {"reference", "other"}

    def test_the_markers_server_runs_once(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(f"""
            import pytest

            @pytest.mark.fdcluster(server={OTHER!r})
            def test_own_server(fdcluster_settings):
                assert fdcluster_settings.target == "fdcluster_server"
        """)
        result = pytester.runpytest_inprocess("-v", *TWO_TARGETS)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*::test_own_server PASSED*"])

