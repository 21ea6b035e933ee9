"""Loading the plugin, its options and ini settings, and the fdcluster marker.

Runs that only parse options or resolve settings stay in process; anything
that starts a cluster runs pytest in a subprocess.
"""

from __future__ import annotations

import pytest
from plugin_test_support import literal, run_subprocess, stubborn_command

from pytest_fdcluster import plugin, report, settings, target

USES_SETTINGS = """
def test_settings(fdcluster_settings):
    assert fdcluster_settings.workers >= 1
"""


DEFAULT = {setting.name: setting.default for setting in settings.SETTINGS}


def header(workers: int = DEFAULT["workers"], strategy: str = DEFAULT["strategy"],
           timeout: float = DEFAULT["startup_timeout"], grace: float = DEFAULT["grace"]) -> str:
    """The report header line the plugin prints for these settings (reference server)."""
    return plugin.HEADER.format(target=plugin.HEADER_TARGET.format(target=plugin.HEADER_REFERENCE.format(
        strategy=strategy)), workers=workers,
                                timeout=timeout, grace=grace,
                                seed=plugin.HEADER_SEED.format(seed=0, source=plugin.SEED_FAKER))


def header_lines(result: pytest.RunResult) -> list:
    return [line for line in result.outlines if line.startswith("fdcluster: target ")]


class TestLoading:
    def test_p_loads_it_with_autoload_off(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        pytester.makepyfile(USES_SETTINGS)
        result = run_subprocess(pytester, "-p", plugin.ENTRY_POINT)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([header()])

    def test_autoload_off_without_p_leaves_it_out(self, pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        pytester.makepyfile(USES_SETTINGS)
        result = run_subprocess(pytester)
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*fixture 'fdcluster_settings' not found*"])
        assert header_lines(result) == []

    @pytest.mark.parametrize("how", ["-p fdcluster", "-p pytest_fdcluster.plugin", "conftest pytest_plugins"])
    def test_loading_it_again_with_autoload_on_registers_it_once(self, pytester: pytest.Pytester, how: str) -> None:
        pytester.makepyfile(USES_SETTINGS)
        if how.startswith("-p"):
            args = how.split()
        else:
            pytester.makeconftest("pytest_plugins = ['pytest_fdcluster.plugin']")
            args = []
        result = run_subprocess(pytester, *args)
        result.assert_outcomes(passed=1)
        assert header_lines(result) == [header()]

    def test_no_fdcluster_disables_it(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(USES_SETTINGS)
        result = pytester.runpytest_inprocess("-p", f"no:{plugin.ENTRY_POINT}")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*fixture 'fdcluster_settings' not found*"])
        assert header_lines(result) == []

    def test_strict_markers_and_warnings_as_errors_are_clean(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            import pytest

            @pytest.mark.fdcluster(workers=3, strategy="least-connections")
            def test_marked(fdcluster_settings):
                assert fdcluster_settings.workers == 3
        """)
        result = pytester.runpytest_inprocess("--strict-markers", "-W", "error")
        result.assert_outcomes(passed=1)
        assert "warnings" not in result.parseoutcomes()

    def test_help_lists_options_and_ini_settings(self, pytester: pytest.Pytester) -> None:
        result = pytester.runpytest_inprocess("--help")
        result.stdout.fnmatch_lines([
            "fdcluster: prefork clusters as fixtures:",
            "  --fdcluster-server=SERVER",
            "  --fdcluster-workers=WORKERS",
            f"*{settings.BY_NAME['workers'].help_text}",
            "  --fdcluster-startup-timeout=STARTUP_TIMEOUT",
            "  --fdcluster-strategy=STRATEGY",
            "  --fdcluster-grace=GRACE",
            f"  --fdcluster-report    {report.HELP_REPORT}",
            "  --fdcluster-report-json=PATH",
        ])
        result.stdout.fnmatch_lines([
            "  fdcluster_server (*):",
            "  fdcluster_workers (*):",
            f"*{settings.BY_NAME['workers'].help_text}",
            "  fdcluster_startup_timeout (*):",
            "  fdcluster_strategy (*):",
            "  fdcluster_grace (*):",
        ])
        # Each help states its default, as generated from the settings table.
        result.stdout.fnmatch_lines(["*worker processes per cluster (default: 2)"])
        for setting in settings.SETTINGS:
            assert (setting.flag in result.stdout.str()) == setting.option, setting
            assert (f"  {setting.dest} (" in result.stdout.str()) == setting.option, setting

    def test_markers_lists_the_marker_with_its_signature(self, pytester: pytest.Pytester) -> None:
        result = pytester.runpytest_inprocess("--markers")
        result.stdout.fnmatch_lines([f"@pytest.mark.{plugin.MARKER_HELP}"])
        assert plugin.MARKER_HELP.startswith("fdcluster(workers=None, server=None, **settings): ")


class TestOptions:
    @pytest.mark.parametrize("source", ["command line", "ini"])
    def test_options_and_ini_reach_the_header(self, pytester: pytest.Pytester, source: str) -> None:
        values = {"workers": "3", "startup_timeout": "7", "grace": "0.5", "strategy": "least-connections"}
        if source == "ini":
            pytester.makeini("[pytest]\n" + "".join(f"fdcluster_{k} = {v}\n" for k, v in values.items()))
            args = []
        else:
            args = [arg for k, v in values.items() for arg in (f"--fdcluster-{k.replace('_', '-')}", v)]
        pytester.makepyfile(USES_SETTINGS)
        result = pytester.runpytest_inprocess(*args)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([header(workers=3, strategy="least-connections", timeout=7, grace=0.5)])

    def test_strategy_reaches_the_reference_server(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            import pytest

            def test_from_command_line(fdcluster):
                assert fdcluster.target.ready_info["strategy"] == "least-connections"

            @pytest.mark.fdcluster(strategy="shared-accept")
            def test_from_marker(fdcluster):
                assert fdcluster.target.ready_info["strategy"] == "shared-accept"
        """)
        result = run_subprocess(pytester, "--fdcluster-strategy", "least-connections")
        result.assert_outcomes(passed=2)

    @pytest.mark.parametrize("source", ["command line", "ini"])
    def test_server_runs_an_external_target(self, pytester: pytest.Pytester, source: str) -> None:
        command = stubborn_command()
        if source == "ini":
            pytester.makeini(f"[pytest]\nfdcluster_server = {command}\nfdcluster_workers = 3\nfdcluster_grace = 0.2\n")
            args = []
        else:
            args = ["--fdcluster-server", command, "--fdcluster-workers", "3", "--fdcluster-grace", "0.2"]
        pytester.makepyfile("""
            def test_external(fdcluster):
                assert not fdcluster.is_reference and fdcluster.stats() is None
                assert fdcluster.call("ping", {"n": 1}) == {"n": 1}
                assert len(fdcluster.workers) == 3
        """)
        result = run_subprocess(pytester, "--fdcluster-report", *args)
        # It ignores SIGTERM: the test passes, its teardown fails the graceful stop, and the summary
        # says the grace ran out and SIGKILL was needed.
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines([f"fdcluster: target {command}, 3 workers*",
                                     "*" + target.GRACEFUL_SIGKILLED.format(pid="*", grace=0.2),
                                     "*SIGKILL needed*"])

    @pytest.mark.parametrize(("source", "label"), [
        ("command line", "--fdcluster-workers"),
        ("pytest.ini", "pytest.ini (fdcluster_workers)"),
        ("pyproject.toml", "pyproject.toml (fdcluster_workers)"),
        ("-o", f"{plugin.OVERRIDE_INI_LABEL} (fdcluster_workers)"),
    ])
    def test_bad_value_is_a_usage_error_naming_its_source(self, pytester: pytest.Pytester, source: str,
                                                          label: str) -> None:
        # No test uses a cluster: the value is still checked, before anything runs.
        pytester.makepyfile("def test_plain():\n    pass\n")
        args = []
        if source == "command line":
            args = ["--fdcluster-workers", "x"]
        elif source == "pytest.ini":
            pytester.makefile(".ini", pytest="[pytest]\nfdcluster_workers = x\n")
        elif source == "pyproject.toml":
            pytester.makepyprojecttoml("[tool.pytest.ini_options]\nfdcluster_workers = 'x'\n")
        elif source == "-o":
            pytester.makefile(".ini", pytest="[pytest]\nfdcluster_workers = 2\n")
            args = ["-o", "fdcluster_workers=x"]
        result = pytester.runpytest_inprocess(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        problem = settings.INVALID_VALUE.format(name="workers", value="x", source=label)
        result.stderr.fnmatch_lines([f"ERROR: {plugin.SETTINGS_INVALID}: {problem}: expected a positive integer"])

    def test_bad_marker_value_fails_only_its_test(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            import pytest

            @pytest.mark.fdcluster(workers="x")
            def test_bad(fdcluster_settings):
                pass

            def test_good(fdcluster_settings):
                pass
        """)
        result = pytester.runpytest_inprocess()
        result.assert_outcomes(passed=1, errors=1)
        problem = settings.INVALID_VALUE.format(name="workers", value="x", source=settings.SOURCE_MARKER)
        result.stdout.fnmatch_lines([f"*{plugin.SETTINGS_INVALID}: {problem}: expected a positive integer"])

    @pytest.mark.skipif(pytest.version_tuple < (9, 2),
                        reason="native TOML types for plugin ini options need pytest 9.2")
    def test_native_toml_numbers(self, pytester: pytest.Pytester) -> None:
        pytester.makepyprojecttoml("[tool.pytest]\nfdcluster_workers = 3\nfdcluster_grace = 1\n"
                                   "fdcluster_startup_timeout = 2.5\n")
        pytester.makepyfile(USES_SETTINGS)
        result = pytester.runpytest_inprocess()
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([header(workers=3, timeout=2.5, grace=1)])

    @pytest.mark.parametrize(("option", "value", "expected"), [
        ("startup-timeout", "0", "expected a positive number"),
        ("grace", "-1", "expected a non-negative number"),
        ("strategy", "fastest", "choose one of round-robin, least-connections, shared-accept"),
    ])
    def test_bad_option_values(self, pytester: pytest.Pytester, option: str, value: str, expected: str) -> None:
        pytester.makepyfile(USES_SETTINGS)
        result = pytester.runpytest_inprocess(f"--fdcluster-{option}", value)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        problem = settings.INVALID_VALUE.format(name=option.replace("-", "_"), value=value,
                                                source=f"--fdcluster-{option}")
        result.stderr.fnmatch_lines([f"ERROR: {plugin.SETTINGS_INVALID}: {problem}: {expected}"])
        assert header_lines(result) == []  # nothing ran


class TestMarker:
    # (ini, command line, marker) workers -> expected for an unmarked and a marked test.
    @pytest.mark.parametrize(("ini", "cli", "unmarked", "marked"), [
        (None, None, DEFAULT["workers"], 1),  # marker over default
        (3, None, 3, 1),  # ini over default, marker over ini
        (3, 1, 1, 2),  # command line over ini, marker over command line
    ])
    def test_precedence(self, pytester: pytest.Pytester, ini, cli, unmarked: int, marked: int) -> None:
        if ini is not None:
            pytester.makeini(f"[pytest]\nfdcluster_workers = {ini}\n")
        pytester.makepyfile(f"""
            import pytest

            def test_unmarked(fdcluster):
                assert len(fdcluster.workers) == {unmarked}

            @pytest.mark.fdcluster(workers={marked})
            def test_marked(fdcluster):
                assert len(fdcluster.workers) == {marked}

            @pytest.mark.fdcluster(workers=3, idle_timeout=0.5)
            class TestClassMarker:
                @pytest.mark.fdcluster(workers={marked})
                def test_closest_marker_wins(self, fdcluster):
                    assert len(fdcluster.workers) == {marked}
                    # Keywords of the class marker the function's does not override still apply.
                    assert "--idle-timeout" in fdcluster.target.argv
        """)
        result = run_subprocess(pytester, *(["--fdcluster-workers", str(cli)] if cli is not None else []))
        result.assert_outcomes(passed=3)

    @pytest.mark.parametrize(("mark", "problem"), [
        ("fdcluster(3)", "Invalid marker arguments (3,) from marker: use keywords, e.g. fdcluster(workers=3)"),
        ("fdcluster(wokers=3)", "Invalid setting 'wokers' from marker: known settings are *"),
        ("fdcluster(workers=2.5)", settings.INVALID_VALUE.format(name="workers", value=2.5, source="marker")
         + ": expected a positive integer"),
        ("fdcluster(workers=True)", settings.INVALID_VALUE.format(name="workers", value=True, source="marker")
         + ": expected a positive integer"),
        ("fdcluster(max_frame='big')", settings.INVALID_VALUE.format(name="max_frame", value="big", source="marker")
         + ": expected a positive integer"),
        ("fdcluster(server='srv {port}', max_pending=3)",
         "Invalid max_pending from marker: reference-server settings do not apply to the external target 'srv {port}'"),
    ])
    def test_bad_marker(self, pytester: pytest.Pytester, mark: str, problem: str) -> None:
        pytester.makepyfile(f"""
            import pytest

            @pytest.mark.{mark}
            def test_bad(fdcluster):
                pass
        """)
        result = pytester.runpytest_inprocess()
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([f"*{plugin.SETTINGS_INVALID}: {problem}"])

    def test_factory_keywords_override_the_marker(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            import pytest

            @pytest.mark.fdcluster(workers=3)
            def test_factory(fdcluster_factory):
                assert len(fdcluster_factory.start().workers) == 3
                assert len(fdcluster_factory.start(workers=1).workers) == 1

            @pytest.mark.fdcluster(workers=3)
            def test_bad_factory_keyword(fdcluster_factory):
                fdcluster_factory.start(workers=0)
        """)
        result = run_subprocess(pytester)
        result.assert_outcomes(passed=1, failed=1)
        problem = settings.INVALID_VALUE.format(name="workers", value=0, source=plugin.FACTORY_LABEL)
        result.stdout.fnmatch_lines([f"*{plugin.SETTINGS_INVALID}: {literal(problem)}: expected a positive integer"])


class TestSettingsTable:
    """``settings.resolve`` and the table, with plain lookups instead of a pytest config."""

    @staticmethod
    def resolve(marker: dict = {}, option: dict = {}, ini: dict = {}) -> settings.ClusterSettings:  # noqa: B006
        return settings.resolve(marker, option.get, ini.get, ini_label="tox.ini")

    def test_help_states_the_default(self) -> None:
        assert settings.BY_NAME["workers"].help_text == "worker processes per cluster (default: 2)"
        assert settings.BY_NAME["grace"].help_text.endswith("; 0 kills at once (default: 5)")
        assert settings.BY_NAME["startup_timeout"].help_text.endswith(" (default: 15)")
        assert settings.BY_NAME["server"].help_text.endswith(" (default: the reference server)")
        assert settings.BY_NAME["ready_line"].help_text.endswith(" (default: no; the reference server always does)")

    def test_marker_then_command_line_then_ini_then_default(self) -> None:
        assert self.resolve().workers == DEFAULT["workers"]
        assert self.resolve(ini={"fdcluster_workers": "4"}).workers == 4
        assert self.resolve(option={"fdcluster_workers": "3"}, ini={"fdcluster_workers": "4"}).workers == 3
        assert self.resolve({"workers": 1}, {"fdcluster_workers": "3"}, {"fdcluster_workers": "4"}).workers == 1
        # An empty value is no value: the next place decides.
        assert self.resolve({"workers": ""}, ini={"fdcluster_workers": "4"}).workers == 4

    def test_bad_ini_value_names_the_file_and_the_ini_name(self) -> None:
        with pytest.raises(settings.SettingsError) as raised:
            self.resolve(ini={"fdcluster_grace": "-1"})
        problem = settings.INVALID_VALUE.format(name="grace", value="-1", source="tox.ini (fdcluster_grace)")
        assert str(raised.value) == f"{problem}: expected a non-negative number"

    def test_blind_checks_fail_by_default_and_may_be_skipped_never_passed(self) -> None:
        assert self.resolve().blind_checks == "fail"
        assert self.resolve(option={"fdcluster_blind_checks": "skip"}).blind_checks == "skip"
        assert self.resolve({"blind_checks": "skip"}, option={"fdcluster_server": "srv"}).blind_checks == "skip"
        with pytest.raises(settings.SettingsError, match="^Invalid blind_checks 'pass' from --fdcluster-blind-checks"):
            self.resolve(option={"fdcluster_blind_checks": "pass"})

    def test_reference_settings_become_server_flags(self) -> None:
        resolved = self.resolve({"max_frame": "4096", "handlers": ["a", "b:H"], "strategy": "shared-accept"})
        assert resolved.is_reference and resolved.strategy == "shared-accept"
        command = " ".join(resolved.command)
        assert "--strategy shared-accept --log-level warning --max-frame 4096 --handlers a --handlers b:H" in command

    def test_an_external_target_ignores_the_strategy_option_and_the_marker_declares_it(self) -> None:
        resolved = self.resolve(option={"fdcluster_server": "srv --port {port}", "fdcluster_strategy": "fastest"})
        assert resolved.command == ("srv", "--port", "{port}") and resolved.strategy is None
        assert resolved.capabilities.strategy == "round-robin"
        declared = self.resolve({"strategy": "shared-accept"}, option={"fdcluster_server": "srv"})
        assert declared.capabilities.strategy == "shared-accept" and declared.strategy is None
        with pytest.raises(settings.SettingsError, match="^Invalid max_pending from marker: reference-server settings"):
            self.resolve({"max_pending": 3}, option={"fdcluster_server": "srv"})

    def test_marker_keys_keep_the_signature_first(self) -> None:
        assert settings.MARKER_KEYS[:2] == settings.MARKER_SIGNATURE == ("workers", "server")
        assert sorted(settings.MARKER_KEYS) == sorted(s.name for s in settings.SETTINGS if s.marker)
