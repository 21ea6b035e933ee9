"""Descriptor exhaustion: a process out of descriptors waits, survives, and serves again.

The fault: a process's soft RLIMIT_NOFILE is lowered from outside (prlimit)
to its lowest free descriptor number -- the limit caps descriptor numbers, so
no free number stays below it and its next ``accept``, ``socketpair`` or
``socket`` fails with EMFILE.  Limits are always restored, also when a check
fails.

Which processes are limited follows the target's declared strategy, because
only the processes that accept can be stopped from accepting:

- a handoff strategy (round-robin, least-connections, ...): the master, which
  accepts and passes each socket on;
- ``strategy=shared-accept``: every worker, each accepting on the shared
  listener (the master never accepts; limiting it would test nothing);
- ``strategy=unknown``: every process, master and workers, so nobody can
  accept whatever the model.

Invariants:

- the accepting processes at their limit do not spin: no process of the
  cluster above ``max(FLOOR, FACTOR x idle baseline)`` of a core over
  ``WINDOW`` while clients wait, and none of them dies;
- the master at its limit does not crash on its next fork: a worker killed
  meanwhile leaves the master alive, and once the limit is restored the
  workers are back (a failed fork is retried, not given up);
- no client hangs across the exhaustion.  Nothing is answered while the
  accepting processes are at their limit (else the limit did not stop
  accept).  Once it is restored, every client that connected meanwhile is,
  within ``ANSWER_TIMEOUT``, either answered with its echo or closed
  (EOF or RST): a server may shed load it cannot accept -- libuv, on EMFILE,
  accepts and closes its backlog with a reserve descriptor, as Node cannot
  pause accepting -- but a client left in the backlog, or accepted and never
  answered, hangs, and that fails.  New clients after the restore are all
  answered.  Shedding is judged only here; the reference server keeps its
  backlog, which the spin check and the hang bound both watch: a server that
  retries accept in a loop spins, one that stops accepting for good hangs.

The same for a worker at its limit: handoffs to it cannot be received
(SCM_RIGHTS descriptors beyond the limit are discarded by the kernel), or
under shared accept it cannot accept, so every client must be answered within
``ANSWER_TIMEOUT`` by another worker (nothing lost, nothing bounced forever),
and no process spins meanwhile.
"""

from __future__ import annotations

import contextlib
import time

import psutil
import pytest

from pytest_fdcluster import ClientError, ClientTimeout, ClusterError, process_alive, resources, wait_until

WINDOW = 0.5
BASELINE_WINDOW = 0.3
FLOOR = 0.05
FACTOR = 3.0
ANSWER_TIMEOUT = 5.0
RESPAWN_TIMEOUT = 10.0
REAP_TIMEOUT = 5.0

#: What became of a client (see ``outcomes``).
ANSWERED, CLOSED, HUNG = "answered", "closed", "hung"


def accepting_processes(cluster):
    """``(pids, why)``: the processes that accept connections for the target's declared strategy, and why."""
    strategy = cluster.capabilities.strategy
    if strategy == "shared-accept":
        return list(cluster.workers), "the workers accept on the shared listener: strategy=shared-accept"
    if strategy == "unknown":
        return ([cluster.master] + list(cluster.workers),
                "strategy=unknown: who accepts is not declared, so every process is limited")
    return [cluster.master], f"the master accepts and hands connections off: strategy={strategy}"


def describe_limits(cluster, limits):
    """``worker 1 pid 12 at RLIMIT_NOFILE 9 and worker 2 pid 13 at RLIMIT_NOFILE 9``."""
    labels = cluster.labels()
    parts = [f"{labels.get(pid, 'process')} pid {pid} at RLIMIT_NOFILE {limit}" for pid, limit in limits.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def died(cluster, pids):
    """Which of ``pids`` are gone, named (``master pid 10``), or ``""``."""
    labels = cluster.labels()
    gone = [pid for pid in pids if not process_alive(pid)]
    return ", ".join(f"{labels.get(pid, 'process')} pid {pid}" for pid in gone)


def cpu_shares(cluster, pids, seconds, what):
    try:
        return resources.cpu_window(pids, seconds)
    except resources.Unobservable as exc:
        gone = died(cluster, pids)
        if gone:
            pytest.fail(f"descriptor exhaustion: {gone} died {what}")
        pytest.fail(f"descriptor exhaustion: cannot measure the CPU {what}: {exc}")


def assert_no_spin(cluster, baseline, what):
    """descriptor exhaustion: no process of the cluster above its CPU bound over one ``WINDOW``."""
    labels = cluster.labels()
    pids = [cluster.master] + list(cluster.workers)
    shares = cpu_shares(cluster, pids, WINDOW, what)
    loud = [f"{labels.get(pid, 'process')} pid {pid} used {share:.0%} of a core (bound {bound:.0%})"
            for pid, (share, bound) in resources.cpu_over(shares, baseline, FLOOR, FACTOR).items()]
    assert not loud, f"descriptor exhaustion: over {WINDOW:g} s {what}: " + "; ".join(loud)


def idle_baseline(cluster):
    return cpu_shares(cluster, [cluster.master] + cluster.workers, BASELINE_WINDOW, "of the idle cluster")


@contextlib.contextmanager
def at_lowest_free_fd(pids):
    """Each process's soft RLIMIT_NOFILE at its lowest free descriptor number; yields pid -> limit; restores them."""
    limits = {}
    with contextlib.ExitStack() as stack:
        try:
            for pid in pids:
                limits[pid] = resources.lowest_free_fd(pid)
                stack.enter_context(resources.nofile_limit(pid, limits[pid]))
        except resources.Unobservable as exc:
            pytest.fail(f"descriptor exhaustion: {exc}")
        yield limits


def send_pings(cluster, count):
    """``count`` connected clients, client N having sent ping N; a send the server refused is left to ``outcomes``."""
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(count)]
    for number, client in enumerate(clients):
        try:
            client.send_frame({"in": "ping", "params": number})
        except (ClientTimeout, OSError):
            pass  # shed already (reset): the receive sees it too
    return clients


def outcomes(clients, timeout):
    """``(number, outcome, detail)`` per client within ``timeout`` (one shared deadline).

    ``ANSWERED``: its own echo came back; ``CLOSED``: EOF or reset before an
    answer; ``HUNG``: neither; anything else (a wrong answer, garbage) is an
    outcome of its own, spelt out.
    """
    deadline = time.monotonic() + timeout
    found = []
    for number, client in enumerate(clients):
        try:
            reply = client.recv_frame(max(0.0, deadline - time.monotonic()))
        except ClientTimeout:  # before OSError: it is a TimeoutError
            found.append((number, HUNG, f"nothing within {timeout:g} s"))
            continue
        except (ConnectionError, OSError) as exc:
            found.append((number, CLOSED, type(exc).__name__))
            continue
        except ClientError as exc:
            found.append((number, "garbled", f"{exc}"[:120]))
            continue
        if reply == {"out": "pong", "result": number}:
            found.append((number, ANSWERED, ""))
        else:
            found.append((number, "misanswered", f"{reply!r:.80}"))
    return found


def unanswered(clients, timeout):
    """``(number, why)`` for every client whose echo did not arrive within ``timeout``."""
    return [(number, detail or outcome) for number, outcome, detail in outcomes(clients, timeout)
            if outcome != ANSWERED]


def close_all(clients):
    for client in clients:
        client.close()


def test_accepting_processes_at_their_limit_do_not_spin(fdcluster):
    accepting, why = accepting_processes(fdcluster)
    baseline = idle_baseline(fdcluster)
    clients = []
    try:
        with at_lowest_free_fd(accepting) as limits:
            limited = describe_limits(fdcluster, limits)
            clients = send_pings(fdcluster, 2 * len(fdcluster.workers))
            assert_no_spin(fdcluster, baseline, f"with {limited} ({why}) and {len(clients)} clients waiting to be "
                                                f"accepted")
            gone = died(fdcluster, [fdcluster.master] + accepting)
            assert not gone, f"descriptor exhaustion: {gone} died with {limited} ({why})"
    finally:
        close_all(clients)


def test_master_at_its_limit_survives_a_worker_death(fdcluster):
    why = "the master forks the replacement, which needs descriptors in most servers: a socketpair, a pipe"
    with at_lowest_free_fd([fdcluster.master]) as limits:
        limited = describe_limits(fdcluster, limits)
        victim = fdcluster.kill_worker(0)
        try:
            # Reaped: the master saw the death and tried to replace the worker.
            wait_until(lambda: not psutil.pid_exists(victim) or not process_alive(fdcluster.master), REAP_TIMEOUT,
                       lambda: f"worker pid {victim} to be reaped")
        except ClusterError as exc:
            pytest.fail(f"descriptor exhaustion: with {limited}, worker pid {victim} was not reaped: {exc}")
        assert_no_spin(fdcluster, {}, f"with {limited} after worker pid {victim} died ({why})")
        assert fdcluster.target.alive(), (
            f"descriptor exhaustion: the master died when worker pid {victim} died with {limited} ({why})")
    try:
        fdcluster.wait_for_workers(timeout=RESPAWN_TIMEOUT, gone=[victim])
    except ClusterError as exc:
        pytest.fail(f"descriptor exhaustion: worker pid {victim} not replaced within {RESPAWN_TIMEOUT:g} s of the "
                    f"master's limit being restored (a fork that failed at the limit must be retried): {exc}")


def test_waiting_clients_never_hang_once_the_limit_is_restored(fdcluster):
    accepting, why = accepting_processes(fdcluster)
    clients = []
    try:
        with at_lowest_free_fd(accepting) as limits:
            limited = describe_limits(fdcluster, limits)
            clients = send_pings(fdcluster, 2 * len(fdcluster.workers))
            # Nothing can be accepted now (shedding is allowed); the window only lets the processes meet the limit.
            assert unanswered(clients[:1], 0.5), (
                f"descriptor exhaustion: a client was answered with {limited} ({why}): the limit did not stop "
                f"accept (a free descriptor number below it, or another process accepts: is the strategy right?)")
        gone = died(fdcluster, [fdcluster.master])
        assert not gone, f"descriptor exhaustion: {gone} died with {limited} ({why})"
        found = outcomes(clients, ANSWER_TIMEOUT)
        bad = [(number, outcome, detail) for number, outcome, detail in found if outcome not in (ANSWERED, CLOSED)]
        others = [(number, outcome) for number, outcome, _ in found if outcome in (ANSWERED, CLOSED)]
        assert not bad, (
            f"descriptor exhaustion: {len(bad)} of {len(clients)} clients that connected with {limited} ({why}) "
            f"were neither answered nor closed within {ANSWER_TIMEOUT:g} s of the limit being restored "
            f"(left in the backlog, or accepted and never served): {bad}; the others: {others or 'none'}")
        close_all(clients)
        clients = send_pings(fdcluster, 2 * len(fdcluster.workers))
        missing = unanswered(clients, ANSWER_TIMEOUT)
        assert not missing, (
            f"descriptor exhaustion: {len(missing)} of {len(clients)} new clients were not answered within "
            f"{ANSWER_TIMEOUT:g} s after the limit was restored (was {limited}): {missing}")
    finally:
        close_all(clients)


def test_worker_at_its_limit_loses_no_handoff(fdcluster):
    baseline = idle_baseline(fdcluster)
    worker = fdcluster.workers[0]
    if fdcluster.capabilities.strategy == "shared-accept":
        lost = "it cannot accept on the shared listener; another worker must"
    else:
        lost = "handoffs to it lost or bounced between it and the master"
    clients = []
    try:
        with at_lowest_free_fd([worker]) as limits:
            limited = describe_limits(fdcluster, limits)
            clients = send_pings(fdcluster, 4 * len(fdcluster.workers))
            missing = unanswered(clients, ANSWER_TIMEOUT)
            assert not missing, (
                f"descriptor exhaustion: {len(missing)} of {len(clients)} clients not answered within "
                f"{ANSWER_TIMEOUT:g} s with {limited} ({lost}): {missing}")
            assert_no_spin(fdcluster, baseline, f"with {limited}")
        close_all(clients)
        clients = send_pings(fdcluster, 2 * len(fdcluster.workers))
        missing = unanswered(clients, ANSWER_TIMEOUT)
        assert not missing, (f"descriptor exhaustion: after worker pid {worker}'s limit was restored, "
                             f"{len(missing)} of {len(clients)} new clients were not answered: {missing}")
    finally:
        close_all(clients)
