"""Mutants of the master's side: the supervisor, the dispatcher, the acceptor.

Each function patches one small piece of ``fdcluster_server`` so that it
carries one bug a real prefork server has shipped with (or would, after an
innocent-looking edit), on the path where the reference server was hardened:
error paths, descriptor exhaustion, respawns, stalled workers.  Each one's
docstring says what the bug is; ``mutant_expectations.EXPECTED`` says which
scenario module must catch it and under which invariant.
"""

from __future__ import annotations

import random
import time

from mutant_patching import kept, replace

from fdcluster_server import acceptor
from fdcluster_server.config import EXIT_WORKER_CRASHED
from fdcluster_server.dispatch import ROUND_ROBIN, Dispatcher
from fdcluster_server.master import Master

#: ``respawn-budget-never-refilled``: respawns a slot gets before it is given up for crash-looping.
RESPAWN_BUDGET = 3


def master_keeps_fds() -> None:
    """The master never closes its copy of a handed-off socket."""

    def ack(self, index, conn_ids):
        worker_slot = self.workers.get(index)
        if worker_slot is None:
            return
        for conn_id in conn_ids:
            conn = worker_slot.unacked.pop(conn_id, None)
            if conn is not None:
                kept.append(conn)  # the bug: acknowledged, but the master's copy stays open
                worker_slot.acked += 1
                worker_slot.active += 1
        if len(worker_slot.unacked) < self.window:
            self._has_room(worker_slot)
        self.distribute()

    replace(Dispatcher, "ack", ack)


def no_respawn() -> None:
    """A dead worker is reaped but never replaced."""
    replace(Master, "schedule_respawn", lambda self, process: None)


def unfair_dispatch() -> None:
    """Round-robin only when idle: a busy worker keeps getting more (fine under light load)."""
    original = Dispatcher._pick

    def pick(self):
        current = self.workers.get(self._cursor - 1)
        if current is not None and 0 < len(current.unacked) < 64:
            return current  # sticky while it has handoffs in flight
        return original(self)

    replace(Dispatcher, "_pick", pick)


def lost_handoff() -> None:
    """Node's behaviour: sockets handed to a worker that dies before acknowledging are dropped."""

    def remove(self, index):
        worker_slot = self.workers.pop(index, None)
        if worker_slot is None:
            return []
        self._order = sorted(self.workers)
        for conn in worker_slot.unacked.values():
            conn.close()
        worker_slot.unacked.clear()
        self.distribute()
        return []

    replace(Dispatcher, "remove", remove)


def steal_stalled_handoffs() -> None:
    """A worker slow to acknowledge is taken for stuck: its unacknowledged sockets go to others, not taken back.

    They are still in flight on its channel, so it adopts them too when it wakes: two workers hold one connection.
    """
    original = Dispatcher._next_in_turn

    def next_in_turn(self, rotation):
        now = self.clock()
        for worker in rotation:
            if worker.unacked and worker.full_since is not None and now - worker.full_since >= self.skip_after:
                for item in reversed(list(worker.unacked.items())):
                    self.pending.appendleft(item)
                worker.unacked.clear()  # the bug: the handoffs already sent are not recalled (they cannot be)
                self._has_room(worker)
        return original(self, rotation)

    replace(Dispatcher, "_next_in_turn", next_in_turn)


def stale_turn_deadline() -> None:
    """A round-robin turn that has run out stays a deadline: with every worker full the master polls, select(0)."""

    def next_deadline(self):
        if not self.pending:
            return None
        deadlines = [w.paused_until for w in self.workers.values() if w.paused_until is not None]
        if self.strategy == ROUND_ROBIN:
            # the bug: ``and not w.waited_out`` forgotten, so a passed deadline is returned again every turn
            deadlines += [w.full_since + self.skip_after for w in self.workers.values() if w.full_since is not None]
        return min(deadlines) if deadlines else None

    replace(Dispatcher, "next_deadline", next_deadline)


def no_accept_backoff() -> None:
    """EMFILE on accept is logged and the next pause computed, but not applied: the listener is re-armed at once."""
    original = acceptor.AcceptBackoff.failed

    def failed(self, exc):
        original(self, exc)
        self.resume_at = None  # the bug: the pause is never set, so ``paused()`` is always False and accept spins

    replace(acceptor.AcceptBackoff, "failed", failed)


def spawn_failure_crashes() -> None:
    """A respawn that fails (socketpair or fork out of descriptors) is not caught: the master dies of it."""

    def spawn_failed(self, index, exc):
        raise exc  # the bug: the error escapes the main loop

    replace(Master, "spawn_failed", spawn_failed)


def master_keeps_dead_channel() -> None:
    """A dead worker's channel is unregistered and forgotten, never closed: one descriptor more per death."""

    def lose_worker(self, process):
        if process.channel is None:
            return
        self.dispatcher.remove(process.index)
        self.selector.unregister(process.channel.sock)
        kept.append(process.channel)  # the bug: ``process.channel.close()`` forgotten
        process.channel = None
        self.control.worker_lost(process.index)

    replace(Master, "lose_worker", lose_worker)


def graceful_exit_nonzero() -> None:
    """After a graceful stop the master exits as if a worker had crashed: it counts the workers it stopped itself."""
    original = Master.run

    def run(self):
        code = original(self)
        return EXIT_WORKER_CRASHED if code == 0 and self.deaths else code  # the bug: every death counted as a crash

    replace(Master, "run", run)


def respawn_budget_never_refilled() -> None:
    """A crash-looping slot is given up after a few respawns, but the count never resets: the 4th death is final."""
    original = Master.schedule_respawn

    def schedule_respawn(self, process):
        slot = self.slots[process.index]
        if slot.respawns >= RESPAWN_BUDGET:  # the bug: counts every respawn ever, not deaths in a row
            return
        original(self, process)

    replace(Master, "schedule_respawn", schedule_respawn)


def random_dispatch() -> None:
    """The dispatcher picks any worker with room at random: fair on average, never in rotation."""

    def pick(self):
        now = time.monotonic()
        ready = [w for w in self.workers.values() if len(w.unacked) < self.window
                 and (w.paused_until is None or w.paused_until <= now)]
        return random.choice(ready) if ready else None

    replace(Dispatcher, "_pick", pick)

