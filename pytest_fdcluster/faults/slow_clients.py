"""Slow clients: connections that never finish a request (slowloris) and a client that never reads.

Both hold a server's resources without ever completing an exchange: a
server that guards its memory and its patience closes them, or stops
reading them, while it keeps serving everyone else.  Each takes a ``Cluster``
or an address, and is one call (``open``; ``fill`` for the reader) or a
context manager whose entry does that call and whose exit closes every
socket it opened, even when the test body raised.  Each records itself
when it opens (see ``_record``).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from typing import List, Optional

from fdcluster_server import protocol

from ..polling import POLL_INTERVAL
from ..sockets import RESET_ERRNOS, Address
from ..text import format_address
from ._connect import FaultError, check_count, connect_all, connect_result, peer_closed, start_connect
from ._record import Target, logger, record, resolve
from .frames import reset_socket


class _Collected:
    """Errors raised in a background thread, re-raised in the test's thread."""

    def __init__(self) -> None:
        self.errors: List[BaseException] = []

    def raise_first(self, what: str) -> None:
        if self.errors:
            error, self.errors = self.errors[0], []
            raise FaultError(f"{what} failed in its background thread: {error!r}") from error


# -- slowloris ------------------------------------------------------------------------------


def _default_slow_frame() -> bytes:
    return protocol.request("ping", "s" * 4096)


class Slowloris:
    """``count`` connections that never finish a request, to exhaust a server's patience.

    Each connection sends the first ``partial`` bytes of ``frame`` (a ping
    request by default; 0 sends nothing, an idle connection).  With
    ``trickle_interval`` a background thread then sends one more byte of the
    frame on every connection per interval, never the last one, so the frame
    never completes; the trickle ends when the frame's bytes run out or at
    ``close``.  A server with an idle timeout should close them all while
    serving everyone else.

    Use as a context manager (``open`` on entry, ``close`` on exit).
    """

    def __init__(
        self,
        target: Target,
        count: int,
        trickle_interval: Optional[float] = None,
        timeout: float = 10.0,
        *,
        partial: int = protocol.HEADER_SIZE + 1,
        frame: Optional[bytes] = None,
    ) -> None:
        self.address, self.cluster = resolve(target)
        self.count = check_count(count)
        self.frame = frame if frame is not None else _default_slow_frame()
        if not 0 <= partial < len(self.frame):
            raise ValueError(f"partial={partial} must leave the frame incomplete (0..{len(self.frame) - 1})")
        if trickle_interval is not None and not trickle_interval > 0:
            raise ValueError(f"trickle_interval must be > 0, got {trickle_interval!r}")
        self.partial = partial
        self.trickle_interval = trickle_interval
        self.timeout = timeout
        self.sockets: List[socket.socket] = []
        self.local_addresses: List[Address] = []
        self._sent: List[int] = []  # bytes of the frame sent on each connection
        self._gone: List[bool] = []  # the peer ended it (seen by the trickle)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._errors = _Collected()

    def __enter__(self) -> Slowloris:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close(reraise=exc_info[0] is None)

    def open(self) -> Slowloris:
        """Connect every socket (waits until all are connected), send the partial frames, start the trickle."""
        if self.sockets:
            return self
        record(self.cluster, "slowloris", self.address, count=self.count, partial=self.partial,
               frame=self.frame, trickle_interval=self.trickle_interval, timeout=self.timeout)
        sockets = connect_all(self.address, self.count, self.timeout)
        try:
            for sock in sockets:
                self.local_addresses.append(sock.getsockname()[:2])
                if self.partial:
                    sock.setblocking(True)
                    sock.settimeout(self.timeout)
                    sock.sendall(self.frame[: self.partial])
                    sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            self.local_addresses = []
            raise
        self.sockets = sockets
        self._sent = [self.partial] * len(sockets)
        self._gone = [False] * len(sockets)
        if self.trickle_interval is not None and self.partial + 1 < len(self.frame):
            self._thread = threading.Thread(target=self._trickle, name="fdcluster-slowloris", daemon=True)
            self._thread.start()
        return self

    def _trickle(self) -> None:
        """Background thread: one byte per connection per interval, never the frame's last byte."""
        last = len(self.frame) - 1
        try:
            while not self._stop.wait(self.trickle_interval):
                with self._lock:
                    if self._stop.is_set():
                        return
                    busy = False
                    for number, sock in enumerate(self.sockets):
                        position = self._sent[number]
                        if self._gone[number] or position >= last:
                            continue
                        busy = True
                        try:
                            self._sent[number] += sock.send(self.frame[position : position + 1])
                        except (BlockingIOError, InterruptedError):
                            pass  # buffers full: the server stopped reading; try next interval
                        except OSError as exc:
                            if exc.errno not in RESET_ERRNOS:
                                raise
                            self._gone[number] = True  # the server closed it: what a slowloris expects
                    if not busy:
                        return
        except BaseException as exc:  # re-raised at close, in the test's thread
            self._errors.errors.append(exc)

    def alive(self) -> int:
        """How many connections the server has not closed yet (non-blocking; reads nothing)."""
        with self._lock:
            return sum(1 for sock in self.sockets if sock.fileno() >= 0 and not peer_closed(sock))

    def wait_closed(self, timeout: float = 10.0, remaining: int = 0) -> float:
        """Poll until at most ``remaining`` connections are alive; return the seconds it took.

        Raises ``FaultError`` after ``timeout`` seconds.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            alive = self.alive()
            if alive <= remaining:
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise FaultError(f"slowloris: {alive} of {self.count} connections still open after {timeout:g} s "
                                 f"(waiting for at most {remaining})")
            time.sleep(POLL_INTERVAL)

    def close(self, reraise: bool = True) -> None:
        """Stop the trickle and close every connection; re-raise a trickle error if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout)
            self._thread = None
        with self._lock:
            for sock in self.sockets:
                sock.close()
        if reraise:
            self._errors.raise_first("slowloris trickle")


# -- the client that never reads ----------------------------------------------------------


class SlowReader:
    """A client that pipelines requests with large responses and never reads one.

    Its receive buffer is shrunk (``rcvbuf``) before connecting, so the
    server's send buffer toward it fills after a few responses; a server that
    guards its memory then stops reading it, and the client's own sends stall.
    ``fill`` sends up to ``requests`` requests until that happens.

    One call: ``open()`` then ``fill()``; as a context manager, entry opens
    and fills, exit closes.  ``close`` resets the connection (unread data
    makes the kernel send RST anyway).
    """

    def __init__(
        self,
        target: Target,
        requests: int = 1000,
        payload_size: int = 64 * 1024,
        *,
        rcvbuf: int = 4096,
        timeout: float = 10.0,
        method: str = "ping",
    ) -> None:
        self.address, self.cluster = resolve(target)
        self.method = method
        self.requests = check_count(requests, "requests")
        if not 0 <= payload_size <= protocol.DEFAULT_MAX_FRAME - 64:
            raise ValueError(f"payload_size must fit in one frame, got {payload_size!r}")
        self.payload_size = payload_size
        self.rcvbuf = rcvbuf
        self.timeout = timeout
        self.frame = protocol.request(method, "r" * payload_size)
        self.sock: Optional[socket.socket] = None
        self.local_address: Optional[Address] = None
        #: Bytes written so far, complete requests among them, and whether the last fill stalled.
        self.bytes_written = 0
        self.requests_sent = 0
        self.blocked = False

    def __enter__(self) -> SlowReader:
        self.open()
        self.fill()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> SlowReader:
        """Connect (bounded by ``timeout``)."""
        if self.sock is not None:
            return self
        record(self.cluster, "slow_reader", self.address, requests=self.requests, payload_size=self.payload_size,
               rcvbuf=self.rcvbuf, method=self.method, timeout=self.timeout)
        sock, code = start_connect(self.address, rcvbuf=self.rcvbuf)
        try:
            if code not in (0, errno.EISCONN):
                _, writable, _ = select.select([], [sock], [], self.timeout)
                code = connect_result(sock) if writable else errno.ETIMEDOUT
                if code:
                    raise FaultError(f"slow reader: cannot connect to {format_address(self.address)}: "
                                     f"{os.strerror(code)}")
            self.local_address = sock.getsockname()[:2]
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        return self

    def fill(self, timeout: Optional[float] = None, stall: float = 0.25) -> int:
        """Send requests until the socket stays unwritable for ``stall`` seconds; return bytes written.

        Also stops after ``requests`` requests or ``timeout`` seconds.  Sets
        ``blocked`` when it stopped because the send would block.
        """
        if self.sock is None:
            self.open()
        assert self.sock is not None
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        view = memoryview(self.frame)
        size = len(self.frame)
        offset = self.bytes_written % size
        self.blocked = False
        while self.requests_sent < self.requests:
            try:
                sent = self.sock.send(view[offset:])
            except (BlockingIOError, InterruptedError):
                wait = min(stall, deadline - time.monotonic())
                if wait <= 0:
                    break
                # The stall itself is what the fault measures: a peer that stopped reading.
                _, writable, _ = select.select([], [self.sock], [], wait)
                if not writable:
                    self.blocked = True
                    break
                continue
            self.bytes_written += sent
            offset += sent
            if offset == size:
                offset = 0
                self.requests_sent += 1
            if time.monotonic() >= deadline:
                break
        logger.info("slow reader %s: %d bytes written, %d requests, %s", format_address(self.local_address),
                    self.bytes_written, self.requests_sent, "stalled" if self.blocked else "not stalled")
        return self.bytes_written

    def close(self) -> None:
        """Close the connection with a reset (its unread responses are thrown away)."""
        if self.sock is not None:
            reset_socket(self.sock)
            self.sock = None

