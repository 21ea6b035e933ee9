"""Slow and hostile clients: they cost the server memory and descriptors, never other clients' service.

Invariants checked:
- isolation (3): with hundreds of idle or trickling connections open, or slow
  readers whose responses back up, normal clients' median latency stays within
  a bound relative to a baseline measured in the same test;
- liveness (1): a storm of hundreds of simultaneous connections is answered in full;
- fd lifecycle (4): abortive closes (RST) leave no CLOSE_WAIT and worker fd
  counts return to their baseline; an incomplete frame older than the idle
  timeout is closed by the server (the reference server's, or the one a target
  declares: ``--fdcluster-declare NAME:idle_timeout=SECONDS``).
"""

from __future__ import annotations

import statistics
import time

import pytest

from pytest_fdcluster import ClusterError, assert_no_close_wait, faults, require, wait_until

SAMPLES = 150
LATENCY_FACTOR = 4.0
LATENCY_SLACK = 0.003  # seconds: scheduler noise on a loaded 2-core machine dwarfs sub-ms medians
ANSWER_TIMEOUT = 3.0


def median_latency(cluster, samples=SAMPLES):
    with cluster.client(ANSWER_TIMEOUT) as client:
        timings = []
        for i in range(samples):
            start = time.perf_counter()
            client.call("ping", i)
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def assert_isolated(cluster, baseline, what):
    """isolation: every worker still answers quickly with the hostile clients present."""
    for _ in range(len(cluster.workers)):  # one fresh client per worker's turn, so each worker is measured
        try:
            loaded = median_latency(cluster, samples=SAMPLES // len(cluster.workers) + 1)
        except Exception as exc:
            pytest.fail(f"isolation: a normal client was not served with {what}: {exc!r}")
        bound = baseline * LATENCY_FACTOR + LATENCY_SLACK
        assert loaded <= bound, (
            f"isolation: median ping latency {loaded * 1e3:.2f} ms with {what}, baseline {baseline * 1e3:.2f} ms "
            f"(bound {bound * 1e3:.2f} ms)")


def worker_fd_counts(cluster):
    return {p.label: p.fd_count for p in cluster.snapshot().workers}


def test_slowloris_idle_and_trickling_connections(fdcluster):
    baseline = median_latency(fdcluster)
    with faults.Slowloris(fdcluster.address, count=200, partial=True) as loris:
        loris.open()
        assert_isolated(fdcluster, baseline, "200 slowloris connections open")


def test_incomplete_frames_time_out(fdcluster_factory):
    # The reference server is started with a short timeout; any other target is judged by the one it declares.
    require(fdcluster_factory, "idle_timeout")
    cluster = fdcluster_factory.start(idle_timeout=0.5) if fdcluster_factory.is_reference else fdcluster_factory.start()
    idle_timeout = require(cluster, "idle_timeout")
    with faults.Slowloris(cluster.address, count=20, partial=True) as loris:
        loris.open()
        try:
            wait_until(lambda: loris.alive() == 0, idle_timeout + 4.5,
                       lambda: f"{loris.alive()} of 20 slowloris connections still open")
        except ClusterError as exc:
            pytest.fail(f"isolation: incomplete frames older than the {idle_timeout:g} s idle timeout were not closed: "
                        f"{exc}")
    assert cluster.call("ping", "ok") == "ok"


def test_slow_readers_do_not_stall_others(fdcluster):
    baseline = median_latency(fdcluster)
    readers = [faults.SlowReader(fdcluster.address, requests=64, payload_size=64 * 1024)
               for _ in range(len(fdcluster.workers))]
    try:
        for reader in readers:
            reader.fill(timeout=5.0)
        assert_isolated(fdcluster, baseline, f"{len(readers)} slow readers with full buffers")
    finally:
        for reader in readers:
            reader.close()


def test_connection_storm_is_answered(fdcluster):
    before = worker_fd_counts(fdcluster)
    result = faults.ConnectionStorm(fdcluster.address, count=300, concurrency=300, timeout=15.0).run()
    assert result.answered == 300, f"liveness: connection storm of 300: {result}"
    try:
        wait_until(lambda: worker_fd_counts(fdcluster) == before, 5.0,
                   lambda: f"worker fds {worker_fd_counts(fdcluster)} to return to {before}")
    except ClusterError as exc:
        pytest.fail(f"fd lifecycle: after the storm: {exc}")


def test_abortive_close_leaves_nothing(fdcluster):
    before = worker_fd_counts(fdcluster)
    faults.RstStorm(fdcluster.address, count=100).run()
    try:
        wait_until(lambda: not fdcluster.snapshot().close_wait and worker_fd_counts(fdcluster) == before, 5.0,
                   lambda: f"worker fds {worker_fd_counts(fdcluster)} to return to {before}")
    except ClusterError:
        pass
    assert_no_close_wait(fdcluster.snapshot())
    assert worker_fd_counts(fdcluster) == before, (
        f"fd lifecycle: worker fds after 100 RSTs: {worker_fd_counts(fdcluster)} vs {before}")
    assert fdcluster.call("ping", "after") == "after"
