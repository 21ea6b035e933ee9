"""A worker's client connections: their buffers, their output budget, their timeouts, their end.

Everything here runs in a forked worker, as the half of ``worker.Worker`` that
serves connections once they are adopted (``ConnectionIO`` is mixed into it,
so each method is still a method of the worker, looked up on it at each call).

Guards: an incomplete frame older than the idle timeout closes its connection
(slowloris), so does a connection with nothing in flight past the keep-alive
timeout, and one whose output made no progress for the write timeout (a client
that never reads).  Memory is bounded: a connection's requests are neither
decoded nor read while its output is above the high-water mark, and nobody's
are while the worker's output across all connections is above its budget; the
rest of the input waits, decoded later.  Every connection is closed on EOF or
error, so none lingers in CLOSE_WAIT; one closed by the server (an oversize
frame, a timeout, a drain) gets a FIN after its last answer, never an RST for a
request already received: the worker shuts its side down and drops what still
arrives until the client's FIN or the linger timeout.
"""

from __future__ import annotations

import selectors
import socket
import time
from typing import Dict, List, Optional

from . import protocol
from .config import ServerConfig

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


class ConnectionIO:
    """The connections half of ``worker.Worker``: read, answer, write, time out and close each client.

    A mixin: the state below is the worker's (set in ``Worker.__init__``), and
    every call goes through ``self``, so a method replaced on ``Worker`` (a
    subclass, a mutant) is the one every path takes.
    """

    config: ServerConfig
    selector: selectors.BaseSelector
    connections: Dict[int, Connection]
    counters: Dict[str, int]
    buffered: int  # output bytes held across every connection, against ``max_output_per_worker``
    paused: List[Connection]  # connections stopped for the budget, resumed below half of it
    closed_unreported: int
    draining: bool
    drain_started: float
    listener: Optional[socket.socket]
    listener_paused: bool
    max_connections: int

    def respond(self, body: bytes) -> bytes:
        """The response frame for one request body: the worker's handlers answer it (``Worker.respond``)."""
        raise NotImplementedError

    # -- reading and answering --------------------------------------------------------

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


    # -- writing, within the output budget --------------------------------------------

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

    # -- the end of a connection ------------------------------------------------------

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

    # -- timeouts ---------------------------------------------------------------------

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

    def _idle(self, conn: Connection, now: float) -> bool:
        if conn.out or conn.decoder.pending or conn.linger_until is not None:
            return False
        # A connection that has not sent its first request yet may have one on the way.
        return conn.requests > 0 or now - self.drain_started > DRAIN_IDLE_GRACE
