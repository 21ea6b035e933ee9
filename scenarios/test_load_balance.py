"""Load balance: the dispatcher spreads connections fairly, and the suite measures who does not.

Invariants checked (load balance, 5):
- sequential connections spread within +-1 per worker under round-robin;
- concurrent connections pass the fairness assertion (Jain's index, max/min);
- a respawned worker gets its share;
- while one worker is paused, the others take the load and the paused worker
  is not handed more than its share; everything is answered once it resumes;
- the shared-accept strategy's imbalance is measured and reported (an
  expected failure with the figures), never a silent pass: the reference
  server's, and that of an external target that declares strategy=shared-accept
  (a target declaring another strategy is skipped with that reason; one whose
  strategy is unknown fails, asking for the declaration).
"""

from __future__ import annotations

import pytest

from pytest_fdcluster import ClusterError, assert_fair, assert_round_robin, fairness, load, require, wait_until

PER_WORKER = 4
ANSWER_TIMEOUT = 5.0
SHARED_ACCEPT_CONNECTIONS = 300


def sequential_distribution(cluster, per_worker=PER_WORKER):
    """Open, serve and locate connections one at a time; count them per worker."""
    counts = {}
    for i in range(per_worker * len(cluster.workers)):
        with cluster.client(ANSWER_TIMEOUT) as client:
            assert client.call("ping", i) == i
            owner = wait_until(lambda: cluster.owner_of(client), 5.0, lambda: f"an owner for {client.local_address}")
            counts[owner] = counts.get(owner, 0) + 1
    for label in cluster.labels().values():
        if label != "master":
            counts.setdefault(label, 0)
    return counts


def concurrent_distribution(cluster, per_worker=8):
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(per_worker * len(cluster.workers))]
    try:
        for i, client in enumerate(clients):
            client.send_frame({"in": "ping", "params": i})
        for i, client in enumerate(clients):
            assert client.recv_frame()["result"] == i
        return cluster.connections_per_worker(clients)
    finally:
        for client in clients:
            client.close()


def test_sequential_connections_round_robin(fdcluster):
    assert_round_robin(sequential_distribution(fdcluster), tolerance=1)


def test_concurrent_connections_are_fair(fdcluster):
    assert_fair(concurrent_distribution(fdcluster), min_jain=0.9, max_ratio=2.0)


def test_respawned_worker_gets_its_share(fdcluster):
    victim = fdcluster.kill_worker(0)
    try:
        fdcluster.wait_for_workers(timeout=10.0, gone=[victim])
    except ClusterError as exc:
        pytest.fail(f"load balance: the killed worker pid {victim} was never replaced, so it cannot get its share: {exc}")
    assert_round_robin(sequential_distribution(fdcluster), tolerance=1)


def test_paused_worker_is_not_handed_more_than_its_share(fdcluster):
    workers = len(fdcluster.workers)
    paused = fdcluster.pause_worker(0)
    share = 2 * PER_WORKER
    total = share * workers
    clients = [fdcluster.client(ANSWER_TIMEOUT) for _ in range(total)]
    try:
        answered = set()
        for i, client in enumerate(clients):
            client.send_frame({"in": "ping", "params": i})
            try:
                if client.recv_frame(timeout=0.5)["result"] == i:
                    answered.add(i)
            except Exception:
                pass  # handed to the paused worker (or waiting for it): judged below
        stalled = total - len(answered)
        assert stalled < share, (
            f"load balance: {stalled} of {total} connections stalled behind paused worker pid {paused}; "
            f"a fair share is {share} and a paused worker should stop getting new ones")
        fdcluster.resume_worker(paused)
        for i, client in enumerate(clients):
            if i not in answered:
                assert client.recv_frame(ANSWER_TIMEOUT)["result"] == i, f"nothing lost: client {i} after resume"
    finally:
        for client in clients:
            client.close()


def owners_of_sequential_connections(cluster, count):
    """Who served each of ``count`` connections opened one after another, located from outside."""
    counts = {label: 0 for label in cluster.labels().values() if label != "master"}
    for i in range(count):
        with cluster.client(ANSWER_TIMEOUT) as client:
            assert client.call("ping", i) == i, f"liveness: shared-accept connection {i}"
            owner = wait_until(lambda: cluster.owner_of(client), 5.0, lambda: f"an owner for {client.local_address}")
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def test_shared_accept_imbalance_is_measured(fdcluster_factory, record_property):
    if fdcluster_factory.is_reference:
        cluster = fdcluster_factory.start(strategy="shared-accept")
    else:
        # An external target is measured itself, once it declares that it shares the accept.
        strategy = require(fdcluster_factory, "strategy")
        if strategy != "shared-accept":
            pytest.skip(f"target {fdcluster_factory.settings.target!r} declares strategy={strategy}: this scenario "
                        "measures targets that declare strategy=shared-accept")
        cluster = fdcluster_factory.start()
    if cluster.stats() is not None:
        result = load.run_load(cluster.address, clients=1, keepalive=False, requests=SHARED_ACCEPT_CONNECTIONS,
                               timeout=ANSWER_TIMEOUT)
        assert result.requests_ok == SHARED_ACCEPT_CONNECTIONS, f"liveness: shared-accept run: {result}"
        counts = {f"worker {w['index']}": w["accepted"] for w in cluster.stats()["workers"]}
    else:  # no counters of its own: each connection's holder is found from outside
        counts = owners_of_sequential_connections(cluster, SHARED_ACCEPT_CONNECTIONS // 3)
    stats = fairness(counts)
    record_property("shared_accept_jain", round(stats.jain, 3))
    record_property("shared_accept_max_min_ratio", stats.max_min_ratio)
    record_property("shared_accept_counts", counts)
    if stats.spread > 1:
        # The figure is the point: shown by -rx, kept in junit properties, never a silent pass.
        pytest.xfail(f"shared-accept imbalance measured over {stats.total} connections: "
                     + ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
                     + f"; spread {stats.spread}, Jain {stats.jain:.3f}, max/min {stats.max_min_ratio:.2f}")
