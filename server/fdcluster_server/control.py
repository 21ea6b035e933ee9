"""The master's control socket: counters and the worker table for the harness.

A Unix socket (abstract ``@fdcluster-PID`` on Linux by default) answering
``stats``, ``workers`` and ``ping``.  This module owns the socket, its
clients, their bounded input buffers and the stats queries in flight; the
master is reached only through ``ControlSource``, and tells this side when a
worker answered (``collect_counters``) or died (``worker_lost``).

A stats query waits at most ``STATS_TIMEOUT`` for the workers, so a paused or
dying worker delays the answer but never blocks it.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Protocol, Set

from . import protocol

log = logging.getLogger("fdcluster.master")

STATS_TIMEOUT = 1.0  # how long a stats query waits for a paused or dying worker
MAX_REQUEST = 64 * 1024  # a control request's largest frame
REPLY_TIMEOUT = 1.0  # the harness reads at once; never let it stall the master for long
_READ = selectors.EVENT_READ


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


class ControlClient:
    """One connection to the control socket."""

    __slots__ = ("sock", "decoder", "eof", "queries", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = protocol.FrameDecoder(MAX_REQUEST)
        self.eof = False
        self.queries = 0  # stats queries still waiting for workers
        self.closed = False


class StatsQuery:
    """A control client's stats request, waiting for every live worker's counters."""

    def __init__(self, client: ControlClient, waiting: Set[int], deadline: float) -> None:
        self.client = client
        self.waiting = waiting
        self.deadline = deadline
        self.counters: Dict[int, Dict[str, Any]] = {}


def default_address(pid: int) -> str:
    """The control socket of master ``pid`` when ``--control`` is not given."""
    return f"@fdcluster-{pid}" if sys.platform.startswith("linux") else f"/tmp/fdcluster-{pid}.sock"


class ControlServer:
    """The control socket and its clients, served from the master's selector."""

    def __init__(self, selector: selectors.BaseSelector, source: ControlSource) -> None:
        self.selector = selector
        self.source = source
        self.sock: Optional[socket.socket] = None
        self.address: Optional[str] = None
        self.queries: Dict[int, StatsQuery] = {}
        self._next_query = 0

    def open(self, address: Optional[str], pid: int) -> None:
        """Listen on ``address`` (None: the default for ``pid``; "": disabled)."""
        if address == "":
            return  # disabled by --control none
        if address is None:
            address = default_address(pid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind("\0" + address[1:] if address.startswith("@") else address)
        sock.listen(16)
        sock.setblocking(False)
        self.sock, self.address = sock, address
        self.selector.register(sock, _READ, self.accept)

    def close(self) -> None:
        """Stop listening; a socket file is removed."""
        if self.sock is None:
            return  # never opened, or closed already
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None
        if self.address and not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except OSError:
                pass

    # -- clients ----------------------------------------------------------------------

    def accept(self, mask: int) -> None:
        assert self.sock is not None  # registered only while open
        try:
            sock, _ = self.sock.accept()
        except OSError:
            return
        sock.setblocking(False)
        client = ControlClient(sock)
        self.selector.register(sock, _READ, lambda m, c=client: self.serve(c))

    def serve(self, client: ControlClient) -> None:
        """Read and answer ``client``; whatever its frames raise closes it alone, never the master."""
        try:
            self.read(client)
        except Exception as exc:  # noqa: BLE001 - a decoder or handler bug must not take the master down
            log.error("master %d: control client fd %d: %s: %s; closing it",
                      os.getpid(), client.sock.fileno(), type(exc).__name__, exc)
            self.reply(client, protocol.error(f"internal error: {type(exc).__name__}"))
            self.close_client(client)

    def read(self, client: ControlClient) -> None:
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
                self.close_client(client)
            return
        for body in client.decoder.feed(data):
            try:
                method, _ = protocol.parse_request(body)
            except protocol.BadRequest as exc:
                self.reply(client, protocol.error(str(exc)))
                continue
            if method == "stats":
                self.start_stats_query(client)
            elif method == "workers":
                # Answered from the master's own table, so a paused worker cannot delay it.
                self.reply(client, protocol.response("workers", self.source.worker_table()))
            elif method == "ping":
                self.reply(client, protocol.response("pong", None))
            else:
                self.reply(client, protocol.error(f"unknown control method {method!r}"))
        if client.decoder.failure is not None:
            self.close_client(client)

    def reply(self, client: ControlClient, frame: bytes) -> None:
        if client.closed:
            return  # gone while its query waited
        try:
            client.sock.setblocking(True)
            client.sock.settimeout(REPLY_TIMEOUT)
            client.sock.sendall(frame)
            client.sock.setblocking(False)
        except OSError:
            self.close_client(client)

    def close_client(self, client: ControlClient) -> None:
        if client.closed:
            return
        client.closed = True
        for query_id, query in list(self.queries.items()):
            if query.client is client:
                del self.queries[query_id]
        if not client.eof:
            self.selector.unregister(client.sock)
        client.sock.close()

    # -- stats queries ------------------------------------------------------------------

    def start_stats_query(self, client: ControlClient) -> None:
        self._next_query += 1
        query_id = self._next_query
        waiting = self.source.request_counters(query_id)
        self.queries[query_id] = StatsQuery(client, waiting, time.monotonic() + STATS_TIMEOUT)
        client.queries += 1
        if not waiting:
            self.answer_query(query_id)

    def collect_counters(self, query_id: int, index: int, counters: Dict[str, Any]) -> None:
        """Worker ``index`` answered query ``query_id``."""
        query = self.queries.get(query_id)
        if query is None:
            return  # answered already (timed out)
        query.counters[index] = counters
        query.waiting.discard(index)
        if not query.waiting:
            self.answer_query(query_id)

    def worker_lost(self, index: int) -> None:
        """Worker ``index`` died: no query waits for it any more (each is answered by its deadline)."""
        for query in self.queries.values():
            query.waiting.discard(index)

    def next_deadline(self) -> Optional[float]:
        """When the oldest waiting query must be answered, if any waits."""
        return min((q.deadline for q in self.queries.values()), default=None)

    def expire_queries(self) -> None:
        now = time.monotonic()
        for query_id, query in list(self.queries.items()):
            if now >= query.deadline:
                self.answer_query(query_id)  # may close its client, dropping the client's later queries

    def answer_query(self, query_id: int) -> None:
        query = self.queries.pop(query_id, None)
        if query is None:
            return  # dropped with its client, whose earlier reply failed
        client = query.client
        client.queries -= 1
        self.reply(client, protocol.response("stats", self.source.stats(query.counters)))
        if client.eof and not client.queries:
            self.close_client(client)
