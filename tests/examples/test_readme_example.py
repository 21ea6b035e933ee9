"""The README's "your own scenario" example, kept here so it runs and cannot rot."""

import pytest

from pytest_fdcluster import assert_fair, assert_no_fd_leak, faults, load, wait_until


@pytest.mark.fdcluster(workers=3)
def test_survives_a_kill_and_stays_fair(fdcluster):
    victim = fdcluster.kill_worker(0)  # the fault: one call
    fdcluster.wait_for_workers(3, gone=[victim])
    result = load.run_load(fdcluster.address, clients=6, requests=600, cluster=fdcluster)
    assert result.error_count == 0, result
    assert_fair(result.per_worker, min_jain=0.9, max_ratio=2.0)


def test_truncated_frames_leak_nothing(fdcluster):
    before = fdcluster.snapshot()
    for keep in range(1, 8):
        faults.truncate_and_close(fdcluster.address, b'\x20\x00\x00\x00{"in": "ping"', keep=keep)
    wait_until(lambda: not fdcluster.snapshot().client_sockets, 5.0, lambda: "the server to close them")
    assert_no_fd_leak(before, fdcluster.snapshot())
