"""The master's handoff state machine: which worker gets which accepted socket.

Three collections, after Node's round_robin_handle.js: all workers, the pending
sockets waiting for a worker, and per worker the sockets handed to it but not
yet acknowledged.  Four verbs: ``add``, ``remove``, ``distribute``, ``handoff``;
plus ``ack`` and ``reject`` for what the worker says back.

Whoever holds a socket closes it: the dispatcher owns a pending socket until a
worker acknowledges it, then closes the master's copy.  A socket whose worker
died or rejected it goes back to the front of the queue, so no accepted
connection is lost to a worker's death; a socket rejected ``REJECT_BUDGET``
times is closed instead (counted in ``rejected_closed``), so a worker out of
descriptors cannot bounce it forever.

A worker that cannot take a socket now (full channel, a transient send error,
a reject) is paused: passed over until ``paused_until``, or until the master
sees its channel writable again and calls ``resume``.  The master calls
``distribute_due`` every turn and sleeps no longer than ``next_deadline``;
a deadline, once due, is cleared, so the loop never spins on one in the past.

Pure: the channel (``HandoffSink``) and the socket (``AcceptedSocket``) are duck-typed, so the tests drive
this module with fakes.
"""

from __future__ import annotations

import bisect
import errno
import time
from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Optional, Protocol, Tuple

ROUND_ROBIN = "round-robin"
LEAST_CONNECTIONS = "least-connections"
SHARED_ACCEPT = "shared-accept"
STRATEGIES = (ROUND_ROBIN, LEAST_CONNECTIONS, SHARED_ACCEPT)

# Only these send errors mean the worker is gone; anything else (ENOMEM, ETOOMANYREFS...) is retried
# later, because a live worker may still hold, and serve, every socket it has not acknowledged yet.
WORKER_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN))
# A full channel: the master watches it for writability (``on_blocked``); this is the fallback retry.
CHANNEL_FULL = frozenset((errno.EAGAIN, errno.EWOULDBLOCK))
CHANNEL_RETRY = 0.5
SEND_RETRY = 0.1  # after a transient send error other than a full channel
REJECT_BUDGET = 3  # rejects of one socket before it is closed rather than handed again
REJECT_PAUSE = 0.1  # a rejecting worker is not offered another socket for this long

Pending = Tuple[int, "AcceptedSocket"]  # (conn id, socket) waiting for a worker


class AcceptedSocket(Protocol):
    """An accepted client socket, as the dispatcher sees it (``acceptor.ClientSocket``).

    Not ``worker.Connection``, the worker's live client with its buffers.
    """

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class HandoffSink(Protocol):
    """Where the dispatcher sends a worker's sockets: ``channel.Channel``, or a fake in tests."""

    def send_handoff(self, conn_id: int, fd: int) -> None: ...


class WorkerSlot:
    """The master's view of one live worker, in the handoff rotation from READY to death."""

    __slots__ = ("index", "pid", "channel", "unacked", "active", "handed", "acked", "rejected", "full_since",
                 "waited_out", "paused_until")

    def __init__(self, index: int, pid: int, channel: HandoffSink) -> None:
        self.index = index
        self.pid = pid
        self.channel = channel
        self.unacked: Dict[int, AcceptedSocket] = {}
        self.active = 0  # connections acknowledged and not yet reported closed
        self.handed = 0
        self.acked = 0
        self.rejected = 0
        self.full_since: Optional[float] = None  # when its window filled up; None while it has room
        self.waited_out = False  # its full window's turn has expired and was passed over (round-robin)
        self.paused_until: Optional[float] = None  # not offered a socket before this (full channel, reject)

    @property
    def load(self) -> int:
        return self.active + len(self.unacked)

    def __repr__(self) -> str:
        return f"<worker {self.index} pid={self.pid} unacked={len(self.unacked)} active={self.active}>"


class Dispatcher:
    """Hands accepted sockets to workers by strategy, keeping each until acknowledged."""

    def __init__(
        self,
        strategy: str = ROUND_ROBIN,
        window: int = 4,
        max_pending: int = 1024,
        skip_after: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        on_blocked: Callable[[int], None] = lambda index: None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.window = window
        self.max_pending = max_pending
        # Round-robin waits this long for a busy worker's acknowledgement before passing it
        # over: long enough that a worker merely descheduled keeps its turn (exact rotation
        # under bursts), short enough that a frozen one stalls its queue only briefly.
        self.skip_after = skip_after
        self.clock = clock
        # Called with a worker's index when its channel is full: the master then watches it for
        # writability and calls ``resume``, so the socket left pending goes out as soon as it drains.
        self.on_blocked = on_blocked
        self.workers: Dict[int, WorkerSlot] = {}  # index -> slot: all live workers
        self._order: List[int] = []  # their indexes, sorted: the rotation (kept by add and remove)
        self._rotations: List[List[WorkerSlot]] = []  # the rotation from each start position in _order
        self._rotations_of: Optional[List[int]] = None  # the _order they were built from
        self.pending: Deque[Pending] = deque()
        self._rejects: Dict[int, int] = {}  # conn id -> rejects so far, for sockets rejected at least once
        self._cursor = 0  # round-robin position, as a worker index
        self._next_id = 0
        self.accepted = 0
        self.redistributed = 0
        self.rejected_closed = 0

    # -- the four verbs ---------------------------------------------------------

    def add(self, worker: WorkerSlot) -> None:
        """A worker is up and may be handed connections."""
        self.workers[worker.index] = worker
        self._order = sorted(self.workers)
        self.distribute()

    def remove(self, index: int) -> List[int]:
        """A worker is gone: its unacknowledged sockets go back to the front of the queue.

        Returns the ids of the requeued connections (for logging).
        """
        worker = self.workers.pop(index, None)
        if worker is None:
            return []  # already removed: the channel EOF and SIGCHLD both report a death
        self._order = sorted(self.workers)
        orphans = list(worker.unacked.items())
        worker.unacked.clear()
        # Front of the queue, in their original order: they were accepted first.
        for item in reversed(orphans):
            self.pending.appendleft(item)
        self.redistributed += len(orphans)
        self.distribute()
        return [conn_id for conn_id, _ in orphans]

    def queue(self, conn: AcceptedSocket) -> None:
        """A newly accepted socket waits for a worker; the next ``distribute`` hands it out."""
        self._next_id += 1
        self.accepted += 1
        self.pending.append((self._next_id, conn))

    def distribute(self, conn: Optional[AcceptedSocket] = None) -> None:
        """Queue ``conn`` (if given) and hand out as many queued sockets as workers can take."""
        if conn is not None:
            self.queue(conn)
        while self.pending:
            worker = self._pick()
            if worker is None:
                return  # every worker's window is full (or none is alive): wait for acks
            conn_id, pending = self.pending.popleft()
            # A failed send requeued the socket and paused (or removed) that worker: the next pick skips it.
            self.handoff(worker, conn_id, pending)

    def handoff(self, worker: WorkerSlot, conn_id: int, conn: AcceptedSocket) -> bool:
        """Send one socket to ``worker``; keep the master's copy until it is acknowledged.

        Returns False when the socket could not be sent and was requeued.
        """
        try:
            worker.channel.send_handoff(conn_id, conn.fileno())
        except OSError as exc:
            self.pending.appendleft((conn_id, conn))
            if exc.errno in WORKER_GONE:
                self.remove(worker.index)  # SIGCHLD will confirm it; its unacknowledged sockets are requeued
            elif exc.errno in CHANNEL_FULL:
                self.pause(worker, CHANNEL_RETRY)
                self.on_blocked(worker.index)
            else:
                self.pause(worker, SEND_RETRY)  # transient (ENOMEM, ETOOMANYREFS...): the worker keeps its sockets
            return False
        worker.unacked[conn_id] = conn
        worker.handed += 1
        if len(worker.unacked) >= self.window and worker.full_since is None:
            worker.full_since = self.clock()
        return True

    def pause(self, worker: WorkerSlot, seconds: float) -> None:
        """Offer ``worker`` nothing for ``seconds`` (or until ``resume``)."""
        worker.paused_until = self.clock() + seconds

    def resume(self, index: int) -> None:
        """The master saw worker ``index``'s channel writable again: offer it sockets at once."""
        worker = self.workers.get(index)
        if worker is None:
            return  # removed meanwhile
        worker.paused_until = None
        self.distribute()

    def distribute_due(self) -> None:
        """Hand out what waits on a pause or a round-robin turn that has run out; the loop calls this every turn."""
        if not self.pending:
            return  # nothing waits
        now = self.clock()
        due = False
        for worker in self.workers.values():
            if worker.paused_until is not None and worker.paused_until <= now:
                worker.paused_until = None
                due = True
            if (self.strategy == ROUND_ROBIN and worker.full_since is not None and not worker.waited_out
                    and now - worker.full_since >= self.skip_after):
                worker.waited_out = True  # passed over from now on; its deadline is no longer a deadline
                due = True
        if due:
            self.distribute()

    # -- what workers say back --------------------------------------------------

    def ack(self, index: int, conn_ids: Iterable[int]) -> None:
        """The worker holds these sockets now: close the master's copies."""
        worker = self.workers.get(index)
        if worker is None:
            return  # a late message from a worker already removed
        for conn_id in conn_ids:
            conn = worker.unacked.pop(conn_id, None)
            if conn is None:
                continue  # unknown id: never ours to close
            conn.close()
            worker.acked += 1
            worker.active += 1
        if self._rejects:
            for conn_id in conn_ids:
                self._rejects.pop(conn_id, None)
        if len(worker.unacked) < self.window:
            self._has_room(worker)
        self.distribute()

    def reject(self, index: int, conn_ids: Iterable[int]) -> None:
        """The worker could not take these sockets (out of descriptors, a truncated message).

        Each goes back to the front of the queue, or is closed once rejected
        ``REJECT_BUDGET`` times; the worker is not offered another for ``REJECT_PAUSE``.
        """
        worker = self.workers.get(index)
        if worker is None:
            return  # its unacked sockets were requeued when it was removed
        for conn_id in conn_ids:
            conn = worker.unacked.pop(conn_id, None)
            if conn is None:
                continue  # unknown id: never ours
            worker.rejected += 1
            rejects = self._rejects.get(conn_id, 0) + 1
            if rejects >= REJECT_BUDGET:
                del self._rejects[conn_id]
                conn.close()
                self.rejected_closed += 1
            else:
                self._rejects[conn_id] = rejects
                self.pending.appendleft((conn_id, conn))
        if len(worker.unacked) < self.window:
            self._has_room(worker)
        self.pause(worker, REJECT_PAUSE)
        self.distribute()

    def closed(self, index: int, count: int) -> None:
        """The worker closed ``count`` client connections."""
        worker = self.workers.get(index)
        if worker is not None:
            worker.active = max(0, worker.active - count)
            if self.strategy == LEAST_CONNECTIONS:
                self.distribute()

    # -- state ----------------------------------------------------------------

    @property
    def full(self) -> bool:
        """True when the master should stop accepting and leave clients in the kernel backlog."""
        return len(self.pending) >= self.max_pending

    @property
    def held(self) -> int:
        """Client sockets the master holds: pending plus handed and unacknowledged."""
        return len(self.pending) + sum(len(w.unacked) for w in self.workers.values())

    def next_deadline(self) -> Optional[float]:
        """When a pause or a waited-for round-robin turn ends, if any holds back a pending socket.

        The caller calls ``distribute_due`` then; a due deadline is cleared by it, never returned twice.
        """
        if not self.pending:
            return None
        deadlines = [w.paused_until for w in self.workers.values() if w.paused_until is not None]
        if self.strategy == ROUND_ROBIN:
            deadlines += [w.full_since + self.skip_after for w in self.workers.values()
                          if w.full_since is not None and not w.waited_out]
        return min(deadlines) if deadlines else None

    def close_all(self) -> None:
        """Close every socket the master still holds (fast shutdown)."""
        while self.pending:
            self.pending.popleft()[1].close()
        for worker in self.workers.values():
            for conn in worker.unacked.values():
                conn.close()
            worker.unacked.clear()
        self._rejects.clear()

    def _pause_over(self, worker: WorkerSlot) -> bool:
        """True (and the pause forgotten) once ``worker``'s pause has run out."""
        assert worker.paused_until is not None
        if self.clock() < worker.paused_until:
            return False
        worker.paused_until = None
        return True

    @staticmethod
    def _has_room(worker: WorkerSlot) -> None:
        worker.full_since = None
        worker.waited_out = False

    def _pick(self) -> Optional[WorkerSlot]:
        """The worker to hand the next socket to, or None if none can take one."""
        order = self._order
        if not order:
            return None
        # Start just after the last worker served, so ties rotate.
        start = bisect.bisect_left(order, self._cursor)
        if self._rotations_of is not order:  # the workers changed (``_order`` is a new list then): rebuild
            workers = self.workers
            self._rotations = [[workers[i] for i in order[k:] + order[:k]] for k in range(len(order) + 1)]
            self._rotations_of = order
        rotation = self._rotations[start]
        if self.strategy == LEAST_CONNECTIONS:
            candidates = [w for w in rotation if len(w.unacked) < self.window
                          and (w.paused_until is None or self._pause_over(w))]
            chosen = min(candidates, key=lambda w: w.load) if candidates else None  # min keeps the first of equals
        else:
            chosen = self._next_in_turn(rotation)
        if chosen is not None:
            self._cursor = chosen.index + 1
        return chosen

    def _next_in_turn(self, rotation: List[WorkerSlot]) -> Optional[WorkerSlot]:
        now = None
        for worker in rotation:
            if worker.paused_until is not None and not self._pause_over(worker):
                continue  # a full channel, a reject: not offered anything until the pause is over
            if len(worker.unacked) < self.window:
                return worker
            if worker.waited_out:
                continue  # its turn expired already: passed over until it acknowledges
            now = self.clock() if now is None else now
            assert worker.full_since is not None  # set whenever its window is full
            if now - worker.full_since < self.skip_after:
                return None  # its acknowledgement is probably on the way: keep its turn
            worker.waited_out = True
        return None  # every worker is full
