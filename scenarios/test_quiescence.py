"""Quiescence: a cluster with nothing to do burns no CPU, whatever its clients leave hanging.

Invariant checked (quiescence): idle, holding 200 idle connections, holding
incomplete frames, holding clients that never read (their buffers full), or
with one worker or every worker frozen (SIGSTOP) and their share of
connections waiting, every process of the cluster stays under
``max(FLOOR, FACTOR x its idle baseline)`` of one core over a ``WINDOW``
measured from outside: the process's own CPU time (per-task schedstat) over
the window's wall time.  The baseline is the same cluster's, idle, measured
in the same test.  With every worker frozen the master has nothing it can
do but wait: a master that polls its stalled workers in a loop spins.

Why it cannot flake: the CPU time a process consumed counts only what it ran
itself.  A server waiting in epoll accrues nothing however loaded the
machine is, so load from others cannot push a quiet process over the bound;
load only makes a spinning process's share smaller, and even a third of a
core shared among a dozen busy processes is far above 5 %.  Each window
starts once the fault is in place (connections held by a worker, buffers
full), so the legitimate work of setting it up is not in it.
"""

from __future__ import annotations

import time

import pytest

from pytest_fdcluster import ClientTimeout, ClusterError, faults, resources, wait_until

WINDOW = 0.5
BASELINE_WINDOW = 0.3
FLOOR = 0.05  # of one core
FACTOR = 3.0
SETTLE = 5.0
#: How long the frozen worker's share is given to be answered by others before it counts as waiting.
WAITING_AFTER = 0.6


def cluster_pids(cluster):
    return [cluster.master] + list(cluster.workers)


def cpu_shares(cluster, seconds, what):
    try:
        return resources.cpu_window(cluster_pids(cluster), seconds)
    except resources.Unobservable as exc:
        pytest.fail(f"quiescence: cannot measure the CPU of the cluster with {what}: {exc}")


def idle_baseline(cluster):
    return cpu_shares(cluster, BASELINE_WINDOW, "nothing to do")


def assert_quiet(cluster, baseline, what):
    """quiescence: every process of the cluster under its bound over one ``WINDOW``."""
    shares = cpu_shares(cluster, WINDOW, what)
    labels = cluster.labels()
    loud = [f"{labels.get(pid, 'process')} pid {pid} used {share:.0%} of a core "
            f"(bound {bound:.0%}, idle baseline {baseline.get(pid, 0.0):.1%})"
            for pid, (share, bound) in resources.cpu_over(shares, baseline, FLOOR, FACTOR).items()]
    assert not loud, f"quiescence: over {WINDOW:g} s with {what}: " + "; ".join(loud)


def settle_on_workers(cluster, addresses, what):
    """Wait until every connection is held by one worker: the handoffs are over before the window opens."""
    try:
        wait_until(lambda: not resources.not_held_by_one_worker(cluster.snapshot(), addresses), SETTLE,
                   lambda: f"the {what} to be held by the workers")
    except (ClusterError, resources.Unobservable) as exc:
        pytest.fail(f"quiescence: the fault could not be set up: {exc}")


def test_idle_cluster_is_quiet(fdcluster):
    assert fdcluster.call("ping", "warm") == "warm"
    baseline = idle_baseline(fdcluster)
    labels = fdcluster.labels()
    loud = [f"{labels.get(pid, 'process')} pid {pid} used {share:.1%} of a core"
            for pid, share in baseline.items() if share > FLOOR]
    assert not loud, f"quiescence: idle for {BASELINE_WINDOW:g} s (bound {FLOOR:.0%}): " + "; ".join(loud)


@pytest.mark.parametrize("partial", [False, True], ids=["idle", "incomplete-frames"])
def test_held_connections_are_quiet(fdcluster, partial):
    baseline = idle_baseline(fdcluster)
    count = 200 if not partial else 100
    what = f"{count} connections " + ("each with an incomplete frame" if partial else "that sent nothing")
    with faults.Slowloris(fdcluster.address, count=count, **({} if partial else {"partial": 0})) as loris:
        settle_on_workers(fdcluster, loris.local_addresses, what)
        assert_quiet(fdcluster, baseline, what)


def test_never_reading_clients_are_quiet(fdcluster):
    baseline = idle_baseline(fdcluster)
    readers = [faults.SlowReader(fdcluster.address, requests=64, payload_size=64 * 1024)
               for _ in range(len(fdcluster.workers))]
    try:
        for reader in readers:
            reader.fill(timeout=5.0)
        what = f"{len(readers)} clients that never read, their buffers full"
        settle_on_workers(fdcluster, [r.local_address for r in readers], what)
        assert_quiet(fdcluster, baseline, what)
    finally:
        for reader in readers:
            reader.close()


@pytest.mark.parametrize("frozen_count", [1, None], ids=["one-worker", "every-worker"])
def test_frozen_workers_with_waiting_connections_are_quiet(fdcluster, frozen_count):
    baseline = idle_baseline(fdcluster)
    victims = fdcluster.workers[:frozen_count]
    for pid in victims:
        fdcluster.pause_worker(pid)
    arrivals = [fdcluster.client() for _ in range(6 * len(fdcluster.workers))]
    try:
        for number, client in enumerate(arrivals):
            client.send_frame({"in": "ping", "params": number})
        deadline = time.monotonic() + WAITING_AFTER
        waiting = 0
        for client in arrivals:
            try:
                client.recv_frame(max(0.0, deadline - time.monotonic()))
            except ClientTimeout:
                waiting += 1  # the frozen workers' share
        frozen = "worker pid" + ("s " if len(victims) > 1 else " ") + ", ".join(map(str, victims))
        assert_quiet(fdcluster, baseline, f"{frozen} frozen (SIGSTOP) and {waiting} of {len(arrivals)} "
                                          f"connections waiting")
    finally:
        for client in arrivals:
            client.close()
