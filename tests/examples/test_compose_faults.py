"""The README's "composing faults" example, kept here so it runs and cannot rot.

Faults that stay in effect (held connections, a client that never reads) go
into one ``contextlib.ExitStack``: each is entered as it is injected and all
are undone at the end of the block, in reverse order, even when an assertion
inside fails.  The load runs inside the block, with a share of its own
connections misbehaving, and is measured on the rest.
"""

import contextlib

import pytest

from pytest_fdcluster import assert_fair, faults, load


@pytest.mark.fdcluster(workers=3)
def test_fair_and_answered_under_composed_faults(fdcluster):
    with contextlib.ExitStack() as stack:
        loris = stack.enter_context(faults.Slowloris(fdcluster, 30))  # 30 requests never finished
        stack.enter_context(faults.SlowReader(fdcluster, requests=64))  # a client that never reads
        storm = stack.enter_context(faults.ConnectionStorm(fdcluster, 60, hold=True))  # 60 answered, held
        result = load.run_load(fdcluster, clients=12, requests=1200, fault="rst", fraction=0.25, seed=7)
        assert loris.alive() == 30, "the slowloris connections are still open during the load"
    assert storm.result.answered == 60, storm.result
    assert result.error_count == 0, result  # the misbehaving quarter's resets are not the load's errors
    assert result.misbehaving.connections >= 3, result
    assert_fair(result.per_worker, min_jain=0.9, max_ratio=2.0)  # the 9 well-behaved connections
    assert result.p99 < 1.0, result
    # Every fault is in the cluster's events, which a failed test prints under "fdcluster: to replay".
    events = "\n".join(what for _, what in fdcluster.events)
    for injected in ("slowloris count=30", "slow_reader", "connection_storm count=60", "fault='rst' fraction=0.25"):
        assert injected in events, events
