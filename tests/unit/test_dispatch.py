"""The handoff state machine, driven with fake channels and sockets."""

from __future__ import annotations

import errno
from collections import Counter

import pytest

from fdcluster_server import dispatch
from fdcluster_server.dispatch import LEAST_CONNECTIONS, ROUND_ROBIN, Dispatcher, WorkerSlot


class FakeConn:
    def __init__(self, n):
        self.n = n
        self.closed = False

    def fileno(self):
        return 100 + self.n

    def close(self):
        assert not self.closed, f"conn {self.n} closed twice"
        self.closed = True


class FakeChannel:
    def __init__(self, fail=None):
        self.sent = []
        self.fail = fail  # an errno every send raises, until cleared

    def send_handoff(self, conn_id, fd):
        if self.fail:
            raise OSError(self.fail, "fake")
        self.sent.append((conn_id, fd))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def cluster(n, strategy=ROUND_ROBIN, window=4, max_pending=16, clock=None):
    d = Dispatcher(strategy, window=window, max_pending=max_pending, clock=clock or FakeClock())
    for i in range(n):
        d.add(WorkerSlot(i, 1000 + i, FakeChannel()))
    return d


def ack_all(d):
    for w in d.workers.values():
        d.ack(w.index, list(w.unacked))


class TestRoundRobin:
    def test_sequential_connections_cycle_exactly(self):
        d = cluster(3)
        for n in range(9):
            d.distribute(FakeConn(n))
            ack_all(d)
        assert [w.handed for w in d.workers.values()] == [3, 3, 3]

    def test_ack_closes_the_masters_copy_once(self):
        d = cluster(1)
        conn = FakeConn(0)
        d.distribute(conn)
        assert not conn.closed and d.held == 1
        ack_all(d)
        assert conn.closed and d.held == 0

    def test_busy_worker_keeps_its_turn_until_skip_after(self):
        clock = FakeClock()
        d = cluster(2, window=1, clock=clock)
        d.distribute(FakeConn(0))  # worker 0, not acknowledged yet
        d.distribute(FakeConn(1))  # worker 1
        d.ack(1, [2])
        d.distribute(FakeConn(2))  # worker 0's turn: it is full but only just, so wait
        assert len(d.pending) == 1 and d.next_deadline() == pytest.approx(d.skip_after)
        d.ack(0, [1])
        assert d.workers[0].handed == 2 and not d.pending

    def test_frozen_worker_is_skipped_after_skip_after(self):
        clock = FakeClock()
        d = cluster(2, window=1, clock=clock)
        d.distribute(FakeConn(0))  # worker 0, never acknowledged (frozen)
        for n in range(1, 4):
            d.distribute(FakeConn(n))
            clock.now += d.skip_after
            d.distribute()
            d.ack(1, list(d.workers[1].unacked))
        assert d.workers[0].handed == 1 and d.workers[1].handed == 3

    def test_burst_rotates_exactly_while_acks_are_late(self):
        d = cluster(3, window=2)
        for n in range(12):
            d.distribute(FakeConn(n))
            if n % 3 == 2:
                ack_all(d)  # acknowledgements arrive in bursts, late
        ack_all(d)
        assert [w.handed for w in d.workers.values()] == [4, 4, 4]

    def test_a_stalled_turn_once_passed_over_is_no_longer_a_deadline(self):
        # The loop sleeps until next_deadline(): one left in the past made it select(0) in a busy loop.
        clock = FakeClock()
        d = cluster(1, window=1, clock=clock)
        d.distribute(FakeConn(0))  # fills worker 0's window; it never acknowledges (frozen)
        d.distribute(FakeConn(1))  # waits for worker 0's turn
        clock.now += d.skip_after
        d.distribute_due()
        deadline = d.next_deadline()
        assert deadline is None or deadline > clock.now, (
            f"worker 0 stays full and pending={len(d.pending)}, yet next_deadline() is {deadline}, "
            f"not after now={clock.now}: the master's loop would spin")

    def test_no_free_worker_queues_until_an_ack(self):
        d = cluster(1, window=1)
        d.distribute(FakeConn(0))
        d.distribute(FakeConn(1))
        assert len(d.pending) == 1
        ack_all(d)
        assert len(d.pending) == 0 and d.workers[0].handed == 2


class TestWorkerDeath:
    def test_unacknowledged_sockets_go_to_a_live_worker(self):
        d = cluster(2, window=8)
        conns = [FakeConn(n) for n in range(4)]
        for c in conns:
            d.distribute(c)
        dead_ids = list(d.workers[0].unacked)
        assert d.remove(0) == dead_ids
        assert set(d.workers[1].unacked) == {1, 2, 3, 4}
        assert not any(c.closed for c in conns)
        assert d.redistributed == 2

    def test_remove_twice_is_harmless(self):
        d = cluster(2)
        d.remove(0)
        assert d.remove(0) == []

    def test_epipe_on_send_removes_worker_and_requeues(self):
        d = Dispatcher(ROUND_ROBIN)
        d.add(WorkerSlot(0, 1, FakeChannel(fail=errno.EPIPE)))
        d.add(WorkerSlot(1, 2, FakeChannel()))
        conn = FakeConn(0)
        d.distribute(conn)
        assert 0 not in d.workers
        assert list(d.workers[1].unacked) == [1]

    def test_full_channel_keeps_worker_and_socket(self):
        d = Dispatcher(ROUND_ROBIN)
        d.add(WorkerSlot(0, 1, FakeChannel(fail=errno.EAGAIN)))
        d.distribute(FakeConn(0))
        assert 0 in d.workers and len(d.pending) == 1

    def test_full_channel_pauses_that_worker_and_hands_the_socket_to_another(self):
        blocked = []
        d = Dispatcher(ROUND_ROBIN, clock=FakeClock(), on_blocked=blocked.append)
        full = FakeChannel(fail=errno.EAGAIN)
        d.add(WorkerSlot(0, 1, full))
        d.add(WorkerSlot(1, 2, FakeChannel()))
        d.distribute(FakeConn(0))
        assert list(d.workers[1].unacked) == [1], "the socket stayed pending after worker 0's channel was full"
        assert blocked == [0], "the master was not asked to watch worker 0's channel for writability"
        full.fail = None
        d.distribute(FakeConn(1))
        assert list(d.workers[1].unacked) == [1, 2], "a paused worker was offered a socket before it drained"
        d.resume(0)  # the master saw its channel writable
        d.distribute(FakeConn(2))
        assert list(d.workers[0].unacked) == [3]

    def test_full_channel_of_the_only_worker_retries_when_it_drains(self):
        d = Dispatcher(ROUND_ROBIN, clock=FakeClock())
        full = FakeChannel(fail=errno.EAGAIN)
        d.add(WorkerSlot(0, 1, full))
        d.distribute(FakeConn(0))
        assert len(d.pending) == 1 and d.next_deadline() is not None, "nothing would retry the pending socket"
        full.fail = None
        d.resume(0)
        assert list(d.workers[0].unacked) == [1] and not d.pending

    @pytest.mark.parametrize("error", [errno.ENOMEM, errno.ETOOMANYREFS, errno.ENOBUFS],
                             ids=["ENOMEM", "ETOOMANYREFS", "ENOBUFS"])
    def test_transient_send_error_keeps_the_worker_and_its_unacknowledged_sockets(self, error):
        clock = FakeClock()
        d = cluster(2, window=8, clock=clock)
        d.distribute(FakeConn(0))  # conn 1: in worker 0's queue, not acknowledged yet
        d.distribute(FakeConn(1))  # conn 2: worker 1
        d.workers[0].channel.fail = error
        d.distribute(FakeConn(2))  # conn 3: worker 0's turn, and its send fails
        assert 0 in d.workers, f"{errno.errorcode[error]} on send retired a live worker"
        assert 1 in d.workers[0].unacked and 1 not in d.workers[1].unacked, (
            "conn 1, still in worker 0's queue, was handed to worker 1 too: two workers would serve one client")
        d.workers[0].channel.fail = None
        clock.now += dispatch.SEND_RETRY
        d.distribute_due()
        assert 3 in d.workers[0].unacked or 3 in d.workers[1].unacked, "the failed socket was never sent again"

    def test_rejected_socket_is_handed_again(self):
        d = cluster(2)
        d.distribute(FakeConn(0))
        d.reject(0, [1])
        assert d.workers[0].rejected == 1
        assert 1 in d.workers[1].unacked

    def test_rejecting_worker_is_not_offered_the_socket_again_at_once(self):
        clock = FakeClock()
        d = cluster(1, clock=clock)
        d.distribute(FakeConn(0))
        d.reject(0, [1])
        assert not d.workers[0].unacked and len(d.pending) == 1, "the rejected socket went straight back to worker 0"
        clock.now += dispatch.REJECT_PAUSE
        d.distribute_due()
        assert list(d.workers[0].unacked) == [1]

    def test_socket_rejected_reject_budget_times_is_closed_and_counted(self):
        clock = FakeClock()
        d = cluster(1, clock=clock)
        conn = FakeConn(0)
        d.distribute(conn)
        for attempt in range(dispatch.REJECT_BUDGET):
            assert 1 in d.workers[0].unacked, f"attempt {attempt}: conn 1 not handed to worker 0"
            d.reject(0, [1])
            clock.now += dispatch.REJECT_PAUSE
            d.distribute_due()
        assert conn.closed and d.rejected_closed == 1, f"rejected {dispatch.REJECT_BUDGET} times, still held"
        assert d.held == 0 and not d.pending

    def test_late_ack_from_removed_worker_is_ignored(self):
        d = cluster(2)
        conn = FakeConn(0)
        d.distribute(conn)
        d.remove(0)
        d.ack(0, [1])
        assert not conn.closed


class TestLeastConnections:
    def test_goes_to_fewest_open_connections(self):
        d = cluster(3, LEAST_CONNECTIONS)
        for n in range(3):
            d.distribute(FakeConn(n))
        ack_all(d)
        d.closed(1, 1)  # worker 1 is now the least loaded
        d.distribute(FakeConn(9))
        assert list(d.workers[1].unacked) == [4]

    def test_ties_rotate(self):
        d = cluster(3, LEAST_CONNECTIONS)
        for n in range(6):
            d.distribute(FakeConn(n))
            ack_all(d)
            for w in d.workers.values():
                d.closed(w.index, w.active)
        assert Counter(w.handed for w in d.workers.values()) == Counter({2: 3})


class TestBounds:
    def test_full_when_pending_reaches_limit(self):
        d = Dispatcher(ROUND_ROBIN, max_pending=3)
        for n in range(3):
            d.distribute(FakeConn(n))
        assert d.full

    def test_close_all_closes_everything_held(self):
        d = cluster(1, window=1)
        conns = [FakeConn(n) for n in range(3)]
        for c in conns:
            d.distribute(c)
        d.close_all()
        assert all(c.closed for c in conns) and d.held == 0

    def test_unknown_strategy_is_refused(self):
        with pytest.raises(ValueError, match="unknown strategy 'random'"):
            Dispatcher("random")
