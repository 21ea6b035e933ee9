"""The master's control socket: counters and the worker table for the harness.

A Unix socket answering ``stats``, ``workers`` and ``ping``; by default the
abstract ``@fdcluster-PID-<16 random hex digits>`` on Linux.  This module owns
the socket, its clients (each a ``control_client.ControlClient``), the
bounds on their buffers and the stats queries in flight; the master is
reached only through ``ControlSource``, and tells this side when a worker
answered (``collect_counters``) or died (``worker_lost``).

Security: only a peer with the master's own uid (``SO_PEERCRED``) is served;
any other is closed at once and logged with its pid and uid.  Abstract names
carry no permissions and are listed in /proc/net/unix, so the uid check is the
guard; the random part only stops another user from taking the name first.  A
socket file (``--control PATH``) is created with mode 0600.

Nothing a client does can stop the master: an exception from its frames
closes that client alone, and the limits below bound what each may cost.
Replies leave in request order through a non-blocking buffer; repeated log
lines are rate-limited (``ratelimit``).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import selectors
import socket
import struct
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Protocol, Set

from . import protocol
from .control_client import ControlClient, StatsQuery, last_words
from .ratelimit import RateLimitedLog

log = logging.getLogger("fdcluster.master")

STATS_TIMEOUT = 1.0  # how long a stats query waits for a paused or dying worker
MAX_REQUEST = 64 * 1024  # a control request's largest frame
MAX_OUTPUT = 256 * 1024  # replies held for a client its socket will not take yet; beyond this it is closed
MAX_QUERIES = 4  # stats queries in flight per client; more are answered with an error
MAX_CLIENTS = 32  # control clients at once; more are sent an error and closed
IDLE_TIMEOUT = 10.0  # a client that neither sends nor takes a byte for this long is closed
ACCEPT_BATCH = 16  # accepts per wake-up
ACCEPT_PAUSE = (0.05, 2.0)  # out of descriptors: the first pause, and the longest as it doubles
READ_SIZE = 16 * 1024  # one read per wake-up and client, so one client's flood costs each turn little
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PEERCRED_OPTION: Optional[int] = getattr(socket, "SO_PEERCRED", None)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ControlSource(Protocol):
    """What the control socket needs from the master."""

    def request_counters(self, query_id: int) -> Set[int]:
        """Ask every ready worker for its counters under ``query_id``; return the indexes asked."""
        ...

    def stats(self, counters: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        """The ``stats`` reply: the master's figures merged with the workers' ``counters``."""
        ...

    def worker_table(self) -> List[Dict[str, int]]:
        """The ``workers`` reply: index and pid of each live worker, by index."""
        ...


class ControlSocketError(Exception):
    """The control socket cannot be opened; the message is the one line to log."""


def default_address(pid: int) -> str:
    """A fresh control address for master ``pid`` when ``--control`` is not given.

    Linux: an abstract name no other user can guess and take first.  Elsewhere:
    a socket in a new directory only the owner may enter (mode 0700).
    """
    if sys.platform.startswith("linux"):
        return f"@fdcluster-{pid}-{secrets.token_hex(8)}"
    return os.path.join(tempfile.mkdtemp(prefix=f"fdcluster-{pid}-"), "control.sock")


class ControlServer:
    """The control socket and its clients, served from the master's selector."""

    def __init__(self, selector: selectors.BaseSelector, source: ControlSource) -> None:
        self.selector = selector
        self.source = source
        self.sock: Optional[socket.socket] = None
        self.address: Optional[str] = None
        self.clients: Set[ControlClient] = set()
        self.queries: Dict[int, StatsQuery] = {}
        self._next_query = 0
        self._private_dir: Optional[str] = None  # the 0700 directory of a default path, removed on close
        self._accepting = False
        self._accept_resume: Optional[float] = None  # when a paused accept resumes
        self._accept_pause = ACCEPT_PAUSE[0]
        self._log_accept_error = RateLimitedLog(log, logging.ERROR)
        self._log_refused = RateLimitedLog(log, logging.WARNING)
        self._log_client = RateLimitedLog(log, logging.WARNING)

    def open(self, address: Optional[str], pid: int) -> None:
        """Listen on ``address`` (None: a fresh default for ``pid``; "": disabled).

        Raises ``ControlSocketError`` (address in use...) with nothing left open.
        """
        if address == "":
            return  # disabled by --control none
        if address is None:
            address = default_address(pid)
            if not address.startswith("@"):
                self._private_dir = os.path.dirname(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)  # a socket file is born 0600: no moment when others may connect
        try:
            sock.bind("\0" + address[1:] if address.startswith("@") else address)
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"cannot open control socket {address}: {exc.strerror or exc}") from None
        finally:
            os.umask(umask)
        sock.setblocking(False)
        self.sock, self.address = sock, address
        self._set_accepting(True)

    def close(self) -> None:
        """Stop listening and close every client; a socket file (and its private directory) is removed."""
        for client in list(self.clients):
            self.close_client(client)
        if self.sock is None:
            return  # never opened, or closed already
        self._set_accepting(False)
        self.sock.close()
        self.sock = None
        for remove, path in ((os.unlink, self.address), (os.rmdir, self._private_dir)):
            if path and not path.startswith("@"):
                try:
                    remove(path)
                except OSError:
                    pass  # gone already: nothing to clean

    # -- accepting ---------------------------------------------------------------------

    def _set_accepting(self, accepting: bool) -> None:
        if accepting == self._accepting or self.sock is None:
            return  # no change, or closed
        if accepting:
            self.selector.register(self.sock, _READ, self.accept)
        else:
            self.selector.unregister(self.sock)
        self._accepting = accepting

    def accept(self, mask: int) -> None:
        """Admit a batch of new clients; out of descriptors, pause accepting for a growing delay."""
        assert self.sock is not None  # registered only while open
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the backlog is empty
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up in the backlog
                self._pause_accepting(exc)  # never raised: the master must outlive any accept error
                return
            self._accept_pause = ACCEPT_PAUSE[0]
            self.admit(sock)

    def _pause_accepting(self, exc: OSError) -> None:
        # Registered, the listener would wake the loop at once and fail again: a spin.
        delay = self._accept_pause
        self._accept_pause = min(ACCEPT_PAUSE[1], delay * 2)
        self._set_accepting(False)
        self._accept_resume = time.monotonic() + delay
        kind = "out of descriptors" if exc.errno in _OUT_OF_DESCRIPTORS else "error"
        self._log_accept_error("master %d: cannot accept control clients (%s: %s); pausing accepts for %.2f s",
                               os.getpid(), kind, exc.strerror or exc, delay)

    def admit(self, sock: socket.socket) -> None:
        """Serve a new connection, unless its peer is another user or there are too many clients."""
        sock.setblocking(False)
        pid, uid = "?", os.geteuid()  # without SO_PEERCRED (not Linux), the 0700 directory is the guard
        if _PEERCRED_OPTION is not None:
            try:
                pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, _PEERCRED_OPTION, _PEERCRED.size))
            except OSError:
                sock.close()
                return  # gone before we could ask who it is
        peer = f"pid {pid} uid {uid}"
        if uid != os.geteuid():
            sock.close()
            self._log_refused("master %d: refused control client %s: only uid %d may connect",
                              os.getpid(), peer, os.geteuid())
            return
        if len(self.clients) >= MAX_CLIENTS:
            last_words(sock, protocol.error(f"too many control clients (limit {MAX_CLIENTS})"))
            sock.close()
            self._log_client("master %d: refused control client %s: %d clients already", os.getpid(), peer,
                             MAX_CLIENTS)
            return
        client = ControlClient(sock, peer, MAX_REQUEST)
        self.clients.add(client)
        self._update_events(client)

    # -- clients ----------------------------------------------------------------------

    def _update_events(self, client: ControlClient) -> None:
        """Register ``client`` for what it needs: reading until EOF or closing, writing while output waits."""
        wanted = (_READ if client.reading and not client.closing else 0) | (_WRITE if client.out else 0)
        if wanted == client.events or client.closed:
            return  # nothing changes
        if not wanted:
            self.selector.unregister(client.sock)
        elif not client.events:
            self.selector.register(client.sock, wanted, lambda mask, c=client: self.serve(c, mask))
        else:
            self.selector.modify(client.sock, wanted, lambda mask, c=client: self.serve(c, mask))
        client.events = wanted

    def serve(self, client: ControlClient, mask: int) -> None:
        """Send what ``client`` can take, read what it sent; whatever this raises closes it alone, never the master."""
        try:
            if mask & _WRITE:
                self.flush(client)
            if mask & _READ and not client.closed:
                self.read(client)
        except Exception as exc:  # noqa: BLE001 - a decoder or handler bug must not take the master down
            self._fail(client, f"{type(exc).__name__}: {exc}", f"internal error: {type(exc).__name__}")

    def _fail(self, client: ControlClient, reason: str, reply: Optional[str] = None) -> None:
        """Close ``client`` for ``reason`` (logged), after a last error frame ``reply`` if its socket takes it."""
        self._log_client("master %d: control client %s: %s; closing it", os.getpid(), client.peer, reason)
        if reply is not None and not client.closed:
            client.out += protocol.error(reply)
            last_words(client.sock, client.out)
        self.close_client(client)

    def read(self, client: ControlClient) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The harness half-closes after its request and reads until EOF, so by the time it
            # observes the cluster this connection is gone from the master's descriptors.
            client.reading = False
            self._finish_if_done(client)
            return
        client.active = time.monotonic()
        for body in client.decoder.feed(data):
            if client.closed or client.closing:
                return  # its output overflowed, or an earlier frame was fatal: decode no further
            self.answer(client, body)
        failure = client.decoder.failure
        if failure is not None and not client.closed:
            self.send(client, protocol.error(str(failure)))
            client.closing = True  # the stream cannot be resynchronised: close once the error is sent
            self._finish_if_done(client)

    def answer(self, client: ControlClient, body: bytes) -> None:
        """Answer one request frame of ``client``."""
        try:
            method, _ = protocol.parse_request(body)
        except protocol.BadRequest as exc:
            self.send(client, protocol.error(str(exc)))
            return
        if method == "stats":
            self.start_stats_query(client)
        elif method == "workers":
            # Answered from the master's own table, so a paused worker cannot delay it.
            self.send(client, protocol.response("workers", self.source.worker_table()))
        elif method == "ping":
            self.send(client, protocol.response("pong", None))
        else:
            self.send(client, protocol.error(f"unknown control method {method!r}"))

    def send(self, client: ControlClient, frame: bytes) -> None:
        """Queue ``frame`` for ``client`` after every earlier reply; send what its socket takes now, never blocking."""
        if client.closed:
            return  # gone while its query waited
        client.queue(frame)
        self._deliver(client)

    def _deliver(self, client: ControlClient) -> None:
        """Move the replies that are ready, in request order, to the output; close a client that reads too little."""
        queued = bool(client.out)
        client.take_ready()
        if not queued:
            self.flush(client)  # nothing was waiting: try at once, no extra wake-up
        if client.closed:
            return  # the send failed
        if len(client.out) + client.held > MAX_OUTPUT:
            self._fail(client, f"{len(client.out) + client.held} bytes of replies unread (limit {MAX_OUTPUT})")
            return
        self._update_events(client)

    def flush(self, client: ControlClient) -> None:
        """Send as much of ``client``'s output as its socket takes."""
        try:
            sent = client.sock.send(client.out) if client.out else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close_client(client)  # it has gone: its replies have no reader
            return
        if sent:
            del client.out[:sent]
            client.active = time.monotonic()
        self._finish_if_done(client)

    def _finish_if_done(self, client: ControlClient) -> None:
        """Close ``client`` once it will get nothing more (after its EOF or a fatal frame), else re-register it."""
        if client.closed:
            return
        if not client.out and not client.behind and (client.closing or (not client.reading and not client.queries)):
            self.close_client(client)
        else:
            self._update_events(client)

    def close_client(self, client: ControlClient) -> None:
        if client.closed:
            return
        for query_id, query in list(self.queries.items()):
            if query.client is client:
                del self.queries[query_id]
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass  # not registered: after its EOF with replies still to come, or an exception mid-registration
        client.closed = True
        client.sock.close()
        self.clients.discard(client)

    # -- stats queries ------------------------------------------------------------------

    def start_stats_query(self, client: ControlClient) -> None:
        if client.queries >= MAX_QUERIES:
            self.send(client, protocol.error(f"more than {MAX_QUERIES} stats queries in flight; read the replies"))
            return
        self._next_query += 1
        query_id = self._next_query
        query = StatsQuery(client, self.source.request_counters(query_id), time.monotonic() + STATS_TIMEOUT)
        self.queries[query_id] = query
        client.queries += 1
        client.behind.append(query)  # its place in the order of replies
        if not query.waiting:
            self.answer_query(query_id)

    def collect_counters(self, query_id: int, index: int, counters: Dict[str, Any]) -> None:
        """Worker ``index`` answered query ``query_id``."""
        query = self.queries.get(query_id)
        if query is None:
            return  # answered already (timed out), or dropped with its client
        query.counters[index] = counters
        query.waiting.discard(index)
        if not query.waiting:
            self.answer_query(query_id)

    def worker_lost(self, index: int) -> None:
        """Worker ``index`` died: no query waits for it any more (each is answered by its deadline)."""
        for query in self.queries.values():
            query.waiting.discard(index)

    def next_deadline(self) -> Optional[float]:
        """When something is next due: a query's answer, an idle client's close, a paused accept's resumption.

        Runs what is due first: the master asks every turn, also while stopping, when it does
        not call ``expire_queries``, and a deadline left in the past would make its select spin.
        """
        self.expire_queries()
        deadlines = [query.deadline for query in self.queries.values()]
        deadlines.extend(client.active + IDLE_TIMEOUT for client in self.clients)
        if self._accept_resume is not None:
            deadlines.append(self._accept_resume)
        return min(deadlines, default=None)

    def expire_queries(self) -> None:
        """Answer the queries past their deadline, close idle clients, resume a paused accept when due."""
        now = time.monotonic()
        for query_id, query in list(self.queries.items()):
            if now >= query.deadline:
                self.answer_query(query_id)  # may close its client, dropping the client's later queries
        for client in [c for c in self.clients if now - c.active >= IDLE_TIMEOUT]:
            self._fail(client, f"idle for {IDLE_TIMEOUT:g} s")
        if self._accept_resume is not None and now >= self._accept_resume:
            self._accept_resume = None
            self._set_accepting(True)

    def answer_query(self, query_id: int) -> None:
        query = self.queries.pop(query_id, None)
        if query is None:
            return  # dropped with its client, whose earlier reply failed
        client = query.client
        client.queries -= 1
        try:
            frame = protocol.response("stats", self.source.stats(query.counters))
        except Exception as exc:  # noqa: BLE001 - the master's figures failing must cost this reply, not the master
            self._fail(client, f"stats failed: {type(exc).__name__}: {exc}", f"internal error: {type(exc).__name__}")
            return
        query.reply = frame
        self._deliver(client)
        self._finish_if_done(client)
