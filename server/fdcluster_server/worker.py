"""The worker side: an event loop serving many client connections at once.

Everything here runs in a forked child.  The worker receives client sockets
from the master over its channel, acknowledges each one before reading a byte
from it (so a worker that dies before acknowledging loses no request), and
answers frames with one write per batch of responses.

Guards: an incomplete frame older than the idle timeout closes its connection
(slowloris); a client that does not read its responses stops being read once
its output passes the high-water mark (bounded memory); every connection is
closed on EOF or error, so none lingers in CLOSE_WAIT.
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
from .config import EXIT_MASTER_GONE, EXIT_OK, ServerConfig
from .handlers import OUT_OK, Handler, Reply

log = logging.getLogger("fdcluster.worker")

RECV_SIZE = 65536
HIGH_WATER = 4 << 20  # pending output above which a connection's requests are not read
DRAIN_IDLE_GRACE = 1.0  # how long a draining worker waits for a silent new connection's request
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class Connection:
    """One client socket and its buffers."""

    __slots__ = ("sock", "fd", "decoder", "out", "partial_since", "eof", "closing", "requests", "events", "opened")

    def __init__(self, sock: socket.socket, max_frame: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = protocol.FrameDecoder(max_frame)
        self.out = bytearray()
        self.partial_since: Optional[float] = None
        self.eof = False  # the client shut down its side; answer what it sent, then close
        self.closing = False  # close once the output is flushed
        self.requests = 0
        self.events = _READ
        self.opened = now


class Worker:
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
        self._scan_interval = max(0.02, min(0.25, config.idle_timeout / 4))
        if config.heartbeat_timeout:
            self._scan_interval = min(self._scan_interval, config.heartbeat_timeout / 4)  # a heartbeat per scan
        self.accept_backoff = AcceptBackoff(f"worker {index}", log)

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
        self.channel.send(ch.READY, os.getpid())
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
                return EXIT_OK
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
                    if record.fd is None:
                        self.rejects.append(record.arg)  # truncated: the master will hand it again
                        continue
                    self.adopt(socket.socket(fileno=record.fd))
                    self.acks.append(record.arg)
                elif record.kind == ch.STATS:
                    self.channel.send_json(ch.COUNTERS, record.arg, self.snapshot_counters())
                elif record.kind == ch.DRAIN:
                    self.begin_drain()
        except EOFError:
            return False
        return True

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
            self.stop_now = True  # the master is gone; the channel EOF confirms it next turn

    def send_heartbeat(self) -> None:
        """Tell the master this loop still turns (its watchdog kills a worker stuck in a handler)."""
        try:
            self.channel.send(ch.HEARTBEAT)
        except OSError:
            self.stop_now = True  # the master is gone; the channel EOF confirms it next turn

    def snapshot_counters(self) -> Dict[str, Any]:
        counters = dict(self.counters)
        counters.update(index=self.index, pid=os.getpid(), active=len(self.connections), draining=self.draining)
        return counters

    # -- connections ----------------------------------------------------------------

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
        assert listener is not None  # registered only while it is open
        for _ in range(64):
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

    def read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)  # ECONNRESET and friends: nothing more can be said to this client
            return
        if not data:
            conn.eof = True
            if conn.out:
                self.update_interest(conn)
            else:
                self.close(conn)
            return
        decoder = conn.decoder
        bodies = decoder.feed(data)
        if bodies:
            out = conn.out
            for body in bodies:
                out += self.respond(body)
            conn.requests += len(bodies)
            conn.partial_since = time.monotonic() if decoder.pending else None
        elif decoder.pending and conn.partial_since is None:
            conn.partial_since = time.monotonic()
        if decoder.failure is not None:
            conn.out += protocol.error(str(decoder.failure))
            self.counters["errors"] += 1
            conn.closing = True
        if conn.out:
            self.flush(conn)

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
            if result.__class__ is Reply:
                return protocol.response(result.out, result.result)
            return protocol.response(OUT_OK, result)
        except Exception as exc:  # a handler's bug is the client's error frame, not the worker's death
            self.counters["errors"] += 1
            return protocol.error(f"handler {method!r} raised {type(exc).__name__}: {exc}")

    def flush(self, conn: Connection) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close(conn)
                return
            del conn.out[:sent]
        if not conn.out and (conn.eof or conn.closing):
            self.close(conn)
            return
        if self.draining and self._idle(conn, time.monotonic()):
            self.close(conn)
            return
        self.update_interest(conn)

    def update_interest(self, conn: Connection) -> None:
        events = 0
        if not (conn.eof or conn.closing) and len(conn.out) < HIGH_WATER:
            events |= _READ
        if conn.out:
            events |= _WRITE
        if events != conn.events:
            conn.events = events
            if events:
                self.selector.modify(conn.sock, events, conn)
            else:
                self.close(conn)

    def close(self, conn: Connection) -> None:
        if self.connections.pop(conn.fd, None) is None:
            return  # already closed this turn
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.counters["closed"] += 1
        self.closed_unreported += 1

    def close_all(self) -> None:
        for conn in list(self.connections.values()):
            self.close(conn)
        self.report()

    def expire(self, now: float) -> None:
        """Close connections whose incomplete frame is older than the idle timeout."""
        limit = self.config.idle_timeout
        for conn in list(self.connections.values()):
            if conn.partial_since is not None and now - conn.partial_since > limit:
                self.counters["timeouts"] += 1
                try:
                    conn.sock.send(protocol.error(f"incomplete frame timed out after {limit:g} s"))
                except OSError:
                    pass  # best effort: the close below is what matters
                self.close(conn)
            elif self.draining and self._idle(conn, now):
                self.close(conn)

    # -- shutdown -------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking work; close each connection once it has nothing in flight."""
        if self.draining:
            return
        self.draining = True
        self.drain_started = time.monotonic()
        if self.listener is not None:
            if self.accept_backoff.resume_at is None:
                self.selector.unregister(self.listener)  # registered unless paused for want of descriptors
            self.listener.close()
            self.listener = None
        self.expire(self.drain_started)

    def _idle(self, conn: Connection, now: float) -> bool:
        if conn.out or conn.decoder.pending:
            return False
        # A connection that has not sent its first request yet may have one on the way.
        return conn.requests > 0 or now - self.drain_started > DRAIN_IDLE_GRACE


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
