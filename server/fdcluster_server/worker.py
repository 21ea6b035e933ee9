"""The worker side: an event loop serving many client connections at once.

Everything here runs in a forked child.  The worker receives client sockets
from the master over its channel, acknowledges each one before reading a byte
from it (so a worker that dies before acknowledging loses no request), and
answers frames with one write per batch of responses.

Guards: an incomplete frame older than the idle timeout closes its connection
(slowloris), so does a connection with nothing in flight past the keep-alive
timeout, and one whose output made no progress for the write timeout (a client
that never reads).  Memory is bounded: a connection's requests are neither
decoded nor read while its output is above the high-water mark, and nobody's
are while the worker's output across all connections is above its budget; the
rest of the input waits, decoded later.  A worker at its connection cap rejects
handoffs (the master hands them elsewhere).  Every connection is closed on EOF
or error, so none lingers in CLOSE_WAIT; one closed by the server (an oversize
frame, a timeout, a drain) gets a FIN after its last answer, never an RST for a
request already received: the worker shuts its side down and drops what still
arrives until the client's FIN or the linger timeout.
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
from .handlers import OUT_OK, Handler, Reply

log = logging.getLogger("fdcluster.worker")

RECV_SIZE = 65536
HIGH_WATER = 4 << 20  # pending output above which a connection's requests are neither decoded nor read
DECODE_SLICE = 64  # requests answered between two looks at the output size: bounds the overshoot past a limit
DRAIN_IDLE_GRACE = 1.0  # how long a draining worker waits for a silent new connection's request
LINGER_TIMEOUT = 1.0  # after the server's FIN, how long it waits for the client's before closing anyway
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class Connection:
    """One client socket and its buffers."""

    __slots__ = ("sock", "fd", "decoder", "out", "partial_since", "eof", "closing", "requests", "events", "opened",
                 "active_at", "stalled_since", "paused", "linger_until")

    def __init__(self, sock: socket.socket, max_frame: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = protocol.FrameDecoder(max_frame)
        self.out = bytearray()
        self.partial_since: Optional[float] = None
        self.eof = False  # the client shut down its side; answer what it sent, then close
        self.closing = False  # close once the output is flushed
        self.requests = 0
        self.events = _READ  # 0: not in the selector (paused with nothing to send)
        self.opened = now
        self.active_at = now  # adoption or the last complete request: the keep-alive timer
        self.stalled_since: Optional[float] = None  # output pending and none of it sent since then
        self.paused = False  # stopped for the worker's output budget, in its list to resume
        self.linger_until: Optional[float] = None  # our side is shut down: the client's FIN is awaited until then


def describe_exception(exc: BaseException) -> str:
    """'ValueError: why', even for an exception whose ``str()`` itself raises."""
    try:
        text = str(exc)
    except Exception:
        text = "<its message cannot be printed>"
    return f"{type(exc).__name__}: {text}"


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

    def read(self, conn: Connection) -> None:
        if conn.linger_until is not None:
            self.discard(conn)
            return
        if self.buffered >= self.config.max_output_per_worker:
            self.update_interest(conn)  # over the worker's output budget: not read until it drains
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)  # ECONNRESET and friends: nothing more can be said to this client
            return
        if not data:
            conn.eof = True
            self.flush(conn)  # answers what is held back, closes once all of it is sent
            return
        self.serve(conn, data)
        if conn.out:
            self.flush(conn)

    def serve(self, conn: Connection, data: bytes = b"") -> None:
        """Answer the complete requests in ``data`` and held back until the output reaches a limit; keep the rest."""
        decoder = conn.decoder
        out = conn.out
        before = len(out)
        served = 0
        bodies = decoder.feed(data, DECODE_SLICE)
        while bodies:
            for body in bodies:
                out += self.respond(body)
            served += len(bodies)
            if len(bodies) < DECODE_SLICE or len(out) >= HIGH_WATER:
                break  # nothing complete is left, or the rest waits for the client to read
            if self.buffered + len(out) - before >= self.config.max_output_per_worker:
                self.pause(conn)
                break
            bodies = decoder.feed(b"", DECODE_SLICE)
        self.buffered += len(out) - before
        now = time.monotonic()
        if served:
            conn.requests += served
            conn.active_at = now
            conn.partial_since = now if decoder.pending else None
            if not before:
                conn.stalled_since = now
        elif decoder.pending and conn.partial_since is None:
            conn.partial_since = now
        if decoder.failure is not None and not conn.closing:
            self.counters["errors"] += 1
            self.queue_last(conn, str(decoder.failure))

    def queue_last(self, conn: Connection, message: str) -> None:
        """Queue an error frame behind the output already pending; the connection closes once it is sent."""
        frame = protocol.error(message)
        if not conn.out:
            conn.stalled_since = time.monotonic()
        conn.out += frame
        self.buffered += len(frame)
        conn.closing = True

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

    def flush(self, conn: Connection) -> None:
        out = conn.out
        if out:
            try:
                sent = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close(conn)
                return
            if sent:
                del out[:sent]
                self.buffered -= sent
                conn.stalled_since = time.monotonic() if out else None
        if len(out) < HIGH_WATER // 2 and not (conn.closing or conn.paused) and conn.decoder.complete:
            self.serve(conn)  # room again: answer what was held back; it leaves on the next write event
        if not out:
            if conn.closing:
                self.finish(conn)
                return
            if conn.eof and not conn.decoder.complete:
                self.close(conn)  # the client has said all it will and has every answer
                return
            if self.draining and self._idle(conn, time.monotonic()):
                self.close_idle(conn)
                return
        self.update_interest(conn)

    def update_interest(self, conn: Connection) -> None:
        if conn.linger_until is not None:
            events = _READ  # after our FIN: read and drop until the client's
        else:
            events = _WRITE if conn.out else 0
            if not (conn.eof or conn.closing) and len(conn.out) < HIGH_WATER and not conn.decoder.complete:
                if self.buffered < self.config.max_output_per_worker:
                    events |= _READ
                else:
                    self.pause(conn)
        if events != conn.events:
            if not conn.events:
                self.selector.register(conn.sock, events, conn)
            elif not events:
                self.selector.unregister(conn.sock)
            else:
                self.selector.modify(conn.sock, events, conn)
            conn.events = events

    def pause(self, conn: Connection) -> None:
        if not conn.paused:
            conn.paused = True
            self.paused.append(conn)

    def resume_paused(self) -> None:
        """The output budget has room again: answer and read the connections stopped for it, in order."""
        paused, self.paused = self.paused, []
        for conn in paused:
            conn.paused = False
            if self.connections.get(conn.fd) is conn and conn.linger_until is None:
                self.flush(conn)  # serves what it holds back and resets its interest (may pause it again)

    def close_idle(self, conn: Connection) -> bool:
        """Close a connection with nothing in flight, unless a request is in the kernel's queue: then answer it.

        Returns whether the connection is ending.
        """
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            self.finish(conn)  # really idle: the client reads our FIN, not an RST, and goes elsewhere
            return True
        except OSError:
            self.close(conn)
            return True
        if not data:
            self.close(conn)  # the client closed first
            return True
        self.serve(conn, data)  # it arrived just in time; idle again once answered
        self.update_interest(conn)
        return False

    def finish(self, conn: Connection) -> None:
        """Close after the last answer with a FIN: shut our side down, then wait (bounded) for the client's."""
        if conn.eof:
            self.close(conn)  # the client's FIN is in already
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.closing = True
        conn.linger_until = time.monotonic() + LINGER_TIMEOUT
        self.update_interest(conn)

    def discard(self, conn: Connection) -> None:
        """After our FIN: drop what the client still sends; its FIN (or an error) ends the connection."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)

    def close(self, conn: Connection) -> None:
        if self.connections.pop(conn.fd, None) is None:
            return  # already closed this turn
        if conn.events:
            self.selector.unregister(conn.sock)
        conn.sock.close()
        self.buffered -= len(conn.out)
        self.counters["closed"] += 1
        self.closed_unreported += 1
        if self.listener_paused and self.listener is not None and len(self.connections) < self.max_connections:
            self.selector.register(self.listener, _READ, "listener")
            self.listener_paused = False

    def close_all(self) -> None:
        for conn in list(self.connections.values()):
            self.close(conn)
        self.report()

    def expire(self, now: float) -> None:
        """Close connections past a timeout (incomplete frame, keep-alive, write, linger); drain idle ones."""
        config = self.config
        frame_limit, keepalive, write_limit = config.idle_timeout, config.keepalive_timeout, config.write_timeout
        for conn in list(self.connections.values()):
            if self.connections.get(conn.fd) is not conn:
                continue  # closed earlier in this scan
            if conn.linger_until is not None:
                if now > conn.linger_until:
                    self.close(conn)
                continue
            if conn.out and write_limit and conn.stalled_since is not None and now - conn.stalled_since > write_limit:
                self.counters["timeouts"] += 1
                self.close(conn)  # the client stopped reading: its output is dropped
                continue
            if conn.events & _READ:  # only a connection being read answers for its input
                if conn.partial_since is not None and now - conn.partial_since > frame_limit:
                    self.counters["timeouts"] += 1
                    conn.partial_since = None
                    self.queue_last(conn, f"incomplete frame timed out after {frame_limit:g} s")
                    self.flush(conn)
                    continue
                if keepalive and conn.partial_since is None and not conn.out and now - conn.active_at > keepalive:
                    if self.close_idle(conn):
                        self.counters["timeouts"] += 1
                    continue
            if self.draining and self._idle(conn, now):
                self.close_idle(conn)

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

    def _idle(self, conn: Connection, now: float) -> bool:
        if conn.out or conn.decoder.pending or conn.linger_until is not None:
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
