"""Descriptor leaks: every fd a connection costs is given back, in every process.

Invariants checked (fd lifecycle, 4):
- no fd growth in the master or any worker across many connect/close cycles
  (a slope fitted over the cycles, not a one-shot diff);
- no socket left in CLOSE_WAIT after clients leave;
- the master holds no client socket once handed off;
- the master's end of a dead worker's channel is closed;
- no inheritable descriptors beyond stdio in the cluster's processes;
- nothing outlives the cluster: no process and no bound port after teardown.
"""

from __future__ import annotations

import socket

import pytest

from pytest_fdcluster import (
    ClusterError,
    assert_master_holds_no_clients,
    assert_no_close_wait,
    assert_no_fd_growth,
    process_alive,
    wait_until,
)

CYCLES = 12
PER_CYCLE = 4
SETTLE_TIMEOUT = 2.0


def settled(cluster, addresses):
    """True once no server-side socket of these clients is still ESTABLISHED (closed or CLOSE_WAIT)."""
    wanted = set(addresses)
    for process in cluster.snapshot().processes.values():
        for fd in process.tcp_connections:
            if fd.raddr and tuple(fd.raddr) in wanted and fd.status == "ESTABLISHED":
                return False
    return True


def one_cycle(cluster):
    clients = [cluster.client() for _ in range(PER_CYCLE)]
    addresses = [c.local_address for c in clients]
    for i, client in enumerate(clients):
        assert client.call("ping", i) == i
    for client in clients:
        client.close()
    try:
        wait_until(lambda: settled(cluster, addresses), SETTLE_TIMEOUT, lambda: "the server to notice the clients left")
    except ClusterError:
        pass  # a server that never notices is judged by the growth and CLOSE_WAIT checks below


def fd_counts(cluster):
    return {p.label: p.fd_count for p in cluster.snapshot().processes.values()}


def test_no_fd_growth_across_connect_close_cycles(fdcluster):
    one_cycle(fdcluster)  # warm-up: lazily allocated descriptors are not leaks
    series = {}
    for _ in range(CYCLES):
        one_cycle(fdcluster)
        for label, count in fd_counts(fdcluster).items():
            series.setdefault(label, []).append(count)
    complete = {label: counts for label, counts in series.items() if len(counts) == CYCLES}
    assert_no_fd_growth(complete, max_slope=0.25)


def test_no_close_wait_after_clients_leave(fdcluster):
    for _ in range(3):
        one_cycle(fdcluster)
    try:
        wait_until(lambda: not fdcluster.snapshot().close_wait, SETTLE_TIMEOUT, lambda: "CLOSE_WAIT sockets to close")
    except ClusterError:
        pass
    assert_no_close_wait(fdcluster.snapshot())


def test_master_holds_no_client_sockets_after_handoff(fdcluster):
    clients = [fdcluster.client() for _ in range(3 * len(fdcluster.workers))]
    try:
        for client in clients:
            client.call("ping")
        try:
            wait_until(lambda: not fdcluster.snapshot().master_client_sockets, SETTLE_TIMEOUT,
                       lambda: "the master to close its copies of handed-off sockets")
        except ClusterError:
            pass
        assert_master_holds_no_clients(fdcluster.snapshot())
    finally:
        for client in clients:
            client.close()


def test_dead_workers_channel_is_closed_in_master(fdcluster):
    before = fdcluster.snapshot().master
    victim = fdcluster.kill_worker(0)
    try:
        fdcluster.wait_for_workers(timeout=10.0, gone=[victim])
    except ClusterError:
        pass  # no respawn: the master must then hold fewer descriptors, never more
    try:
        wait_until(lambda: fdcluster.snapshot().master.fd_count <= before.fd_count, SETTLE_TIMEOUT,
                   lambda: "the master's fd count to return to its baseline")
    except ClusterError:
        pass  # judged below, with the fds named
    after = fdcluster.snapshot().master
    extra = sorted(set(after.fds) - set(before.fds))
    assert after.fd_count <= before.fd_count, (
        f"fd lifecycle: master (pid {after.pid}) holds {after.fd_count} fds after worker pid {victim} died and was "
        f"replaced, {before.fd_count} before; new: " + ", ".join(str(after.fds[fd]) for fd in extra))


def test_no_inheritable_descriptors(fdcluster):
    with fdcluster.client() as client:
        client.call("ping")
        offenders = []
        for process in fdcluster.snapshot().processes.values():
            for fd in process.inheritable_fds:
                offenders.append(f"{process.label} (pid {process.pid}) fd {fd}")
    assert not offenders, (
        "fd lifecycle: inheritable descriptors would leak into any child process: " + "; ".join(offenders))


def test_nothing_outlives_the_cluster(fdcluster_factory):
    cluster = fdcluster_factory.start()
    pids = [cluster.master] + list(cluster.workers)
    host, port = cluster.address
    for i in range(4):
        assert cluster.call("ping", i) == i
    result = cluster.stop()
    survivors = [pid for pid in pids if process_alive(pid)]
    assert not survivors, f"no orphans: processes {survivors} of the cluster survived its teardown"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()
    assert result.clean, f"fd lifecycle: teardown left something behind: {result}"
