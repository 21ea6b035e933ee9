"""Descriptor exhaustion: a process out of descriptors waits, survives, and serves again.

Invariant checked (descriptor exhaustion): the master's RLIMIT_NOFILE is
lowered from outside (prlimit) to its lowest free descriptor number -- the
limit caps descriptor numbers, so no free number stays below it and the next
``accept`` fails with EMFILE -- and clients connect:

- the master does not spin: under ``max(FLOOR, FACTOR x idle baseline)`` of
  a core over ``WINDOW`` while clients wait in the backlog;
- it does not crash on its next fork: a worker killed while the master is at
  its limit leaves the master alive (it may respawn later);
- it serves every waiting client once the limit is restored, with its
  workers back.

The same for a worker at its limit: handoffs to it cannot be received
(SCM_RIGHTS descriptors beyond the limit are discarded by the kernel), so
they must be neither lost nor bounced forever between master and worker:
every client is answered within ``ANSWER_TIMEOUT`` by another worker, and
no process spins meanwhile.  Limits are always restored, also when a check
fails.
"""

from __future__ import annotations

import contextlib
import time

import psutil
import pytest

from pytest_fdcluster import ClientTimeout, ClusterError, process_alive, resources, wait_until

WINDOW = 0.5
BASELINE_WINDOW = 0.3
FLOOR = 0.05
FACTOR = 3.0
ANSWER_TIMEOUT = 5.0
RESPAWN_TIMEOUT = 10.0
REAP_TIMEOUT = 5.0


def cpu_shares(cluster, pids, seconds, what):
    try:
        return resources.cpu_window(pids, seconds)
    except resources.Unobservable as exc:
        if not cluster.target.alive():
            pytest.fail(f"descriptor exhaustion: the master pid {cluster.master} died {what}")
        pytest.fail(f"descriptor exhaustion: cannot measure the CPU {what}: {exc}")


def assert_no_spin(cluster, baseline, what):
    """descriptor exhaustion: no process of the cluster above its CPU bound over one ``WINDOW``."""
    labels = cluster.labels()
    pids = [cluster.master] + list(cluster.workers)
    shares = cpu_shares(cluster, pids, WINDOW, what)
    loud = [f"{labels.get(pid, 'process')} pid {pid} used {share:.0%} of a core (bound {bound:.0%})"
            for pid, (share, bound) in resources.cpu_over(shares, baseline, FLOOR, FACTOR).items()]
    assert not loud, f"descriptor exhaustion: over {WINDOW:g} s {what}: " + "; ".join(loud)


@contextlib.contextmanager
def at_lowest_free_fd(pid):
    """The process's soft RLIMIT_NOFILE at its lowest free descriptor number (yielded), restored on exit."""
    with contextlib.ExitStack() as stack:
        try:
            lowest = resources.lowest_free_fd(pid)
            stack.enter_context(resources.nofile_limit(pid, lowest))
        except resources.Unobservable as exc:
            pytest.fail(f"descriptor exhaustion: {exc}")
        yield lowest


def send_pings(cluster, count):
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(count)]
    for number, client in enumerate(clients):
        client.send_frame({"in": "ping", "params": number})
    return clients


def unanswered(clients, timeout):
    """``(number, reason)`` for every client whose echo did not arrive within ``timeout`` (one shared deadline)."""
    deadline = time.monotonic() + timeout
    missing = []
    for number, client in enumerate(clients):
        try:
            reply = client.recv_frame(max(0.0, deadline - time.monotonic()))
        except (ClientTimeout, ConnectionError, OSError) as exc:
            missing.append((number, type(exc).__name__))
            continue
        if reply != {"out": "pong", "result": number}:
            missing.append((number, f"answered {reply!r:.80}"))
    return missing


def close_all(clients):
    for client in clients:
        client.close()


def test_master_at_its_limit_does_not_spin(fdcluster):
    baseline = cpu_shares(fdcluster, [fdcluster.master] + fdcluster.workers, BASELINE_WINDOW, "of the idle cluster")
    clients = []
    try:
        with at_lowest_free_fd(fdcluster.master) as lowest:
            clients = send_pings(fdcluster, 2 * len(fdcluster.workers))
            assert_no_spin(fdcluster, baseline, f"with the master at RLIMIT_NOFILE {lowest} and {len(clients)} "
                                                f"clients waiting to be accepted")
            assert fdcluster.target.alive(), f"descriptor exhaustion: the master died at RLIMIT_NOFILE {lowest}"
    finally:
        close_all(clients)


def test_master_at_its_limit_survives_a_worker_death(fdcluster):
    with at_lowest_free_fd(fdcluster.master) as lowest:
        victim = fdcluster.kill_worker(0)
        try:
            # Reaped: the master saw the death and tried to replace the worker (socketpair, fork).
            wait_until(lambda: not psutil.pid_exists(victim) or not process_alive(fdcluster.master), REAP_TIMEOUT,
                       lambda: f"worker pid {victim} to be reaped")
        except ClusterError as exc:
            pytest.fail(f"descriptor exhaustion: the master at RLIMIT_NOFILE {lowest} did not reap worker pid "
                        f"{victim}: {exc}")
        assert_no_spin(fdcluster, {}, f"with the master at RLIMIT_NOFILE {lowest} after worker pid {victim} died "
                                      f"(its replacement needs a socketpair and a fork)")
        assert fdcluster.target.alive(), (
            f"descriptor exhaustion: the master died when worker pid {victim} died while it was at RLIMIT_NOFILE "
            f"{lowest} (its replacement needs a socketpair and a fork)")
    try:
        fdcluster.wait_for_workers(timeout=RESPAWN_TIMEOUT, gone=[victim])
    except ClusterError as exc:
        pytest.fail(f"descriptor exhaustion: workers not back after the master's limit was restored: {exc}")


def test_master_serves_waiting_clients_once_its_limit_is_restored(fdcluster):
    clients = []
    try:
        with at_lowest_free_fd(fdcluster.master) as lowest:
            clients = send_pings(fdcluster, 2 * len(fdcluster.workers))
            # Nothing can be accepted now; the window only lets the master meet its limit.
            assert unanswered(clients[:1], 0.5), (
                f"descriptor exhaustion: a client was answered with the master at RLIMIT_NOFILE {lowest}: "
                f"the limit did not stop accept (a free descriptor number below it?)")
        missing = unanswered(clients, ANSWER_TIMEOUT) if fdcluster.target.alive() else ["the master died"]
        assert not missing, (
            f"descriptor exhaustion: {len(missing)} of {len(clients)} clients that connected while the master was "
            f"at RLIMIT_NOFILE {lowest} were not answered within {ANSWER_TIMEOUT:g} s of the limit being restored: "
            f"{missing}")
    finally:
        close_all(clients)


def test_worker_at_its_limit_loses_no_handoff(fdcluster):
    baseline = cpu_shares(fdcluster, [fdcluster.master] + fdcluster.workers, BASELINE_WINDOW, "of the idle cluster")
    worker = fdcluster.workers[0]
    clients = []
    try:
        with at_lowest_free_fd(worker) as lowest:
            clients = send_pings(fdcluster, 4 * len(fdcluster.workers))
            missing = unanswered(clients, ANSWER_TIMEOUT)
            assert not missing, (
                f"descriptor exhaustion: {len(missing)} of {len(clients)} clients not answered within "
                f"{ANSWER_TIMEOUT:g} s while worker pid {worker} was at RLIMIT_NOFILE {lowest} (handoffs to it lost "
                f"or bounced between it and the master): {missing}")
            assert_no_spin(fdcluster, baseline, f"with worker pid {worker} at RLIMIT_NOFILE {lowest}")
        close_all(clients)
        clients = send_pings(fdcluster, 2 * len(fdcluster.workers))
        missing = unanswered(clients, ANSWER_TIMEOUT)
        assert not missing, (f"descriptor exhaustion: after worker pid {worker}'s limit was restored, "
                             f"{len(missing)} of {len(clients)} new clients were not answered: {missing}")
    finally:
        close_all(clients)
