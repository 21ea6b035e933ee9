"""The master: accepts clients, hands them to workers, and supervises the workers.

One class with a short loop, after gunicorn's Arbiter.  Signal handlers only
queue the signal; the loop runs ``handle_<name>`` for each (``handle_term``,
``handle_hup``, ``handle_int``, ``handle_quit``, ``handle_chld``), then reaps,
respawns and dispatches.  Those signals are blocked across ``fork()``, so one
sent to a new worker waits until the worker's own handlers are installed.

Respawns back off while a slot's workers keep dying young (``lifecycle.STABLE_LIFETIME``),
and a spawn that fails (out of descriptors, say) counts as such a death: the
slot stays empty and is retried.  At start the soft RLIMIT_NOFILE is raised to
the hard limit (the ready line's ``nofile``).  With ``--heartbeat-timeout`` a
worker silent for longer is SIGKILLed, and its unacknowledged sockets requeued.

One ``lifecycle.Slot`` per worker index outlives the processes that fill it.  The
listening socket lives in ``acceptor.Acceptor``, the handoff bookkeeping in
``dispatch.Dispatcher``, the control socket in ``control.ControlServer`` (which
asks ``control_source.MasterControlSource`` for figures); this module supervises
and moves the records.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import sys
import time
import traceback
from typing import Dict, Iterator, Optional, Set

from . import channel as ch
from . import lifecycle, signals
from .acceptor import Acceptor
from .config import EXIT_OK, EXIT_STARTUP_FAILED, EXIT_WORKER_CRASHED, READY_TAG, ServerConfig
from .control import ControlServer, ControlSocketError
from .control_source import MasterControlSource
from .dispatch import SHARED_ACCEPT, Dispatcher, WorkerSlot
from .handlers import Handler
from .lifecycle import Process, Slot, Watchdog, describe_status
from .worker import Worker, close_inherited_fds

log = logging.getLogger("fdcluster.master")

FAST_STOP_TIMEOUT = 1.0
REAP_SWEEP = 1.0  # reaping follows SIGCHLD; this sweep is only a safety net
GRACEFUL, FAST = "graceful", "fast"  # values of Master.stopping, as stats reports them
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT,
                   signal.SIGCHLD)  # each by Master.handle_<name>
_READ = selectors.EVENT_READ
_READ_WRITE = selectors.EVENT_READ | selectors.EVENT_WRITE


class Master:
    """Supervisor of the workers, owner of the listening socket and the control socket.

    Signals, each handled in the loop by ``handle_<name>``: SIGTERM stops
    gracefully; SIGHUP stops gracefully too, as SIGTERM (there is no
    configuration to reload, and a hang-up must not drop requests in flight);
    SIGINT stops at once; SIGQUIT stops at once too, as SIGINT; SIGCHLD reaps.
    """

    def __init__(self, config: ServerConfig, handlers: Dict[str, Handler]) -> None:
        self.config = config
        self.handlers = handlers
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.dispatcher = Dispatcher(config.strategy, config.handoff_window, config.max_pending,
                                     on_blocked=self.watch_blocked_channel)
        self.acceptor = Acceptor(self.selector, self.dispatcher, self.pid)
        self.control = ControlServer(self.selector, MasterControlSource(self))
        self.signals = signals.SignalQueue()
        self.processes: Dict[int, Process] = {}  # pid -> process, until reaped
        self.slots: Dict[int, Slot] = {index: Slot(index) for index in range(config.workers)}
        self.deaths = 0
        self.spawn_failures = 0
        self.heartbeat_kills = 0
        self.watchdog = Watchdog(config.heartbeat_timeout)
        self.nofile = 0
        self.stopping: Optional[str] = None  # GRACEFUL or FAST
        self.stop_deadline = 0.0
        self.drain_sent = False
        self.announced = False
        self.hot_fds: Set[int] = set()  # the listener's and the channels': events that need no chores
        self.chores_due = True  # do_chores this turn, whatever chores_at says
        self.chores_at = 0.0
        self.reap_at = 0.0  # the next reap without a SIGCHLD: a safety sweep, once a second

    # -- start-up -------------------------------------------------------------------

    def install_signals(self) -> None:
        # SIGPIPE ignored: a dead worker's channel gives EPIPE, not death.
        wakeup = self.signals.install(HANDLED_SIGNALS, ignored=(signal.SIGPIPE,))
        self.selector.register(wakeup, _READ, lambda mask: self.signals.drain())

    # -- main loop ------------------------------------------------------------------

    def run(self) -> int:
        """Bind, spawn, serve until told to stop; return the exit code."""
        try:
            self.acceptor.bind(self.config.host, self.config.port, self.config.backlog)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", self.config.host, self.config.port, exc.strerror or exc)
            return EXIT_STARTUP_FAILED
        self.nofile = lifecycle.raise_nofile_limit()
        self.install_signals()
        try:
            self.control.open(self.config.control, self.pid)
        except ControlSocketError as exc:
            log.error("%s", exc)
            return EXIT_STARTUP_FAILED
        for index in self.slots:
            self.spawn_worker(index)
        self.acceptor.set_accepting(self.config.strategy != SHARED_ACCEPT)
        hot = self.hot_fds
        hot.add(self.acceptor.fileno())
        while True:
            chores = self.chores_due
            for key, mask in self.selector.select(self.next_timeout()):
                key.data(mask)
                if key.fd not in hot:
                    chores = True  # a signal, the control socket: the rest of the turn may have work
            self.handle_signals()
            if self.stopping:
                if self.stopping == GRACEFUL:
                    self.dispatcher.distribute_due()
                if self.step_shutdown():
                    return EXIT_OK
                continue
            if chores or time.monotonic() >= self.chores_at:
                self.do_chores()
            else:
                self.dispatcher.distribute_due()
            self.manage_accepting()

    def do_chores(self) -> None:
        """The turn's work beyond accepts and ACKs, then when it is next due (``chores_at``): a turn that only
        accepted and read ACKs skips it (reaping follows SIGCHLD, plus a sweep); each deadline is in ``chores_at``."""
        self.chores_due = False
        now = time.monotonic()
        if now >= self.reap_at:
            self.reap_workers()
        self.respawn_due_workers()
        self.dispatcher.distribute_due()
        self.kill_silent_workers()
        self.announce_ready()
        deadlines = [slot.respawn_at for slot in self.slots.values() if slot.respawn_at is not None]
        for deadline in (self.control.next_deadline(), self.watchdog.deadline(self.live_processes())):
            if deadline is not None:
                deadlines.append(deadline)
        self.chores_at = min(deadlines, default=self.reap_at)

    def next_timeout(self) -> float:
        if self.stopping:
            deadlines = (self.stop_deadline, self.control.next_deadline(), self.dispatcher.next_deadline())
        else:
            deadlines = (self.chores_at, self.dispatcher.next_deadline(), self.acceptor.resume_at())
        deadline = deadlines[0]
        for other in deadlines:
            if other is not None and other < deadline:
                deadline = other
        return max(0.0, min(1.0, deadline - time.monotonic()))

    # -- signals, queued by their handlers and handled here --------------------------

    def handle_signals(self) -> None:
        """Run ``handle_<name>`` for each signal queued since the last turn, oldest first."""
        for signum in self.signals.pending():
            getattr(self, signals.handler_name(signum))()

    def handle_chld(self) -> None:
        """A worker died: reap it (and any other dead child) at once."""
        self.reap_workers()

    def handle_term(self, name: str = "SIGTERM") -> None:
        """Graceful stop: no new clients; workers finish what is in flight."""
        if self.stopping:
            return  # already stopping: a fast stop is never slowed down to a graceful one
        log.info("master %d: %s, draining (grace %.1f s)", self.pid, name, self.config.graceful_timeout)
        self.stopping = GRACEFUL
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        self.acceptor.close()
        self.cancel_respawns()

    def handle_hup(self) -> None:
        """SIGHUP: a graceful stop, the same as SIGTERM."""
        self.handle_term("SIGHUP")

    def handle_int(self) -> None:
        """Fast stop: close everything, workers exit at once."""
        if self.stopping == FAST:
            return  # already stopping fast
        log.info("master %d: fast stop", self.pid)
        self.stopping = FAST
        self.stop_deadline = time.monotonic() + FAST_STOP_TIMEOUT
        self.acceptor.close()
        self.cancel_respawns()
        self.dispatcher.close_all()
        self.signal_workers(signal.SIGINT)

    def handle_quit(self) -> None:
        """SIGQUIT: a fast stop, the same as SIGINT."""
        self.handle_int()

    def step_shutdown(self) -> bool:
        """One turn of shutdown; True once every worker is reaped."""
        self.reap_workers()
        if self.stopping == GRACEFUL and not self.drain_sent and not self.dispatcher.pending:
            # Handoffs already sent precede DRAIN on each channel, so they are served.
            for process in self.live_processes():
                self.send_record(process, ch.DRAIN)
            self.drain_sent = True
        if not self.processes:
            self.dispatcher.close_all()
            self.control.close()
            log.info("master %d: stopped", self.pid)
            return True
        if time.monotonic() >= self.stop_deadline:
            self.murder_workers()
        return False

    # -- workers ----------------------------------------------------------------------

    def live_processes(self) -> Iterator[Process]:
        """Each slot's current process, by index (a dead one until it is reaped)."""
        return (slot.process for slot in self.slots.values() if slot.process is not None)

    def spawn_worker(self, index: int) -> None:
        """Fork worker ``index``; if that fails (out of descriptors, say), retry later as after a quick death."""
        try:
            master_end, worker_end = ch.socketpair()
        except OSError as exc:
            self.spawn_failed(index, exc)
            return
        listener = self.acceptor.sock if self.config.strategy == SHARED_ACCEPT else None
        # Blocked across fork: a signal sent to the new worker waits until its own handlers are installed
        # (SignalQueue.install unblocks them), instead of reaching the master's handlers copied into it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            master_end.close()
            worker_end.close()
            self.spawn_failed(index, exc)
            return
        if pid == 0:  # the child: never returns into the master's code
            code = EXIT_WORKER_CRASHED
            try:
                signal.set_wakeup_fd(-1)  # the master's pipe: about to be closed, its number reused
                keep = {0, 1, 2, worker_end.fileno()}
                if listener is not None:
                    keep.add(listener.fileno())
                close_inherited_fds(keep)
                code = Worker(index, worker_end, self.config, self.handlers, self.pid, listener).run()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        worker_end.close()
        process = Process(index, pid, ch.Channel(master_end), time.monotonic())
        self.processes[pid] = process
        self.slots[index].process = process
        self.selector.register(master_end, _READ, lambda mask, p=process: self.channel_event(p, mask))
        self.hot_fds.add(master_end.fileno())
        log.info("worker %d: started, pid %d", index, pid)

    def spawn_failed(self, index: int, exc: OSError) -> None:
        """A worker could not be started: the slot stays empty, retried after a back-off as for a quick death."""
        self.spawn_failures += 1
        slot = self.slots[index]
        delay = self.delay_respawn(slot, stable=False, minimum=lifecycle.BACKOFF_BASE)  # at once: the same failure
        log.error("worker %d: cannot start: %s; retrying in %.2f s", index, exc.strerror or exc, delay)

    def reap_workers(self) -> None:
        """Collect every dead child, so none stays a zombie, and arrange its replacement."""
        self.reap_at = time.monotonic() + REAP_SWEEP
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # no children left at all
            if pid == 0:
                return  # the others are still running
            process = self.processes.pop(pid, None)
            if process is None:
                continue  # not a worker of ours (a handler's own child, say)
            self.deaths += 1
            self.chores_due = True  # a respawn to schedule
            level = logging.INFO if self.stopping or status == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", process.index, pid, describe_status(status))
            if process.channel is not None:
                self.read_channel(process)  # acknowledgements it sent before dying still count
            self.lose_worker(process)
            slot = self.slots[process.index]
            if slot.process is process:
                slot.process = None
                if not self.stopping:
                    self.schedule_respawn(process)

    def lose_worker(self, process: Process) -> None:
        """Forget a dead worker's channel; its unacknowledged sockets go to live workers."""
        if process.channel is None:
            return  # already lost through its channel's EOF
        requeued = self.dispatcher.remove(process.index)
        if requeued:
            log.warning("worker %d (pid %d) died holding %d unacknowledged connections: handing them to live workers",
                        process.index, process.pid, len(requeued))
        self.selector.unregister(process.channel.sock)
        self.hot_fds.discard(process.channel.fileno())
        process.channel.close()
        process.channel = None
        self.control.worker_lost(process.index)

    def schedule_respawn(self, process: Process) -> None:
        """Replace a dead worker: at once, or after a back-off growing with its slot's deaths in a row."""
        slot = self.slots[process.index]
        delay = self.delay_respawn(slot, stable=time.monotonic() - process.started >= lifecycle.STABLE_LIFETIME)
        if delay:
            log.warning("worker %d: %d deaths in a row, each within %.0f s of its start; respawning in %.2f s",
                        slot.index, slot.deaths_in_row, lifecycle.STABLE_LIFETIME, delay)

    def delay_respawn(self, slot: Slot, stable: bool, minimum: float = 0.0) -> float:
        """Count one more death of ``slot`` (a first one if its process was ``stable``); schedule; return the delay."""
        slot.deaths_in_row = 1 if stable else slot.deaths_in_row + 1
        delay = lifecycle.respawn_delay(slot.deaths_in_row, self.config.respawn_backoff_max, minimum)
        slot.respawn_at = time.monotonic() + delay
        return delay

    def respawn_due_workers(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.respawn_at is not None and slot.respawn_at <= now:
                slot.respawn_at = None
                slot.respawns += 1
                self.spawn_worker(slot.index)

    def cancel_respawns(self) -> None:
        """Stopping: no worker is replaced any more."""
        for slot in self.slots.values():
            slot.respawn_at = None

    def signal_workers(self, signum: int) -> None:
        for pid in list(self.processes):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # already dead, waiting to be reaped

    def murder_workers(self) -> None:
        """The grace period is over: SIGKILL whoever is left."""
        if self.processes:
            log.warning("master %d: %d workers still running after the grace period: SIGKILL",
                        self.pid, len(self.processes))
        self.signal_workers(signal.SIGKILL)
        self.stop_deadline = time.monotonic() + 1.0

    # -- channels ---------------------------------------------------------------------

    def channel_event(self, process: Process, mask: int) -> None:
        """A worker's channel is readable (records), or writable again after a handoff found it full."""
        if mask & selectors.EVENT_WRITE and process.channel is not None:
            self.selector.modify(process.channel.sock, _READ, lambda m, p=process: self.channel_event(p, m))
            self.dispatcher.resume(process.index)
        if mask & _READ:
            self.read_channel(process)

    def watch_blocked_channel(self, index: int) -> None:
        """The dispatcher found worker ``index``'s channel full: wake up when it drains (``channel_event``)."""
        process = self.slots[index].process
        if process is None or process.channel is None:
            return  # gone meanwhile: its sockets are requeued on reaping
        self.selector.modify(process.channel.sock, _READ_WRITE, lambda m, p=process: self.channel_event(p, m))

    def read_channel(self, process: Process) -> None:
        """Act on every record worker ``process`` sent (all that wait: one per turn measured slower)."""
        channel = process.channel
        if channel is None:
            return  # lost already: its records were read then
        index = process.index
        process.heard = time.monotonic()
        try:
            for record in channel.receive():
                if record.fd is not None:
                    os.close(record.fd)  # workers never send descriptors; never keep a stray one
                kind = record.kind
                if kind == ch.ACK:
                    if record.arg:
                        self.dispatcher.closed(index, record.arg)
                    self.dispatcher.ack(index, record.ids())
                    continue  # the hot path: nothing else of the master's changes
                self.chores_due = True  # a worker ready to announce, a query answered, a pause: see to them
                if kind == ch.CLOSED:
                    self.dispatcher.closed(index, record.arg)
                elif kind == ch.REJECT:
                    self.dispatcher.reject(index, record.ids())
                elif kind == ch.READY:
                    process.ready = True
                    self.dispatcher.add(WorkerSlot(index, process.pid, channel))
                elif kind == ch.COUNTERS:
                    self.control.collect_counters(record.arg, index, record.json())
        except EOFError:
            self.lose_worker(process)
        except ch.TruncatedRecord as exc:
            # What it said is lost (acknowledged ids, say): SIGCHLD then requeues what it never acknowledged.
            log.error("worker %d (pid %d): %s; killing it", index, process.pid, exc)
            self.kill_worker(process)

    def kill_worker(self, process: Process) -> None:
        """SIGKILL a worker the master gave up on; reaping it requeues its unacknowledged sockets."""
        process.killed = True
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # dead already, waiting to be reaped

    def kill_silent_workers(self) -> None:
        """The watchdog: SIGKILL each worker silent for longer than ``--heartbeat-timeout`` (stuck in a handler)."""
        for process in self.watchdog.overdue(self.live_processes()):
            log.error("worker %d (pid %d): no heartbeat for %.1f s (limit %g s); killing it",
                      process.index, process.pid, time.monotonic() - process.heard, self.watchdog.timeout)
            self.heartbeat_kills += 1
            self.kill_worker(process)

    def send_record(self, process: Process, kind: int, arg: int = 0) -> None:
        if process.channel is None:
            return  # lost: nothing to send to
        try:
            process.channel.send(kind, arg)
        except OSError:
            pass  # a dying worker: SIGCHLD handles it

    # -- clients ----------------------------------------------------------------------

    def manage_accepting(self) -> None:
        """Leave clients in the kernel's backlog while the pending queue is full."""
        if self.config.strategy != SHARED_ACCEPT:
            self.acceptor.set_accepting(not self.dispatcher.full)

    def announce_ready(self) -> None:
        """Print the one readiness line, once every worker is up."""
        if self.announced or len(self.dispatcher.workers) < self.config.workers:
            return  # announced already, or some worker is not ready yet
        self.announced = True
        host, port = self.acceptor.address()
        info = {
            "host": host,
            "port": port,
            "pid": self.pid,
            "workers": [process.pid for process in self.live_processes()],
            "strategy": self.config.strategy,
            "control": self.control.address,
            "nofile": self.nofile,
        }
        sys.stdout.write(f"{READY_TAG} {json.dumps(info)}\n")
        sys.stdout.flush()
        log.info("master %d: ready on %s:%d with %d workers", self.pid, host, port, self.config.workers)
