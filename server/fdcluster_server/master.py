"""The master: accepts clients, hands them to workers, and supervises the workers.

One class with a short loop, after gunicorn's Arbiter.  Signal handlers only
queue the signal; the loop handles it (``handle_term``, ``handle_chld``...),
then reaps, respawns and dispatches.  The handoff bookkeeping lives in
``dispatch.Dispatcher``; this module does the I/O around it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

from . import channel as ch
from . import protocol
from .config import EXIT_OK, EXIT_STARTUP_FAILED, EXIT_WORKER_CRASHED, READY_TAG, ServerConfig
from .dispatch import SHARED_ACCEPT, Dispatcher, WorkerSlot
from .handlers import Handler
from .worker import worker_main

log = logging.getLogger("fdcluster.master")

ACCEPT_BATCH = 128  # accepts per wake-up, so a storm cannot starve the channels
QUICK_DEATH = 1.0  # a worker dying sooner than this after its start counts as a crash loop
STATS_TIMEOUT = 1.0  # how long a stats query waits for a paused or dying worker
FAST_STOP_TIMEOUT = 1.0
_READ = selectors.EVENT_READ


def describe_status(status: int) -> str:
    """'killed by SIGKILL' or 'exited with code 3', for log lines and tests alike."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class Process:
    """The master's record of one worker process, from fork to reaping."""

    __slots__ = ("index", "pid", "channel", "started", "ready")

    def __init__(self, index: int, pid: int, channel: ch.Channel, started: float) -> None:
        self.index = index
        self.pid = pid
        self.channel: Optional[ch.Channel] = channel
        self.started = started
        self.ready = False


class ClientSocket:
    """An accepted client as the master holds it: the bare descriptor, closed once.

    The master never reads or writes a client: it passes the descriptor to a
    worker and closes its own copy.  A ``socket.socket`` would cost a
    ``getsockname()`` and two enum conversions per connection for nothing.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class ControlClient:
    """One connection to the control socket."""

    __slots__ = ("sock", "decoder", "eof", "queries", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = protocol.FrameDecoder(64 * 1024)
        self.eof = False
        self.queries = 0  # stats queries still waiting for workers
        self.closed = False


class StatsQuery:
    """A control client's stats request, waiting for every live worker's counters."""

    def __init__(self, client: ControlClient, waiting: set, deadline: float) -> None:
        self.client = client
        self.waiting = waiting
        self.deadline = deadline
        self.counters: Dict[int, Dict[str, Any]] = {}


class Master:
    """Supervisor of the workers and owner of the listening socket."""

    def __init__(self, config: ServerConfig, handlers: Dict[str, Handler]) -> None:
        self.config = config
        self.handlers = handlers
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.dispatcher = Dispatcher(config.strategy, config.handoff_window, config.max_pending)
        self.listener: Optional[socket.socket] = None
        self.accepting = False
        self.control: Optional[socket.socket] = None
        self.control_address: Optional[str] = None
        self.processes: Dict[int, Process] = {}  # pid -> process, until reaped
        self.by_index: Dict[int, Process] = {}  # worker index -> its current process
        self.respawn_at: Dict[int, float] = {}
        self.quick_deaths: Dict[int, int] = {}
        self.respawns: Dict[int, int] = {i: 0 for i in range(config.workers)}
        self.deaths = 0
        self.stopping: Optional[str] = None  # "graceful" or "fast"
        self.stop_deadline = 0.0
        self.drain_sent = False
        self.announced = False
        self.queries: Dict[int, StatsQuery] = {}
        self._next_query = 0
        self._signals: List[int] = []

    # -- start-up -------------------------------------------------------------------

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.config.host, self.config.port))
            listener.listen(self.config.backlog)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self.listener = listener

    def open_control(self) -> None:
        address = self.config.control
        if address == "":
            return  # disabled by --control none
        if address is None:
            address = f"@fdcluster-{self.pid}" if sys.platform.startswith("linux") else f"/tmp/fdcluster-{self.pid}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind("\0" + address[1:] if address.startswith("@") else address)
        sock.listen(16)
        sock.setblocking(False)
        self.control, self.control_address = sock, address
        self.selector.register(sock, _READ, self.accept_control)

    def install_signals(self) -> None:
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        self._wakeup = read_end
        signal.set_wakeup_fd(write_end)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, self._queue_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a dead worker's channel gives EPIPE, not death
        self.selector.register(read_end, _READ, self._drain_wakeup)

    def _queue_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _drain_wakeup(self, mask: int) -> None:
        try:
            while os.read(self._wakeup, 512):
                pass
        except BlockingIOError:
            pass

    # -- main loop ------------------------------------------------------------------

    def run(self) -> int:
        """Bind, spawn, serve until told to stop; return the exit code."""
        try:
            self.bind()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", self.config.host, self.config.port, exc.strerror or exc)
            return EXIT_STARTUP_FAILED
        self.install_signals()
        self.open_control()
        for index in range(self.config.workers):
            self.spawn_worker(index)
        self.set_accepting(self.config.strategy != SHARED_ACCEPT)
        while True:
            for key, mask in self.selector.select(self.next_timeout()):
                key.data(mask)
            self.handle_signals()
            if self.stopping:
                if self.step_shutdown():
                    return EXIT_OK
                continue
            self.reap_workers()
            self.respawn_due_workers()
            turn = self.dispatcher.next_deadline()
            if turn is not None and turn <= self.dispatcher.clock():
                self.dispatcher.distribute()  # a stalled worker's turn has expired: pass it over
            self.announce_ready()
            self.manage_accepting()
            self.expire_queries()

    def next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = list(self.respawn_at.values()) + [q.deadline for q in self.queries.values()]
        turn = self.dispatcher.next_deadline()
        if turn is not None:
            deadlines.append(turn)
        if self.stopping:
            deadlines.append(self.stop_deadline)
        if not deadlines:
            return 1.0
        return max(0.0, min(1.0, min(deadlines) - now))

    def handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                self.reap_workers()
            elif signum == signal.SIGTERM:
                self.handle_term()
            else:
                self.handle_int()

    def handle_term(self) -> None:
        """Graceful stop: no new clients; workers finish what is in flight."""
        if self.stopping:
            return
        log.info("master %d: SIGTERM, draining (grace %.1f s)", self.pid, self.config.graceful_timeout)
        self.stopping = "graceful"
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        self.close_listener()
        self.respawn_at.clear()

    def handle_int(self) -> None:
        """Fast stop: close everything, workers exit at once."""
        if self.stopping == "fast":
            return
        log.info("master %d: fast stop", self.pid)
        self.stopping = "fast"
        self.stop_deadline = time.monotonic() + FAST_STOP_TIMEOUT
        self.close_listener()
        self.respawn_at.clear()
        self.dispatcher.close_all()
        self.signal_workers(signal.SIGINT)

    def step_shutdown(self) -> bool:
        """One turn of shutdown; True once every worker is reaped."""
        self.reap_workers()
        if self.stopping == "graceful" and not self.drain_sent and not self.dispatcher.pending:
            # Handoffs already sent precede DRAIN on each channel, so they are served.
            for process in self.by_index.values():
                self._send(process, ch.DRAIN)
            self.drain_sent = True
        if not self.processes:
            self.dispatcher.close_all()
            self.close_control()
            log.info("master %d: stopped", self.pid)
            return True
        if time.monotonic() >= self.stop_deadline:
            self.murder_workers()
        return False

    # -- workers ----------------------------------------------------------------------

    def spawn_worker(self, index: int) -> None:
        master_end, worker_end = ch.socketpair()
        listener = self.listener if self.config.strategy == SHARED_ACCEPT else None
        pid = os.fork()
        if pid == 0:  # the child: never returns into the master's code
            code = EXIT_WORKER_CRASHED
            try:
                signal.set_wakeup_fd(-1)  # the master's pipe: about to be closed, its number reused
                keep = {0, 1, 2, worker_end.fileno()}
                if listener is not None:
                    keep.add(listener.fileno())
                close_inherited_fds(keep)
                code = worker_main(index, worker_end, self.config, self.handlers, self.pid, listener)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        worker_end.close()
        process = Process(index, pid, ch.Channel(master_end), time.monotonic())
        self.processes[pid] = process
        self.by_index[index] = process
        self.selector.register(master_end, _READ, lambda mask, p=process: self.read_channel(p))
        log.info("worker %d: started, pid %d", index, pid)

    def reap_workers(self) -> None:
        """Collect every dead child, so none stays a zombie, and arrange its replacement."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self.processes.pop(pid, None)
            if process is None:
                continue  # not a worker of ours (a handler's own child, say)
            self.deaths += 1
            level = logging.INFO if self.stopping or status == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", process.index, pid, describe_status(status))
            if process.channel is not None:
                self.read_channel(process)  # acknowledgements it sent before dying still count
            self.lose_worker(process)
            if self.by_index.get(process.index) is process:
                del self.by_index[process.index]
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
        process.channel.close()
        process.channel = None
        for query in self.queries.values():
            query.waiting.discard(process.index)

    def schedule_respawn(self, process: Process) -> None:
        index = process.index
        if time.monotonic() - process.started < QUICK_DEATH:
            self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1
        else:
            self.quick_deaths[index] = 0
        crashes = self.quick_deaths[index]
        delay = 0.0 if crashes <= 1 else min(self.config.respawn_backoff_max, 0.05 * 2 ** crashes)
        if delay:
            log.warning("worker %d: %d quick deaths in a row, respawning in %.2f s", index, crashes, delay)
        self.respawn_at[index] = time.monotonic() + delay

    def respawn_due_workers(self) -> None:
        now = time.monotonic()
        for index, when in list(self.respawn_at.items()):
            if when <= now:
                del self.respawn_at[index]
                self.respawns[index] += 1
                self.spawn_worker(index)

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

    def read_channel(self, process: Process) -> None:
        channel = process.channel
        if channel is None:
            return
        index = process.index
        try:
            for record in channel.receive():
                kind = record.kind
                if kind == ch.ACK:
                    if record.arg:
                        self.dispatcher.closed(index, record.arg)
                    self.dispatcher.ack(index, record.ids())
                elif kind == ch.CLOSED:
                    self.dispatcher.closed(index, record.arg)
                elif kind == ch.REJECT:
                    self.dispatcher.reject(index, record.ids())
                elif kind == ch.READY:
                    process.ready = True
                    self.dispatcher.add(WorkerSlot(index, process.pid, channel))
                elif kind == ch.COUNTERS:
                    self.collect_counters(record.arg, index, record.json())
                if record.fd is not None:
                    os.close(record.fd)  # workers never send descriptors; never keep a stray one
        except EOFError:
            self.lose_worker(process)

    def _send(self, process: Process, kind: int, arg: int = 0) -> None:
        if process.channel is None:
            return
        try:
            process.channel.send(kind, arg)
        except OSError:
            pass  # a dying worker: SIGCHLD handles it

    # -- clients ----------------------------------------------------------------------

    def accept_clients(self, mask: int) -> None:
        """Queue a batch of new clients, then hand them out in one pass."""
        listener = self.listener
        dispatcher = self.dispatcher
        try:
            for _ in range(ACCEPT_BATCH):
                if dispatcher.full:
                    return
                try:
                    # What socket.accept() wraps: accept4(SOCK_CLOEXEC), giving the bare descriptor.
                    fd, _ = listener._accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue  # the client gave up in the backlog
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("master %d: cannot accept: %s; pausing accepts", self.pid, exc.strerror)
                        self.set_accepting(False)
                        return
                    raise
                dispatcher.queue(ClientSocket(fd))
        finally:
            dispatcher.distribute()  # once per batch, not once per client

    def set_accepting(self, accepting: bool) -> None:
        if accepting == self.accepting or self.listener is None:
            return
        if accepting:
            self.selector.register(self.listener, _READ, self.accept_clients)
        else:
            self.selector.unregister(self.listener)
        self.accepting = accepting

    def manage_accepting(self) -> None:
        """Leave clients in the kernel's backlog while the pending queue is full."""
        if self.config.strategy != SHARED_ACCEPT:
            self.set_accepting(not self.dispatcher.full)

    def close_listener(self) -> None:
        if self.listener is not None:
            self.set_accepting(False)
            self.listener.close()
            self.listener = None

    def announce_ready(self) -> None:
        """Print the one readiness line, once every worker is up."""
        if self.announced or len(self.dispatcher.workers) < self.config.workers:
            return
        self.announced = True
        host, port = self.listener.getsockname()[:2]
        info = {
            "host": host,
            "port": port,
            "pid": self.pid,
            "workers": [self.by_index[i].pid for i in sorted(self.by_index)],
            "strategy": self.config.strategy,
            "control": self.control_address,
        }
        sys.stdout.write(f"{READY_TAG} {json.dumps(info)}\n")
        sys.stdout.flush()
        log.info("master %d: ready on %s:%d with %d workers", self.pid, host, port, self.config.workers)

    # -- control socket: counters for the harness ----------------------------------

    def accept_control(self, mask: int) -> None:
        try:
            sock, _ = self.control.accept()
        except OSError:
            return
        sock.setblocking(False)
        client = ControlClient(sock)
        self.selector.register(sock, _READ, lambda m, c=client: self.read_control(c))

    def read_control(self, client: "ControlClient") -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The harness half-closes after its request and reads until EOF, so by the time it
            # observes the cluster this connection is gone from the master's descriptors.
            client.eof = True
            self.selector.unregister(client.sock)
            if not client.queries:
                self.close_control_client(client)
            return
        bodies = client.decoder.feed(data)
        for body in bodies:
            try:
                method, _ = protocol.parse_request(body)
            except protocol.BadRequest as exc:
                self.reply_control(client, protocol.error(str(exc)))
                continue
            if method == "stats":
                self.start_stats_query(client)
            elif method == "workers":
                # Answered from the master's own table, so a paused worker cannot delay it.
                table = [{"index": p.index, "pid": p.pid} for p in sorted(self.by_index.values(), key=lambda p: p.index)]
                self.reply_control(client, protocol.response("workers", table))
            elif method == "ping":
                self.reply_control(client, protocol.response("pong", None))
            else:
                self.reply_control(client, protocol.error(f"unknown control method {method!r}"))
        if client.decoder.failure is not None:
            self.close_control_client(client)

    def start_stats_query(self, client: "ControlClient") -> None:
        self._next_query += 1
        waiting = set()
        for index, process in self.by_index.items():
            if process.channel is not None and process.ready:
                waiting.add(index)
                self._send(process, ch.STATS, self._next_query)
        self.queries[self._next_query] = StatsQuery(client, waiting, time.monotonic() + STATS_TIMEOUT)
        client.queries += 1
        if not waiting:
            self.answer_query(self._next_query)

    def collect_counters(self, query_id: int, index: int, counters: Dict[str, Any]) -> None:
        query = self.queries.get(query_id)
        if query is None:
            return  # answered already (timed out)
        query.counters[index] = counters
        query.waiting.discard(index)
        if not query.waiting:
            self.answer_query(query_id)

    def expire_queries(self) -> None:
        now = time.monotonic()
        for query_id, query in list(self.queries.items()):
            if now >= query.deadline:
                self.answer_query(query_id)

    def answer_query(self, query_id: int) -> None:
        query = self.queries.pop(query_id)
        client = query.client
        client.queries -= 1
        self.reply_control(client, protocol.response("stats", self.stats(query.counters)))
        if client.eof and not client.queries:
            self.close_control_client(client)

    def stats(self, counters: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        """The master's figures and each worker's, merged by worker index."""
        workers = []
        for index in range(self.config.workers):
            process = self.by_index.get(index)
            slot = self.dispatcher.workers.get(index)
            entry: Dict[str, Any] = {"index": index, "pid": process.pid if process else None,
                                     "respawns": self.respawns.get(index, 0), "reported": index in counters}
            if slot is not None:
                entry.update(handed=slot.handed, acked=slot.acked, unacked=len(slot.unacked), rejected_by_worker=slot.rejected)
            entry.update(counters.get(index, {}))
            workers.append(entry)
        d = self.dispatcher
        master = {"pid": self.pid, "strategy": self.config.strategy, "accepted": d.accepted, "pending": len(d.pending),
                  "held": d.held, "redistributed": d.redistributed, "deaths": self.deaths,
                  "respawns": sum(self.respawns.values()), "stopping": self.stopping}
        return {"master": master, "workers": workers}

    def reply_control(self, client: "ControlClient", frame: bytes) -> None:
        if client.closed:
            return
        try:
            client.sock.setblocking(True)
            client.sock.settimeout(1.0)  # the harness reads at once; never let it stall the master for long
            client.sock.sendall(frame)
            client.sock.setblocking(False)
        except OSError:
            self.close_control_client(client)

    def close_control_client(self, client: "ControlClient") -> None:
        if client.closed:
            return
        client.closed = True
        for query_id, query in list(self.queries.items()):
            if query.client is client:
                del self.queries[query_id]
        if not client.eof:
            self.selector.unregister(client.sock)
        client.sock.close()

    def close_control(self) -> None:
        if self.control is not None:
            self.selector.unregister(self.control)
            self.control.close()
            self.control = None
            if self.control_address and not self.control_address.startswith("@"):
                try:
                    os.unlink(self.control_address)
                except OSError:
                    pass


def close_inherited_fds(keep: set) -> None:
    """In a new worker: close every descriptor of the master's except ``keep``.

    Client sockets the master holds must not survive in a worker, or a client
    would never see its connection close.
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
