"""Capabilities a target declares: defaults, the three places to declare them, and ``require``'s failure."""

from __future__ import annotations

import json

import pytest
from plugin_test_support import literal, run_subprocess

from pytest_fdcluster import capabilities, plugin

SHOWS_CAPABILITIES = """
import json, pathlib


def test_show(fdcluster_settings, fdcluster_target):
    caps = fdcluster_settings.capabilities
    pathlib.Path(f"caps-{fdcluster_target}.json").write_text(json.dumps(
        [caps.respawns, caps.drains, caps.idle_timeout, caps.max_frame, caps.strategy]))
"""


def shown(pytester: pytest.Pytester) -> dict:
    """Target name -> [respawns, drains, idle_timeout, max_frame, strategy] as the inner tests wrote them."""
    return {path.stem[len("caps-"):]: json.loads(path.read_text()) for path in pytester.path.glob("caps-*.json")}


class TestDeclaring:
    def test_defaults_of_the_reference_and_an_external_target(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(SHOWS_CAPABILITIES)
        result = pytester.runpytest_inprocess("--fdcluster-server", "reference",
                                              "--fdcluster-server", "ext=srv --port {port}")
        result.assert_outcomes(passed=2)
        # The reference server's idle timeout is the one it is started with: its own default here.
        assert shown(pytester) == {"reference": [True, True, 10.0, capabilities.DEFAULT_MAX_FRAME, "round-robin"],
                                 "ext": [True, True, None, capabilities.DEFAULT_MAX_FRAME, "round-robin"]}

    def test_command_line_ini_and_marker(self, pytester: pytest.Pytester) -> None:
        pytester.makeini("[pytest]\nfdcluster_declare =\n    drains=no\n    a:idle_timeout=7\n    b:strategy=unknown\n")
        pytester.makepyfile(SHOWS_CAPABILITIES + """
import pytest


@pytest.mark.fdcluster(server="m=srv {port}", max_frame=4096, respawns=False)
def test_marker(fdcluster_settings):
    caps = fdcluster_settings.capabilities
    # The marker's own server takes only the marker's declarations.
    assert (caps.max_frame, caps.respawns, caps.drains) == (4096, False, True)
""")
        result = pytester.runpytest_inprocess("--fdcluster-server", "a=srv {port}",
                                              "--fdcluster-server", "b=srv {port}",
                                              "--fdcluster-declare", "a:strategy=shared-accept",
                                              "--fdcluster-declare", "idle_timeout=3")
        result.assert_outcomes(passed=3)
        # A line for one target beats a line for all; the command line beats the ini.
        assert shown(pytester) == {"a": [True, False, 3.0, capabilities.DEFAULT_MAX_FRAME, "shared-accept"],
                                 "b": [True, False, 3.0, capabilities.DEFAULT_MAX_FRAME, "unknown"]}

    def test_a_bad_marker_declaration_fails_that_test(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            import pytest

            @pytest.mark.fdcluster(server="srv {port}", drains="sometimes")
            def test_bad(fdcluster_settings):
                pass
        """)
        result = pytester.runpytest_inprocess()
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([f"*{plugin.SETTINGS_INVALID}: Invalid drains 'sometimes' from marker: *"])


class TestRequire:
    def test_a_missing_capability_fails_with_the_declaration_to_add(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            from pytest_fdcluster.capabilities import require

            def test_needs_idle_timeout(fdcluster_settings):
                require(fdcluster_settings, "idle_timeout")

            def test_needs_respawns(fdcluster_settings):
                require(fdcluster_settings, "respawns")

            def test_has_max_frame(fdcluster_settings):
                assert require(fdcluster_settings, "max_frame") == 1 << 20
        """)
        result = pytester.runpytest_inprocess("--fdcluster-server", "node=node srv.js {port}",
                                              "--fdcluster-declare", "respawns=no")
        result.assert_outcomes(failed=2, passed=1)  # failed, never skipped
        result.stdout.fnmatch_lines([
            "*" + literal(capabilities.CAPABILITY_MISSING.format(
                capability="idle_timeout", target="node", state="does not declare idle_timeout", wanted="",
                hint="SECONDS")),
            "*" + literal(capabilities.CAPABILITY_MISSING.format(
                capability="respawns", target="node", state="declares respawns=no", wanted="=yes", hint="yes")),
        ])
        # The failure points at the test's line, not into require().
        result.stdout.fnmatch_lines(['>       require(fdcluster_settings, "idle_timeout")'])

    def test_the_cluster_carries_them(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            import pytest
            from pytest_fdcluster.capabilities import require

            @pytest.mark.fdcluster(idle_timeout=0.5, strategy="shared-accept")
            def test_reference(fdcluster, fdcluster_factory):
                assert require(fdcluster, "idle_timeout") == 0.5
                assert fdcluster.capabilities.strategy == "shared-accept"
                assert fdcluster.target.ready_info["strategy"] == "shared-accept"
                assert fdcluster_factory.capabilities == fdcluster.capabilities
        """)
        result = run_subprocess(pytester)
        result.assert_outcomes(passed=1)
