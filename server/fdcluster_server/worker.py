"""The worker side: an event loop serving many client connections at once.

Everything here runs in a forked child.  The worker receives client sockets
from the master over its channel, acknowledges each one before reading a byte
from it (so a worker that dies before acknowledging loses no request), and
answers frames with one write per batch of responses.  A worker at its
connection cap rejects handoffs (the master hands them elsewhere).

This module holds the process: its loop, signals, channel records (handoffs,
acks, rejects, reports, heartbeats), adoption, the handlers' answers and the
drain.  What happens to a connection once adopted -- buffers, the output
budget, timeouts, the FIN and linger at its end -- is ``connection``'s, mixed
into ``Worker`` as ``ConnectionIO``.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import time
from typing import Any, Dict, List, Optional, Set

from . import channel as ch
from . import protocol, signals
from .acceptor import OUT_OF_RESOURCES, AcceptBackoff
from .config import EXIT_MASTER_GONE, EXIT_OK, ServerConfig, connection_cap
from .connection import Connection, ConnectionIO
from .handlers import OUT_OK, Handler, Reply

log = logging.getLogger("fdcluster.worker")

__all__ = ["Connection", "Worker", "close_inherited_fds", "describe_exception"]

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


def describe_exception(exc: BaseException) -> str:
    """'ValueError: why', even for an exception whose ``str()`` itself raises."""
    try:
        text = str(exc)
    except Exception:
        text = "<its message cannot be printed>"
    return f"{type(exc).__name__}: {text}"


class Worker(ConnectionIO):
    """A worker process's state and main loop; built and run in the freshly forked child."""

    def __init__(
        self,
        index: int,
        channel_sock: socket.socket,
        config: ServerConfig,
        handlers: Dict[str, Handler],
        master_pid: int,
        listener: Optional[socket.socket] = None,
    ) -> None:
        self.index = index
        self.channel = ch.Channel(channel_sock)
        self.config = config
        self.handlers = handlers
        self.master_pid = master_pid
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.connections: Dict[int, Connection] = {}
        self.draining = False
        self.drain_started = 0.0
        self.stop_now = False
        self.acks: List[int] = []
        self.rejects: List[int] = []
        self.closed_unreported = 0
        self.counters = {"accepted": 0, "closed": 0, "requests": 0, "errors": 0, "rejected": 0, "timeouts": 0}
        self.signals = signals.SignalQueue()
        timeouts = [t for t in (config.idle_timeout, config.keepalive_timeout, config.write_timeout) if t > 0]
        self._scan_interval = max(0.02, min([0.25] + [t / 4 for t in timeouts]))
        if config.heartbeat_timeout:
            self._scan_interval = min(self._scan_interval, config.heartbeat_timeout / 4)  # a heartbeat per scan
        self.accept_backoff = AcceptBackoff(f"worker {index}", log)
        self.master_gone = False
        self.max_connections = connection_cap(config.max_connections_per_worker)
        self.listener_paused = False  # shared-accept at the connection cap: the listener is out of the selector
        self.buffered = 0  # output bytes held across every connection, against ``max_output_per_worker``
        self.paused: List[Connection] = []  # connections stopped for the budget, resumed below half of it

    # -- set-up (in the child) ----------------------------------------------------

    def install_signals(self) -> None:
        """Reset what was inherited from the master: handlers only queue, the loop acts."""
        wakeup = self.signals.install(
            (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT),
            default=(signal.SIGCHLD, signal.SIGHUP),
            ignored=(signal.SIGPIPE,),
        )
        self.selector.register(wakeup, _READ, "wakeup")

    # -- main loop ------------------------------------------------------------------

    def run(self) -> int:
        """Serve until drained, told to stop, or orphaned; return the exit code (runs in the child)."""
        signals.set_parent_death_signal()
        if os.getppid() != self.master_pid:
            return EXIT_MASTER_GONE  # the master died between fork() and prctl()
        self.install_signals()
        self.selector.register(self.channel.sock, _READ, "channel")
        if self.listener is not None:
            self.listener.setblocking(False)
            self.selector.register(self.listener, _READ, "listener")
        try:
            self.channel.send(ch.READY, os.getpid())
        except OSError:
            return EXIT_MASTER_GONE  # the master closed the channel before this worker started
        next_scan = time.monotonic() + self._scan_interval
        while True:
            for key, mask in self.selector.select(self._scan_interval):
                data = key.data
                if data.__class__ is Connection:
                    if mask & _READ:
                        self.read(data)
                    if mask & _WRITE and data.fd in self.connections:
                        self.flush(data)
                elif data == "channel":
                    if not self.read_channel():
                        return EXIT_MASTER_GONE
                elif data == "listener":
                    self.accept_shared()
                else:
                    self.signals.drain()
            self.report()
            self.handle_signals()
            if self.stop_now:
                self.close_all()
                return EXIT_MASTER_GONE if self.master_gone else EXIT_OK
            if self.paused and self.buffered < self.config.max_output_per_worker // 2:
                self.resume_paused()
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + self._scan_interval
                if os.getppid() != self.master_pid:
                    return EXIT_MASTER_GONE  # orphaned where PR_SET_PDEATHSIG is missing
                self.expire(now)
                if self.config.heartbeat_timeout:
                    self.send_heartbeat()
                if self.listener is not None and self.accept_backoff.resume_at and not self.accept_backoff.paused():
                    self.selector.register(self.listener, _READ, "listener")  # the pause for descriptors is over
            if self.draining and not self.connections:
                return EXIT_OK

    def handle_signals(self) -> None:
        """SIGTERM drains; SIGINT and SIGQUIT stop at once."""
        for signum in self.signals.pending():
            if signum == signal.SIGTERM:
                self.begin_drain()
            else:
                self.stop_now = True

    # -- the channel ----------------------------------------------------------------

    def read_channel(self) -> bool:
        """Handle every record the master sent; False when the master is gone."""
        try:
            for record in self.channel.receive():
                if record.kind == ch.HANDOFF:
                    self.take_handoff(record.arg, record.fd)
                elif record.kind == ch.STATS:
                    try:
                        self.channel.send_json(ch.COUNTERS, record.arg, self.snapshot_counters())
                    except OSError:
                        return False  # the answer refused: the master is gone
                elif record.kind == ch.DRAIN:
                    self.begin_drain()
        except EOFError:
            return False
        return True

    def take_handoff(self, conn_id: int, fd: Optional[int]) -> None:
        """Adopt a handed socket and acknowledge it, or reject it: the master, which kept its copy, hands it again."""
        if fd is None:
            self.rejects.append(conn_id)  # truncated: the master will hand it again
            return
        if len(self.connections) >= self.max_connections:
            os.close(fd)
            self.rejects.append(conn_id)  # at the cap: another worker, or this one later, takes it
            return
        self.adopt(socket.socket(fileno=fd))
        self.acks.append(conn_id)

    def report(self) -> None:
        """Tell the master what changed this turn, in one record per kind; closes ride on an ACK."""
        try:
            if self.acks:
                self.channel.send_ack(self.acks, self.closed_unreported)
                self.acks = []
                self.closed_unreported = 0
            if self.rejects:
                self.counters["rejected"] += len(self.rejects)
                self.channel.send_ids(ch.REJECT, self.rejects)
                self.rejects = []
            if self.closed_unreported:
                self.channel.send(ch.CLOSED, self.closed_unreported)
                self.closed_unreported = 0
        except OSError:
            self.master_gone = self.stop_now = True  # a report refused: the master is gone

    def send_heartbeat(self) -> None:
        """Tell the master this loop still turns (its watchdog kills a worker stuck in a handler)."""
        try:
            self.channel.send(ch.HEARTBEAT)
        except OSError:
            self.stop_now = True  # the master is gone; the channel EOF confirms it next turn

    def snapshot_counters(self) -> Dict[str, Any]:
        counters = dict(self.counters)
        counters.update(index=self.index, pid=os.getpid(), active=len(self.connections), draining=self.draining,
                        buffered=self.buffered)
        return counters

    # -- new connections, and the handlers' answers ---------------------------------

    def adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket in a test), or already reset by the client
        conn = Connection(sock, self.config.max_frame, time.monotonic())
        self.connections[conn.fd] = conn
        self.selector.register(sock, _READ, conn)
        self.counters["accepted"] += 1

    def accept_shared(self) -> None:
        """shared-accept strategy: take what the kernel gives this worker."""
        listener = self.listener
        if listener is None:
            return  # closed by a drain earlier this turn
        for _ in range(64):
            if len(self.connections) >= self.max_connections:
                self.selector.unregister(listener)  # back in the selector when a connection closes
                self.listener_paused = True
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # the backlog is empty (or another worker took the client)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up in the backlog
                if exc.errno in OUT_OF_RESOURCES:
                    # Level-triggered: a listener left registered would wake this loop at once, forever.
                    self.accept_backoff.failed(exc)
                    self.selector.unregister(listener)
                    return
                raise
            self.accept_backoff.succeeded()
            self.adopt(sock)

    def respond(self, body: bytes) -> bytes:
        """The response frame for one request body; never raises."""
        self.counters["requests"] += 1
        try:
            method, params = protocol.parse_request(body)
        except protocol.BadRequest as exc:
            self.counters["errors"] += 1
            return protocol.error(str(exc))
        handler = self.handlers.get(method)
        if handler is None:
            self.counters["errors"] += 1
            return protocol.error(f"unknown method {method!r}")
        try:
            result = handler(params)
        except Exception as exc:  # a handler's bug is the client's error frame, not the worker's death
            self.counters["errors"] += 1
            return protocol.error(f"handler {method!r} raised {describe_exception(exc)}")
        try:
            if result.__class__ is Reply:
                return protocol.response(result.out, result.result)
            return protocol.response(OUT_OK, result)
        except Exception as exc:  # NaN, a set, nesting too deep: the result has no JSON form
            self.counters["errors"] += 1
            return protocol.error(f"handler {method!r} returned what JSON cannot carry: {describe_exception(exc)}")

    # -- shutdown -------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking work; close each connection once it has nothing in flight."""
        if self.draining:
            return
        self.draining = True
        self.drain_started = time.monotonic()
        if self.listener is not None:
            if not self.listener_paused and self.accept_backoff.resume_at is None:
                self.selector.unregister(self.listener)  # registered unless paused (connection cap, descriptors)
            self.listener.close()
            self.listener = None
        self.expire(self.drain_started)

    def close_all(self) -> None:
        for conn in list(self.connections.values()):
            self.close(conn)
        self.report()


def close_inherited_fds(keep: Set[int]) -> None:
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
                pass  # closed already: the descriptor listdir() used
