"""Client-side fault injectors: each fault is one call, composed in a user's own tests.

Like the rules of a Hypothesis state machine, a fault here is a single call a
test makes between its invariant checks: split a frame, stall a connection,
never read, reset, storm, or kill a worker while connections handed to it are
still unacknowledged.  Faults on the server's processes themselves (kill,
pause, resume a worker; kill the master) are ``Cluster`` methods and are not
repeated here.

Every injector talks to a loopback address, is bounded in how many sockets
it opens and how long it runs, and closes every socket it opened when it
ends -- the classes are context managers whose exit closes them even when the
test body raised.  Framing comes from ``fdcluster_server.protocol``; this
module only misbehaves with the bytes.  No pytest import.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from fdcluster_server import protocol

from . import observe
from .client import Client, ClientError
from .cluster import Cluster, ClusterError, WorkerRef

__all__ = [
    "ConnectionStorm",
    "FaultError",
    "HandoffKill",
    "RstStorm",
    "SlowReader",
    "Slowloris",
    "StormResult",
    "byte_by_byte",
    "half_close_request",
    "kill_during_handoff",
    "rst_close",
    "send_in_pieces",
    "split_frame",
    "truncate_and_close",
]

Address = Tuple[str, int]
SockOrClient = Union[socket.socket, Client]

#: Upper bounds, so a typo in a test cannot exhaust descriptors or ports.
MAX_CONNECTIONS = 5000
MAX_PIECES = 1 << 16

POLL_INTERVAL = 0.005
_LINGER_RST = struct.pack("ii", 1, 0)
_RECV_SIZE = 65536
# Errors that mean the peer reset or went away, whatever the exact timing.
_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


class FaultError(RuntimeError):
    """A fault could not be set up as asked (connects failed, state never reached); the message says why."""


# -- split frames -----------------------------------------------------------------------


def split_frame(frame: bytes, at: Union[int, Sequence[int]]) -> List[bytes]:
    """Cut ``frame`` at byte offset ``at`` (or at each offset of a sequence) into pieces.

    Offsets must lie strictly inside the frame (1 .. len-1), so no piece is
    empty; they are sorted and duplicates dropped.  ``b"".join(pieces) == frame``.
    """
    positions = [at] if isinstance(at, int) else list(at)
    cuts = sorted(set(int(p) for p in positions))
    for cut in cuts:
        if not 0 < cut < len(frame):
            raise ValueError(f"split offset {cut} is outside 1..{len(frame) - 1} for a frame of {len(frame)} bytes")
    bounds = [0] + cuts + [len(frame)]
    return [frame[start:end] for start, end in zip(bounds, bounds[1:])]


def _even_cuts(length: int, pieces: int) -> List[int]:
    if not 1 <= pieces <= length:
        raise ValueError(f"cannot send a frame of {length} bytes in {pieces} non-empty pieces")
    return [length * k // pieces for k in range(1, pieces)]


def _pieces_of(frame: bytes, pieces: Union[int, Sequence[int], Sequence[bytes]]) -> List[bytes]:
    if isinstance(pieces, int):
        return split_frame(frame, _even_cuts(len(frame), pieces)) if pieces > 1 else [frame]
    items = list(pieces)
    if items and all(isinstance(p, (bytes, bytearray, memoryview)) for p in items):
        chunks = [bytes(p) for p in items]
        if b"".join(chunks) != frame:
            raise ValueError("the pieces given do not add up to the frame")
        return chunks
    return split_frame(frame, items) if items else [frame]


def _sendall(target: SockOrClient, data: bytes) -> None:
    if isinstance(target, Client):
        target.send_raw(data)
    else:
        target.sendall(data)


def send_in_pieces(
    target: SockOrClient,
    frame: bytes,
    pieces: Union[int, Sequence[int], Sequence[bytes]],
    delay: float = 0.0,
) -> List[bytes]:
    """Send ``frame`` in pieces, each in its own write, ``delay`` seconds apart; return the pieces.

    ``pieces`` is a number of roughly equal pieces, a sequence of split
    offsets (see ``split_frame``), or the pieces themselves.  ``TCP_NODELAY``
    is set, so Nagle does not glue the pieces back together on the way out.
    """
    chunks = _pieces_of(frame, pieces)
    if len(chunks) > MAX_PIECES:
        raise ValueError(f"{len(chunks)} pieces is more than the limit of {MAX_PIECES}")
    if not isinstance(target, Client):
        target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A Client sets TCP_NODELAY when it connects.
    for number, chunk in enumerate(chunks):
        if number and delay > 0:
            time.sleep(delay)  # the gap between pieces is the fault itself
        _sendall(target, chunk)
    return chunks


def byte_by_byte(target: SockOrClient, frame: bytes, delay: float = 0.0) -> None:
    """Send ``frame`` one byte per write, ``delay`` seconds apart."""
    send_in_pieces(target, frame, len(frame), delay)


# -- ending a connection badly -----------------------------------------------------------


def rst_close(target: SockOrClient) -> None:
    """Abortive close: SO_LINGER 0, so the kernel sends RST instead of FIN and keeps no TIME_WAIT."""
    if isinstance(target, Client):
        target.abort()
        return
    try:
        target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass  # already reset or closed: closing is all that is left to do
    finally:
        target.close()


def truncate_and_close(address: Address, frame: bytes, keep: int, timeout: float = 5.0) -> Address:
    """Connect, send the first ``keep`` bytes of ``frame``, close normally; return the local address.

    The returned address names the connection in a later snapshot, e.g. to
    check that the server closed its side too.
    """
    if not 0 <= keep <= len(frame):
        raise ValueError(f"keep={keep} is outside 0..{len(frame)}")
    with Client(address, timeout=timeout) as client:
        if keep:
            client.send_raw(frame[:keep])
        return client.local_address


def half_close_request(address: Address, method: str, params: Any = None, timeout: float = 5.0) -> dict:
    """Send one request, half-close (SHUT_WR), read the response, then expect the server's EOF.

    Returns the response object; raises ``ClientError`` if no response comes,
    or if the server does not end the stream after answering.
    """
    with Client(address, timeout=timeout) as client:
        client.send_raw(protocol.request(method, params))
        client.shutdown_write()
        response = client.recv_frame()
        client.expect_eof()
        return response


# -- non-blocking connects, shared by the many-socket injectors -------------------------


def _check_count(count: int, name: str = "count") -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_CONNECTIONS:
        raise ValueError(f"{name} must be an int in 1..{MAX_CONNECTIONS}, got {count!r}")
    return count


def _start_connect(address: Address, rcvbuf: Optional[int] = None) -> Tuple[socket.socket, int]:
    """A non-blocking socket with its connect under way; returns it and connect_ex's errno."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            # Before connect: the window scale is fixed by the SYN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        code = sock.connect_ex(address)
    except BaseException:
        sock.close()
        raise
    return sock, code


def _connect_result(sock: socket.socket) -> int:
    """0 once a non-blocking connect succeeded, else its errno."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _connect_all(address: Address, count: int, timeout: float) -> List[socket.socket]:
    """Open ``count`` connections at once (non-blocking, one thread); all or FaultError."""
    deadline = time.monotonic() + timeout
    sockets: List[socket.socket] = []
    failures: Counter = Counter()
    selector = selectors.DefaultSelector()
    try:
        for _ in range(count):
            sock, code = _start_connect(address)
            sockets.append(sock)
            if code in (0, errno.EISCONN):
                continue
            if code not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                failures[errno.errorcode.get(code, str(code))] += 1
                continue
            selector.register(sock, selectors.EVENT_WRITE)
        while selector.get_map() and not failures:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures["timeout"] += len(selector.get_map())
                break
            for key, _ in selector.select(remaining):
                selector.unregister(key.fileobj)
                code = _connect_result(key.fileobj)  # type: ignore[arg-type]
                if code:
                    failures[errno.errorcode.get(code, str(code))] += 1
        if failures:
            detail = ", ".join(f"{n} {kind}" for kind, n in failures.items())
            raise FaultError(f"could not open {count} connections to {observe.format_address(address)} "
                             f"within {timeout:g} s: {detail}")
        return sockets
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    finally:
        selector.close()


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer ended the connection (FIN or RST), without consuming or blocking."""
    poll_in = getattr(select, "POLLRDHUP", 0)
    if hasattr(select, "poll") and poll_in:
        poller = select.poll()
        poller.register(sock, poll_in | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


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
        address: Address,
        count: int,
        trickle_interval: Optional[float] = None,
        timeout: float = 10.0,
        *,
        partial: int = protocol.HEADER_SIZE + 1,
        frame: Optional[bytes] = None,
    ) -> None:
        self.address = (address[0], int(address[1]))
        self.count = _check_count(count)
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

    def __enter__(self) -> "Slowloris":
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close(reraise=exc_info[0] is None)

    def open(self) -> "Slowloris":
        """Connect every socket (waits until all are connected), send the partial frames, start the trickle."""
        if self.sockets:
            return self
        sockets = _connect_all(self.address, self.count, self.timeout)
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
                            if exc.errno not in _RESET_ERRNOS:
                                raise
                            self._gone[number] = True  # the server closed it: what a slowloris expects
                    if not busy:
                        return
        except BaseException as exc:  # re-raised at close, in the test's thread
            self._errors.errors.append(exc)

    def alive(self) -> int:
        """How many connections the server has not closed yet (non-blocking; reads nothing)."""
        with self._lock:
            return sum(1 for sock in self.sockets if sock.fileno() >= 0 and not _peer_closed(sock))

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

    Use as a context manager; ``close`` resets the connection (unread data
    makes the kernel send RST anyway).
    """

    def __init__(
        self,
        address: Address,
        requests: int = 1000,
        payload_size: int = 64 * 1024,
        *,
        rcvbuf: int = 4096,
        timeout: float = 10.0,
        method: str = "ping",
    ) -> None:
        self.address = (address[0], int(address[1]))
        self.requests = _check_count(requests, "requests")
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

    def __enter__(self) -> "SlowReader":
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> "SlowReader":
        """Connect (bounded by ``timeout``)."""
        if self.sock is not None:
            return self
        sock, code = _start_connect(self.address, rcvbuf=self.rcvbuf)
        try:
            if code not in (0, errno.EISCONN):
                _, writable, _ = select.select([], [sock], [], self.timeout)
                code = _connect_result(sock) if writable else errno.ETIMEDOUT
                if code:
                    raise FaultError(f"slow reader: cannot connect to {observe.format_address(self.address)}: "
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
        return self.bytes_written

    def close(self) -> None:
        """Close the connection with a reset (its unread responses are thrown away)."""
        if self.sock is not None:
            rst_close(self.sock)
            self.sock = None


# -- storms -----------------------------------------------------------------------------


@dataclass
class StormResult:
    """What a storm of connections saw, counted per outcome."""

    attempted: int = 0
    connected: int = 0
    #: Pings answered with the right echo.
    answered: int = 0
    refused: int = 0
    reset: int = 0
    timed_out: int = 0
    #: The server closed before answering.
    eof: int = 0
    #: Answered, but not with a pong echoing the ping's params (or an error frame).
    mismatched: int = 0
    #: Connections ended on purpose with RST (``RstStorm``).
    aborted: int = 0
    #: Other connect errors by errno name.
    other: Counter = field(default_factory=Counter)
    #: Local addresses of the connections that connected, in the order they did.
    local_addresses: List[Address] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        figures = [f"{self.attempted} attempted", f"{self.connected} connected", f"{self.answered} answered"]
        for name in ("refused", "reset", "timed_out", "eof", "mismatched", "aborted"):
            value = getattr(self, name)
            if value:
                figures.append(f"{value} {name.replace('_', ' ')}")
        figures.extend(f"{n} {kind}" for kind, n in self.other.items())
        return f"storm: {', '.join(figures)} in {self.seconds:.2f} s"


_CONNECTING, _SENDING, _AWAITING = "connecting", "sending", "awaiting"


class _Pending:
    """One storm connection in flight."""

    __slots__ = ("number", "sock", "state", "out", "decoder", "expected")

    def __init__(self, number: int, sock: socket.socket, out: bytes, expected: bytes) -> None:
        self.number = number
        self.sock = sock
        self.state = _CONNECTING
        self.out = out
        self.decoder = protocol.FrameDecoder()
        self.expected = expected


class _Storm:
    """The engine of the storms: non-blocking sockets in one thread, at most ``concurrency`` in flight."""

    def __init__(self, address: Address, count: int, concurrency: int, timeout: float) -> None:
        self.address = (address[0], int(address[1]))
        self.count = _check_count(count)
        self.concurrency = _check_count(concurrency, "concurrency")
        self.timeout = timeout
        self.held: List[socket.socket] = []
        self.result: Optional[StormResult] = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection still held."""
        held, self.held = self.held, []
        for sock in held:
            sock.close()

    # What to do with each connection; the storms below override these.
    def _payload(self, number: int) -> Tuple[bytes, bytes]:
        return b"", b""

    def _on_connected(self, pending: _Pending, result: StormResult) -> bool:
        """Return True when the connection is finished at connect time."""
        return not pending.out

    def _finish(self, pending: _Pending, keep: bool) -> None:
        if keep:
            self.held.append(pending.sock)
        else:
            pending.sock.close()

    def _keep(self) -> bool:
        return False

    def run(self) -> StormResult:
        """Run the storm to its end (every connection finished, or ``timeout``); return the counts."""
        if self.result is not None:
            raise FaultError("a storm runs once; make a new one")
        result = StormResult()
        started = time.monotonic()
        deadline = started + self.timeout
        selector = selectors.DefaultSelector()
        in_flight: Dict[int, _Pending] = {}
        next_number = 0
        try:
            while next_number < self.count or in_flight:
                while next_number < self.count and len(in_flight) < self.concurrency:
                    self._launch(next_number, selector, in_flight, result)
                    next_number += 1
                if not in_flight:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.timed_out += len(in_flight) + (self.count - next_number)
                    result.attempted += self.count - next_number
                    next_number = self.count
                    for pending in list(in_flight.values()):
                        self._drop(pending, selector, in_flight)
                    break
                for key, mask in selector.select(min(remaining, 1.0)):
                    self._step(key.data, mask, selector, in_flight, result)
        finally:
            for pending in list(in_flight.values()):
                self._drop(pending, selector, in_flight)
            selector.close()
        result.seconds = time.monotonic() - started
        self.result = result
        return result

    def _launch(self, number: int, selector: selectors.BaseSelector, in_flight: Dict[int, _Pending],
                result: StormResult) -> None:
        result.attempted += 1
        out, expected = self._payload(number)
        sock, code = _start_connect(self.address)
        pending = _Pending(number, sock, out, expected)
        if code in (0, errno.EISCONN, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            in_flight[number] = pending
            selector.register(sock, selectors.EVENT_WRITE, pending)
            return
        self._count_connect_error(code, result)
        sock.close()

    @staticmethod
    def _count_connect_error(code: int, result: StormResult) -> None:
        if code == errno.ECONNREFUSED:
            result.refused += 1
        elif code in (errno.ECONNRESET, errno.ECONNABORTED):
            result.reset += 1
        elif code == errno.ETIMEDOUT:
            result.timed_out += 1
        else:
            result.other[errno.errorcode.get(code, str(code))] += 1

    def _drop(self, pending: _Pending, selector: selectors.BaseSelector, in_flight: Dict[int, _Pending]) -> None:
        in_flight.pop(pending.number, None)
        try:
            selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        pending.sock.close()

    def _done(self, pending: _Pending, selector: selectors.BaseSelector, in_flight: Dict[int, _Pending],
              keep: bool) -> None:
        in_flight.pop(pending.number, None)
        selector.unregister(pending.sock)
        self._finish(pending, keep)

    def _step(self, pending: _Pending, mask: int, selector: selectors.BaseSelector,
              in_flight: Dict[int, _Pending], result: StormResult) -> None:
        sock = pending.sock
        if pending.state == _CONNECTING:
            code = _connect_result(sock)
            if code:
                self._count_connect_error(code, result)
                self._drop(pending, selector, in_flight)
                return
            result.connected += 1
            result.local_addresses.append(sock.getsockname()[:2])
            if self._on_connected(pending, result):
                in_flight.pop(pending.number, None)
                selector.unregister(sock)
                self._finish(pending, self._keep())
                return
            pending.state = _SENDING
        try:
            if pending.state == _SENDING:
                sent = sock.send(pending.out)
                pending.out = pending.out[sent:]
                if pending.out:
                    return
                pending.state = _AWAITING
                selector.modify(sock, selectors.EVENT_READ, pending)
                return
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _RESET_ERRNOS:
                result.reset += 1
            else:
                result.other[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            self._drop(pending, selector, in_flight)
            return
        if not data:
            result.eof += 1
            self._drop(pending, selector, in_flight)
            return
        bodies = pending.decoder.feed(data)
        if pending.decoder.failure is not None:
            result.mismatched += 1
            self._drop(pending, selector, in_flight)
        elif bodies:
            if bodies[0] == pending.expected:
                result.answered += 1
                self._done(pending, selector, in_flight, self._keep())
            else:
                result.mismatched += 1
                self._drop(pending, selector, in_flight)


class ConnectionStorm(_Storm):
    """``count`` connects at once, at most ``concurrency`` in flight, each optionally doing one ping.

    Runs in one thread with non-blocking sockets, so hundreds of connections
    cost no threads.  Each ping carries its connection's number and must be
    echoed exactly.  With ``hold=True`` every answered (or, without ping,
    connected) connection stays open until ``close``, e.g. to see which
    worker holds it; otherwise each is closed as soon as it is done.

    ``run()`` returns a ``StormResult``; use the storm as a context manager
    so held connections are closed.
    """

    def __init__(
        self,
        address: Address,
        count: int,
        concurrency: int = 100,
        hold: bool = False,
        timeout: float = 10.0,
        *,
        ping: bool = True,
    ) -> None:
        super().__init__(address, count, concurrency, timeout)
        self.hold = hold
        self.ping = ping
        self._nonce = f"{os.getpid()}-{time.monotonic_ns()}"

    def __enter__(self) -> "ConnectionStorm":
        return self

    def _payload(self, number: int) -> Tuple[bytes, bytes]:
        if not self.ping:
            return b"", b""
        params = {"storm": number, "nonce": self._nonce}
        return protocol.request("ping", params), protocol.response(protocol.OUT_PONG, params)[protocol.HEADER_SIZE:]

    def _keep(self) -> bool:
        return self.hold


class RstStorm(_Storm):
    """``count`` connections, each sending part of a frame (if ``partial``) and then reset with RST.

    A server must notice every reset and close its side: none may linger in
    CLOSE_WAIT or in the master's hands.  ``run()`` returns a ``StormResult``
    (``aborted`` counts the resets sent).
    """

    def __init__(
        self,
        address: Address,
        count: int,
        concurrency: int = 100,
        timeout: float = 10.0,
        *,
        partial: bool = True,
    ) -> None:
        super().__init__(address, count, concurrency, timeout)
        self.partial = partial
        frame = protocol.request("ping", "rst")
        self._partial_frame = frame[: protocol.HEADER_SIZE + 2]

    def __enter__(self) -> "RstStorm":
        return self

    def _on_connected(self, pending: _Pending, result: StormResult) -> bool:
        if self.partial:
            try:
                pending.sock.send(self._partial_frame)
            except OSError:
                pass  # reset already; the RST below is all that is left
        result.aborted += 1
        return True

    def _finish(self, pending: _Pending, keep: bool) -> None:
        rst_close(pending.sock)


# -- a worker killed while its handoffs are unacknowledged -------------------------------


Answer = Tuple[int, Union[dict, BaseException]]


class HandoffKill:
    """The outcome of ``kill_during_handoff``: the clients caught in the kill, and how to hear from them.

    ``clients[i]`` sent ``ping`` with ``params[i]`` while its socket was handed
    to the frozen worker and not acknowledged; ``bystanders`` are connections
    opened on the way that went to live workers (answered already, left open
    so the handoff order stays as observed).  Close it, or use it as a context
    manager, to close them all.
    """

    def __init__(self, cluster: Cluster, frozen_pid: int, frozen_index: Optional[int],
                 redistributed_before: Optional[int]) -> None:
        self.cluster = cluster
        self.frozen_pid = frozen_pid
        #: The reference server's index of the frozen worker; None for other targets.
        self.frozen_index = frozen_index
        #: The master's ``redistributed`` counter before the fault (reference server only).
        self.redistributed_before = redistributed_before
        self.clients: List[Client] = []
        self.params: List[Any] = []
        self.bystanders: List[Client] = []
        #: Whether the frozen worker's hold on ``clients`` was confirmed by the server's counters.
        self.confirmed_by_stats = False

    def __enter__(self) -> "HandoffKill":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<HandoffKill pid={self.frozen_pid} clients={len(self.clients)} bystanders={len(self.bystanders)}>"

    def answers(self, timeout: float = 5.0) -> List[Answer]:
        """Each client's response, or the exception raised waiting for it: ``[(index, response or error)]``.

        One deadline of ``timeout`` seconds covers every client.
        """
        deadline = time.monotonic() + timeout
        found: List[Answer] = []
        for index, client in enumerate(self.clients):
            try:
                # A short floor, so an answer already waiting is still read after the deadline.
                found.append((index, client.recv_frame(max(0.05, deadline - time.monotonic()))))
            except (ClientError, OSError) as exc:
                found.append((index, exc))
        return found

    def close(self) -> None:
        """Close every client and bystander."""
        for client in self.clients + self.bystanders:
            client.close()


def _is_readable(client: Client) -> bool:
    readable, _, _ = select.select([client], [], [], 0)
    return bool(readable)


def _holders(snap: observe.Snapshot, address: Address) -> Optional[str]:
    """'worker' if a non-master process holds the client's server side, 'master' if only it does."""
    owner = snap.owner_of(address)
    if owner is None:
        return None
    return "master" if owner.pid == snap.master_pid else "worker"


def _ping_client(cluster: Cluster, number: int, nonce: str, timeout: float) -> Tuple[Client, Any]:
    client = Client(cluster.address, timeout=timeout)
    params = {"handoff": number, "nonce": nonce}
    try:
        client.send_raw(protocol.request("ping", params))
    except BaseException:
        client.close()
        raise
    return client, params


def kill_during_handoff(cluster: Cluster, worker: WorkerRef = 0, connections: int = 4,
                        timeout: float = 5.0) -> HandoffKill:
    """SIGKILL a worker while ``connections`` connections handed to it are not yet acknowledged.

    The worker is paused (SIGSTOP), so it cannot acknowledge; clients each
    send a ``ping`` with distinct params until the frozen worker has been
    handed ``connections`` of them.  On the reference server its counters
    confirm it (the worker's ``unacked``; this needs at most the server's
    handoff window, 4 by default).  On other targets, ``connections`` clients
    are opened, the kernel must show each held by a process of the target,
    and the master's descriptor count must stop changing.  Then the worker
    is SIGKILLed; every client should still get its answer (``answers``).

    Raises ``FaultError`` (the worker resumed, every client closed) if that
    state is not reached within ``timeout`` seconds.
    """
    _check_count(connections, "connections")
    stats = cluster.stats()
    pid = cluster.worker_pid(worker)
    index: Optional[int] = None
    redistributed: Optional[int] = None
    if stats is not None:
        index = next((w["index"] for w in stats["workers"] if w.get("pid") == pid), None)
        redistributed = stats["master"].get("redistributed")
    labels = cluster.labels()
    cluster.pause_worker(pid)
    kill = HandoffKill(cluster, pid, index, redistributed)
    deadline = time.monotonic() + timeout
    try:
        if index is not None:
            _hand_to_frozen_reference(cluster, kill, connections, deadline, timeout, labels)
        else:
            _hand_to_frozen_generic(cluster, kill, connections, deadline, timeout, labels)
        cluster.kill_worker(pid)
        cluster.paused.discard(pid)  # dead now: never SIGCONT a recycled pid at teardown
    except BaseException:
        kill.close()
        if pid in cluster.paused:
            try:
                cluster.resume_worker(pid)
            except ClusterError:
                pass  # it died on its own; the error below says what was not reached
        raise
    return kill


def _snapshot(cluster: Cluster, labels: Dict[int, str]) -> observe.Snapshot:
    # Not cluster.snapshot(): its labels come from the server's stats, which
    # wait a full second for the paused worker's counters.
    return observe.snapshot(cluster.master, labels)


def _wait_held(cluster: Cluster, client: Client, deadline: float, timeout: float,
               labels: Dict[int, str]) -> str:
    """Poll until a process of the target holds ``client``'s server side; 'master' or 'worker'."""
    while True:
        if _is_readable(client):
            return "worker"  # answered (or closed): a live worker has it
        held = _holders(_snapshot(cluster, labels), client.local_address)
        if held is not None:
            return held
        if time.monotonic() >= deadline:
            raise FaultError(f"kill_during_handoff: no process of {cluster.name} took connection "
                             f"{observe.format_address(client.local_address)} within {timeout:g} s")
        time.sleep(POLL_INTERVAL)


def _hand_to_frozen_reference(cluster: Cluster, kill: HandoffKill, connections: int, deadline: float,
                              timeout: float, labels: Dict[int, str]) -> None:
    """Open clients until the server's counters show ``connections`` unacknowledged at the frozen worker."""
    nonce = f"{os.getpid()}-{time.monotonic_ns()}"
    # Round-robin or least-connections hands the frozen worker about one in
    # every N connections; far more than that means it is not taking any more.
    most = min(MAX_CONNECTIONS, connections * (len(cluster.workers) + 1) * 4)
    opened = 0
    candidates: List[Tuple[Client, Any]] = []
    while True:
        # Clients the master alone holds may be frozen, or just not handed yet;
        # a frozen one is never held by a worker, so this never overshoots.
        while len(candidates) < connections:
            if time.monotonic() >= deadline or opened >= most:
                raise FaultError(f"kill_during_handoff: only {len(candidates)} of {connections} connections went "
                                 f"to the frozen worker after {opened} clients and {timeout:g} s "
                                 "(is the server's handoff window smaller than connections?)")
            client, params = _ping_client(cluster, opened, nonce, timeout)
            opened += 1
            if _wait_held(cluster, client, deadline, timeout, labels) == "master":
                candidates.append((client, params))
            else:
                kill.bystanders.append(client)
        frozen = _settled_unacked(cluster, kill.frozen_index, deadline, timeout)
        snap = _snapshot(cluster, labels)
        still: List[Tuple[Client, Any]] = []
        for client, params in candidates:
            if _is_readable(client) or _holders(snap, client.local_address) == "worker":
                kill.bystanders.append(client)
            else:
                still.append((client, params))
        candidates = still
        if frozen == len(candidates) == connections:
            break
        if frozen > connections:
            raise FaultError(f"kill_during_handoff: the frozen worker holds {frozen} unacknowledged connections, "
                             f"more than the {connections} asked for (other clients are connecting)")
        if time.monotonic() >= deadline:
            raise FaultError(f"kill_during_handoff: the frozen worker holds {frozen} of {connections} "
                             f"unacknowledged connections after {timeout:g} s and {opened} clients "
                             "(is the server's handoff window smaller than connections?)")
    kill.clients = [client for client, _ in candidates]
    kill.params = [params for _, params in candidates]
    kill.confirmed_by_stats = True


def _settled_unacked(cluster: Cluster, index: Optional[int], deadline: float, timeout: float) -> int:
    """The frozen worker's unacknowledged handoffs, once nothing is pending and live workers have acked."""
    while True:
        stats = cluster.stats()
        if stats is None:
            raise FaultError("kill_during_handoff: the server stopped answering stats")
        frozen = next((w for w in stats["workers"] if w["index"] == index), None)
        live_unacked = sum(w.get("unacked", 0) for w in stats["workers"] if w["index"] != index)
        if frozen is not None and stats["master"]["pending"] == 0 and live_unacked == 0:
            return int(frozen.get("unacked", 0))
        if time.monotonic() >= deadline:
            raise FaultError(f"kill_during_handoff: handoffs did not settle within {timeout:g} s "
                             f"(pending {stats['master']['pending']}, live workers' unacked {live_unacked})")


def _hand_to_frozen_generic(cluster: Cluster, kill: HandoffKill, connections: int, deadline: float,
                            timeout: float, labels: Dict[int, str]) -> None:
    """Open ``connections`` clients; wait until each is held and the master's fd count is steady."""
    nonce = f"{os.getpid()}-{time.monotonic_ns()}"
    for number in range(connections):
        client, params = _ping_client(cluster, number, nonce, timeout)
        kill.clients.append(client)
        kill.params.append(params)
    addresses = [client.local_address for client in kill.clients]
    steady_needed = 3  # consecutive snapshots with the same master fd count
    steady, last = 0, -1
    while True:
        snap = _snapshot(cluster, labels)
        master = snap.master
        if master is None:
            raise FaultError(f"kill_during_handoff: the master of {cluster.name} is gone")
        if all(snap.owner_of(address) is not None for address in addresses):
            steady = steady + 1 if master.fd_count == last else 1
            last = master.fd_count
            if steady >= steady_needed:
                return
        else:
            steady, last = 0, -1
        if time.monotonic() >= deadline:
            held = sum(1 for address in addresses if snap.owner_of(address) is not None)
            raise FaultError(f"kill_during_handoff: {held} of {connections} connections held by {cluster.name}, "
                             f"master fd count not steady, after {timeout:g} s")
        time.sleep(POLL_INTERVAL)
