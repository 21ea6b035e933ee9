"""The plugin against a target that is not Python: the Node.js cluster under tests/targets/."""

from __future__ import annotations

import pytest
from plugin_test_support import literal, needs_node, node_command, run_subprocess


@needs_node
class TestNodeTarget:
    def test_ping_kill_and_respawn(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile("""
            from pytest_fdcluster import ClientError, wait_until

            def answers(cluster, params):
                try:
                    return cluster.call("ping", params, timeout=1.0) == params
                except (ClientError, OSError):
                    return False

            def test_node(fdcluster):
                assert not fdcluster.is_reference
                assert fdcluster.call("ping", {"from": "python"}) == {"from": "python"}
                assert [view.label for view in fdcluster.snapshot().processes.values()] == [
                    "master", "worker 0", "worker 1"]
                victim = fdcluster.kill_worker(0)
                workers = fdcluster.wait_for_workers(2, timeout=10, gone=[victim])
                assert victim not in workers
                # A respawned Node worker exists before it listens; readiness at start-up waited for
                # the primary's fdcluster-ready line, but a respawn has no such line.
                wait_until(lambda: answers(fdcluster, "again"), 10.0, lambda: "the respawned cluster to answer")
        """)
        command = node_command()
        result = run_subprocess(pytester, "--fdcluster-server", command, "--fdcluster-ready-line", "yes",
                                "--fdcluster-report")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([
            f"fdcluster: target {literal(command)}, 2 workers, *",
            "*::test_node [[]cluster 1]: node *node_cluster_server.js --port * --workers 2",
        ])
