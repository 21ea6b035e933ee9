"""Load balance: the dispatcher spreads connections as its strategy promises, with checks that have power.

Invariants checked (load balance, 9 fairness with power), by the target's
declared strategy (``require(cluster, "strategy")``; unknown fails, asking for
the declaration):
- round-robin, connections one at a time: the owners, in arrival order, rotate
  (``stats.is_rotation``); uniform random dispatch passes that with probability
  k!/k^n: 0.78% at 2 workers (8 connections), 0.0011% at 3, 6e-7% at 4;
- round-robin and least-connections, concurrent arrivals: bursts of 8
  connections per worker, held together, each carrying 4 requests, answered,
  then closed; spread <= 2 per burst, one bad burst allowed, over the number of
  bursts ``stats.burst_plan`` computes at run time (12, 5, 4 for 2, 3, 4 workers:
  random dispatch passes 0.76%, 0.84%, 0.26%); and the requests per worker over
  all bursts pass a chi-square against uniform at alpha 0.001 (``per_unit``:
  the 4 requests of a connection ride on one dispatch decision);
- a respawned worker gets its share; while one worker is paused, the others
  take the load and the paused worker is not handed more than its share;
- shared-accept promises no balance: its imbalance is measured and reported
  (junit properties; an expected failure with the figures when it is uneven),
  never a silent pass and never judged as round-robin.  Every strategy is
  still judged on liveness: every connection answered, held by one worker.
"""

from __future__ import annotations

from typing import Dict, List

import pytest

from pytest_fdcluster import ClusterError, assert_round_robin, fairness, load, require, stats, wait_until

PER_WORKER = 4
ANSWER_TIMEOUT = 5.0
SHARED_ACCEPT_CONNECTIONS = 300
BURST_PER_WORKER = 8
REQUESTS_PER_CONNECTION = 4
SKEW_ALPHA = stats.DEFAULT_ALPHA

ROUND_ROBIN, LEAST_CONNECTIONS, SHARED_ACCEPT = "round-robin", "least-connections", "shared-accept"


def strategy_of(cluster) -> str:
    """The declared strategy; a target that did not declare one fails with the declaration to add."""
    return require(cluster, "strategy")


def worker_count(cluster) -> int:
    count = len(cluster.workers)
    if count < 2:
        pytest.skip(f"load balance: {count} worker: nothing to balance (run with --fdcluster-workers 2 or more)")
    return count


def sequential_owners(cluster, count: int) -> List[str]:
    """Who served each of ``count`` connections opened, served and closed one after another, located from outside."""
    owners = []
    for i in range(count):
        with cluster.client(ANSWER_TIMEOUT) as client:
            assert client.call("ping", i) == i, f"liveness: sequential connection {i} was not answered"
            owners.append(wait_until(lambda: cluster.owner_of(client), 5.0,
                                     lambda: f"an owner for {client.local_address}"))
    return owners


def count_owners(cluster, owners: List[str]) -> Dict[str, int]:
    """Connections per worker label, every live worker listed (zeros included)."""
    counts = {label: 0 for label in cluster.labels().values() if label != "master"}
    for owner in owners:
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def concurrent_bursts(cluster, rounds: int, per_worker: int = BURST_PER_WORKER) -> List[Dict[str, int]]:
    """``rounds`` bursts of concurrent long-lived connections: per burst, how many each worker held.

    Every connection of a burst is opened, answered once and located while all
    are open, then carries ``REQUESTS_PER_CONNECTION - 1`` more requests, then
    the burst is closed before the next one starts.
    """
    bursts = []
    for burst in range(rounds):
        clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(per_worker * len(cluster.workers))]
        try:
            for i, client in enumerate(clients):
                client.send_frame({"in": "ping", "params": i})
            for i, client in enumerate(clients):
                assert client.recv_frame()["result"] == i, f"liveness: burst {burst}, connection {i} misanswered"
            bursts.append(cluster.connections_per_worker(clients))
            for request in range(1, REQUESTS_PER_CONNECTION):
                for i, client in enumerate(clients):
                    assert client.call("ping", [i, request]) == [i, request], (
                        f"liveness: burst {burst}, connection {i}, request {request} misanswered")
        finally:
            for client in clients:
                client.close()
    return bursts


def total(bursts: List[Dict[str, int]]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for burst in bursts:
        for label, n in burst.items():
            counts[label] = counts.get(label, 0) + n
    return counts


def report_shared_accept(counts: Dict[str, int], record_property, what: str) -> None:
    """Shared-accept promises no balance: record the figures, and show them as an expected failure when uneven."""
    measured = fairness(counts)  # refuses master / unowned: those are never a figure of balance
    record_property("shared_accept_jain", round(measured.jain, 3))
    record_property("shared_accept_max_min_ratio", measured.max_min_ratio)
    record_property("shared_accept_counts", counts)
    if measured.spread > 1:
        # The figure is the point: shown by -rx, kept in junit properties, never a silent pass.
        pytest.xfail(f"shared-accept imbalance measured over {measured.total} {what}: "
                     + ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
                     + f"; spread {measured.spread}, Jain {measured.jain:.3f}, max/min {measured.max_min_ratio:.2f}")


def assert_rotation(cluster, owners: List[str], what: str) -> None:
    """Round-robin's promise for connections one at a time: the owners rotate (and so counts are within 1)."""
    __tracebackhide__ = True
    k = len(cluster.workers)
    chance = stats.rotation_pass_probability(len(owners), k)
    assert stats.is_rotation(owners, k), (
        f"load balance: {what}: the owners of {len(owners)} connections opened one at a time do not rotate over "
        f"{k} workers: {', '.join(owners)} (a round-robin dispatcher serves each worker once per turn; random "
        f"dispatch passes this check with probability {chance:.2g})")
    assert_round_robin(count_owners(cluster, owners), tolerance=1)


def assert_bursts_balanced(bursts: List[Dict[str, int]], plan: stats.BurstPlan, strategy: str) -> None:
    """The concurrent check of ``plan``, then the chi-square of requests per worker over all bursts."""
    __tracebackhide__ = True
    spreads = [fairness(burst).spread for burst in bursts]  # fairness() refuses master / unowned buckets
    failed = stats.failed_bursts([list(burst.values()) for burst in bursts], plan.tolerance)
    assert len(failed) <= plan.allowed_failures, (
        f"load balance: {strategy}: {len(failed)} of {plan.rounds} bursts of {plan.size} concurrent connections "
        f"spread more than {plan.tolerance} over {plan.workers} workers (at most {plan.allowed_failures} may); "
        f"spreads {spreads}; worst burst "
        + ", ".join(f"{label} {n}" for label, n in sorted(bursts[max(failed, key=lambda i: spreads[i])].items()))
        + f" (random dispatch passes this check with probability {plan.random_pass:.2g})")
    connections = total(bursts)
    requests = {label: n * REQUESTS_PER_CONNECTION for label, n in connections.items()}
    skew = stats.chi_square_uniform(list(requests.values()), per_unit=REQUESTS_PER_CONNECTION)
    assert skew.p_value >= SKEW_ALPHA, (
        f"fairness: {strategy}: requests per worker over {sum(connections.values())} long-lived connections are "
        f"skewed: " + ", ".join(f"{label} {n}" for label, n in sorted(requests.items()))
        + f"; chi-square {skew.statistic:.2f} ({skew.dof} dof, {REQUESTS_PER_CONNECTION} requests per connection), "
        f"p={skew.p_value:.3g} below {SKEW_ALPHA}")


def test_sequential_connections_round_robin(fdcluster, record_property):
    """Round-robin: 4 connections per worker, one at a time, rotate; random dispatch passes <= 0.78% (power >= 99.2%).

    Least-connections promises nothing here (every worker holds none when a
    connection arrives); shared-accept is measured and reported.
    """
    strategy = strategy_of(fdcluster)
    k = worker_count(fdcluster)
    if strategy == LEAST_CONNECTIONS:
        pytest.skip("least-connections: with one connection at a time every worker is least loaded; "
                    "its promise is judged by test_concurrent_connections_are_fair")
    owners = sequential_owners(fdcluster, PER_WORKER * k)
    if strategy == SHARED_ACCEPT:
        report_shared_accept(count_owners(fdcluster, owners), record_property, "sequential connections")
        return
    assert_rotation(fdcluster, owners, "sequential connections")


def test_concurrent_connections_are_fair(fdcluster, record_property):
    """Bursts of 8 concurrent long-lived connections per worker, 4 requests each.

    Spread <= 2 per burst, one bad burst allowed, over ``stats.burst_plan(k)``
    bursts (12, 5, 4 for 2, 3, 4 workers): random dispatch passes 0.76%,
    0.84%, 0.26% (power >= 99%); then requests per worker pass a chi-square at
    alpha 0.001 (``per_unit`` 4).  Today's max/min <= 2 on one burst passed
    random dispatch 79% of the time at 2 workers.
    """
    strategy = strategy_of(fdcluster)
    plan = stats.burst_plan(worker_count(fdcluster), BURST_PER_WORKER)
    bursts = concurrent_bursts(fdcluster, plan.rounds)
    record_property("load_balance_burst_spreads", [fairness(burst).spread for burst in bursts])
    if strategy == SHARED_ACCEPT:
        report_shared_accept(total(bursts), record_property, "concurrent connections")
        return
    assert_bursts_balanced(bursts, plan, strategy)


def test_respawned_worker_gets_its_share(fdcluster, record_property):
    """After a kill and a respawn, the new worker takes its turn: the same checks, with the same power, as above."""
    strategy = strategy_of(fdcluster)
    k = worker_count(fdcluster)
    victim = fdcluster.kill_worker(0)
    try:
        fdcluster.wait_for_workers(timeout=10.0, gone=[victim])
    except ClusterError as exc:
        pytest.fail(f"load balance: the killed worker pid {victim} was never replaced, so it cannot get its share: "
                    f"{exc}")
    if strategy == ROUND_ROBIN:
        assert_rotation(fdcluster, sequential_owners(fdcluster, PER_WORKER * k), "after a respawn")
        return
    plan = stats.burst_plan(k, BURST_PER_WORKER)
    bursts = concurrent_bursts(fdcluster, plan.rounds)
    if strategy == SHARED_ACCEPT:
        report_shared_accept(total(bursts), record_property, "concurrent connections after a respawn")
        return
    assert_bursts_balanced(bursts, plan, strategy)


def test_paused_worker_is_not_handed_more_than_its_share(fdcluster):
    workers = len(fdcluster.workers)
    paused = fdcluster.pause_worker(0)
    share = 2 * PER_WORKER
    total_clients = share * workers
    clients = [fdcluster.client(ANSWER_TIMEOUT) for _ in range(total_clients)]
    try:
        answered = set()
        for i, client in enumerate(clients):
            client.send_frame({"in": "ping", "params": i})
            try:
                if client.recv_frame(timeout=0.5)["result"] == i:
                    answered.add(i)
            except Exception:
                pass  # handed to the paused worker (or waiting for it): judged below
        stalled = total_clients - len(answered)
        assert stalled < share, (
            f"load balance: {stalled} of {total_clients} connections stalled behind paused worker pid {paused}; "
            f"a fair share is {share} and a paused worker should stop getting new ones")
        fdcluster.resume_worker(paused)
        for i, client in enumerate(clients):
            if i not in answered:
                assert client.recv_frame(ANSWER_TIMEOUT)["result"] == i, f"nothing lost: client {i} after resume"
    finally:
        for client in clients:
            client.close()


def test_shared_accept_imbalance_is_measured(fdcluster_factory, record_property):
    if fdcluster_factory.is_reference:
        cluster = fdcluster_factory.start(strategy="shared-accept")
    else:
        # An external target is measured itself, once it declares that it shares the accept.
        strategy = require(fdcluster_factory, "strategy")
        if strategy != SHARED_ACCEPT:
            pytest.skip(f"target {fdcluster_factory.settings.target!r} declares strategy={strategy}: this scenario "
                        "measures targets that declare strategy=shared-accept")
        cluster = fdcluster_factory.start()
    if cluster.stats() is not None:
        result = load.run_load(cluster.address, clients=1, keepalive=False, requests=SHARED_ACCEPT_CONNECTIONS,
                               timeout=ANSWER_TIMEOUT)
        assert result.requests_ok == SHARED_ACCEPT_CONNECTIONS, f"liveness: shared-accept run: {result}"
        counts = {f"worker {w['index']}": w["accepted"] for w in cluster.stats()["workers"]}
    else:  # no counters of its own: each connection's holder is found from outside
        counts = count_owners(cluster, sequential_owners(cluster, SHARED_ACCEPT_CONNECTIONS // 3))
    report_shared_accept(counts, record_property, "connections")
