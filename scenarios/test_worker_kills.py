"""Worker kills: the master survives any worker's death and loses no connection it accepted.

Invariants checked:
- liveness (1): after a worker is SIGKILLed or SIGTERMed, all workers killed,
  or a worker paused and resumed, the cluster serves new connections within a
  bounded time, the master stays alive and the worker is replaced;
- nothing lost (2): clients of live workers keep getting every answer; a
  client of a killed worker sees EOF or RST, never a hang; connections handed
  to a frozen worker that is killed before acknowledging them are served by
  another worker;
- no orphans (4): when the master is SIGKILLed, no worker survives it.
"""

from __future__ import annotations

import signal

import pytest

from pytest_fdcluster import ClientTimeout, ClusterError, faults, process_alive, wait_until

ANSWER_TIMEOUT = 5.0
RESPAWN_TIMEOUT = 10.0
ORPHAN_TIMEOUT = 2.0


def clients_by_owner(cluster, per_worker=2):
    """Keep-alive clients, each already served once, grouped by the worker holding them."""
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(per_worker * len(cluster.workers))]
    for client in clients:
        client.call("ping", "hello")
    owners = {}
    for client in clients:
        label = wait_until(lambda c=client: cluster.owner_of(c), 5.0,
                           lambda c=client: f"an owner for client {c.local_address}")
        owners.setdefault(label, []).append(client)
    return clients, owners


def replaced(cluster, pid):
    """liveness: the killed worker is replaced; says so plainly when the target never respawns."""
    try:
        return cluster.wait_for_workers(timeout=RESPAWN_TIMEOUT, gone=[pid])
    except ClusterError as exc:
        pytest.fail(f"liveness: worker pid {pid} was not replaced within {RESPAWN_TIMEOUT:g} s "
                    f"(does the target respawn dead workers?): {exc}")


def serves_new_connections(cluster, count):
    for i in range(count):
        try:
            assert cluster.call("ping", i, timeout=ANSWER_TIMEOUT) == i
        except Exception as exc:
            pytest.fail(f"liveness: new connection {i} not served after the fault: {exc!r}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_one_worker_killed_under_load(fdcluster, sig):
    clients, owners = clients_by_owner(fdcluster)
    try:
        victim_label = sorted(owners)[0]
        victim = fdcluster.kill_worker(victim_label, sig)
        for label, group in owners.items():
            for client in group:
                if label == victim_label:
                    try:
                        how = client.expect_eof(ANSWER_TIMEOUT)
                    except ClientTimeout:
                        pytest.fail(f"nothing lost: client {client.local_address} of killed {victim_label} "
                                    f"(pid {victim}) hangs: no EOF or RST within {ANSWER_TIMEOUT:g} s")
                    assert how in ("eof", "reset")
                else:
                    for i in range(20):
                        assert client.call("ping", i) == i, f"nothing lost: {label}'s client lost request {i}"
        assert fdcluster.target.alive(), f"liveness: the master died after {signal.Signals(sig).name} of a worker"
        replaced(fdcluster, victim)
        serves_new_connections(fdcluster, 2 * len(fdcluster.workers))
    finally:
        for client in clients:
            client.close()


def test_paused_worker_resumes_and_answers(fdcluster):
    clients, owners = clients_by_owner(fdcluster, per_worker=1)
    try:
        paused_label = sorted(owners)[0]
        (paused_client,) = owners[paused_label][:1]
        pid = fdcluster.pause_worker(paused_label)
        paused_client.send_frame({"in": "ping", "params": "while paused"})
        for label, group in owners.items():
            if label != paused_label:
                for client in group:
                    assert client.call("ping", "others") == "others", (
                        f"liveness: {label} stalled while {paused_label} paused")
        fdcluster.resume_worker(pid)
        reply = paused_client.recv_frame(ANSWER_TIMEOUT)
        assert reply == {"out": "pong", "result": "while paused"}, f"nothing lost: paused worker answered {reply!r}"
    finally:
        for client in clients:
            client.close()


def test_worker_killed_before_acknowledging_handoffs(fdcluster):
    kill = faults.kill_during_handoff(fdcluster, worker=0, connections=4)
    with kill:
        answers = kill.answers(ANSWER_TIMEOUT)
        lost = [(i, outcome) for i, outcome in answers
                if not isinstance(outcome, dict) or outcome.get("result") != kill.params[i]]
        assert not lost, (
            f"nothing lost: {len(lost)} of {len(answers)} connections accepted but not yet acknowledged by "
            f"frozen worker pid {kill.frozen_pid} were lost when it was killed: "
            + "; ".join(f"client {i}: {o!r}" for i, o in lost))
    replaced(fdcluster, kill.frozen_pid)


def test_all_workers_killed(fdcluster):
    victims = list(fdcluster.workers)
    for pid in victims:
        fdcluster.kill_worker(pid)
    assert fdcluster.target.alive(), "liveness: the master died when all its workers were killed"
    try:
        fdcluster.wait_for_workers(timeout=RESPAWN_TIMEOUT, gone=victims)
    except ClusterError as exc:
        pytest.fail(f"liveness: the workers were not all replaced (does the target respawn?): {exc}")
    serves_new_connections(fdcluster, 2 * len(victims))


def test_master_killed_leaves_no_orphans(fdcluster):
    workers = list(fdcluster.workers)
    fdcluster.kill_master()
    try:
        wait_until(lambda: not [pid for pid in workers if process_alive(pid)], ORPHAN_TIMEOUT,
                   lambda: f"workers {workers} to die with their master")
    except ClusterError:
        alive = [pid for pid in workers if process_alive(pid)]
        pytest.fail(f"no orphans: workers {alive} still alive {ORPHAN_TIMEOUT:g} s after the master was SIGKILLed")
