"""Storms: hundreds of connections at once, each pinging or reset, run in one thread.

``ConnectionStorm`` opens ``count`` connections, at most ``concurrency`` in
flight, each optionally doing one checked ping; ``RstStorm`` resets each one
with RST after part of a frame.  Both count every outcome in a
``StormResult``.  One run of a storm keeps its selector, its connections in
flight and its counts in a ``_StormRun``; the storm classes only say what
each connection does.

A storm takes a ``Cluster`` or an address; it is one call (``run()``) or a
context manager whose entry runs it (``storm.result`` then holds the
counts) and whose exit closes the connections it holds.  It records itself
when it runs (see ``_record``).  Answers are judged by their JSON value
(``check_response``), never by the reference server's bytes.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from fdcluster_server import protocol

from ..load_result import check_response
from ..sockets import RECV_SIZE, RESET_ERRNOS, Address, errno_kind, errno_name
from ._connect import IN_PROGRESS, check_count, connect_result, start_connect
from ._record import Target, logger, record, resolve
from .frames import reset_socket


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

    __slots__ = ("number", "sock", "state", "out", "decoder", "params", "expected")

    def __init__(self, number: int, sock: socket.socket, out: bytes, params: Any, expected: bytes) -> None:
        self.number = number
        self.sock = sock
        self.state = _CONNECTING
        self.out = out
        self.decoder = protocol.FrameDecoder()
        #: The ping's params, which the answer must echo as a JSON value.
        self.params = params
        #: The reference server's bytes for that answer: a fast path only, never the judge.
        self.expected = expected


class _Storm:
    """What every storm shares: its bounds, the connections it holds, and the hooks a run calls."""

    name = "storm"

    def __init__(self, target: Target, count: int, concurrency: int, timeout: float) -> None:
        self.address, self.cluster = resolve(target)
        self.count = check_count(count)
        self.concurrency = check_count(concurrency, "concurrency")
        self.timeout = timeout
        self.held: List[socket.socket] = []
        self.result: Optional[StormResult] = None

    def __enter__(self) -> _Storm:
        self.run()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection still held."""
        held, self.held = self.held, []
        for sock in held:
            sock.close()

    # What to do with each connection; the storms below override these.
    def _payload(self, number: int) -> Tuple[bytes, Any, bytes]:
        """What connection ``number`` sends, the params its answer must echo, and the reference bytes of it."""
        return b"", None, b""

    def _parameters(self) -> Dict[str, Any]:
        """What the storm's event records, besides its count."""
        return {"concurrency": self.concurrency, "timeout": self.timeout}

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
        """Run the storm to its end (every connection finished, or ``timeout``); return the counts.

        A storm runs once: calling ``run`` again (or entering the storm after
        running it) returns the same counts.
        """
        if self.result is not None:
            return self.result
        record(self.cluster, self.name, self.address, count=self.count, **self._parameters())
        started = time.monotonic()
        run = _StormRun(self)
        run.until(started + self.timeout)
        run.result.seconds = time.monotonic() - started
        self.result = run.result
        logger.info("%s", run.result)
        return run.result


class _StormRun:
    """One run of a storm: its selector, its connections in flight, and the counts so far.

    Non-blocking sockets in one thread, at most the storm's ``concurrency``
    in flight; each connection goes from connecting to sending to awaiting
    its answer, and the storm's hooks say what it sends and what happens
    to it once done.
    """

    def __init__(self, storm: _Storm) -> None:
        self.storm = storm
        self.result = StormResult()
        self.selector = selectors.DefaultSelector()
        self.in_flight: Dict[int, _Pending] = {}
        self.launched = 0

    def until(self, deadline: float) -> None:
        """Launch and step connections until every one is finished or ``deadline``; then close what is left."""
        storm, result = self.storm, self.result
        try:
            while self.launched < storm.count or self.in_flight:
                while self.launched < storm.count and len(self.in_flight) < storm.concurrency:
                    self.launch(self.launched)
                    self.launched += 1
                if not self.in_flight:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # Those in flight and those never launched all ran out of time.
                    never_launched = storm.count - self.launched
                    result.timed_out += len(self.in_flight) + never_launched
                    result.attempted += never_launched
                    self.launched = storm.count
                    break
                for key, _ in self.selector.select(min(remaining, 1.0)):
                    self.step(key.data)
        finally:
            for pending in list(self.in_flight.values()):
                self.drop(pending)
            self.selector.close()

    def launch(self, number: int) -> None:
        """Start connection ``number``'s connect; count it at once if the connect failed outright."""
        self.result.attempted += 1
        out, params, expected = self.storm._payload(number)
        sock, code = start_connect(self.storm.address)
        pending = _Pending(number, sock, out, params, expected)
        if code in (0, errno.EISCONN) or code in IN_PROGRESS:
            self.in_flight[number] = pending
            self.selector.register(sock, selectors.EVENT_WRITE, pending)
            return
        self.count_connect_error(code)
        sock.close()

    def count_connect_error(self, code: int) -> None:
        kind = errno_kind(code)
        if kind is None:
            self.result.other[errno_name(code)] += 1
        else:
            setattr(self.result, kind, getattr(self.result, kind) + 1)

    def drop(self, pending: _Pending) -> None:
        """Give up on a connection: close it without the storm's ``_finish``."""
        self.in_flight.pop(pending.number, None)
        try:
            self.selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        pending.sock.close()

    def done(self, pending: _Pending, keep: bool) -> None:
        """A connection did what it was for: the storm keeps or closes it."""
        self.in_flight.pop(pending.number, None)
        self.selector.unregister(pending.sock)
        self.storm._finish(pending, keep)

    def step(self, pending: _Pending) -> None:
        """Move one ready connection on: its connect's outcome, the rest of its request, or its answer."""
        storm, result, sock = self.storm, self.result, pending.sock
        if pending.state == _CONNECTING:
            code = connect_result(sock)
            if code:
                self.count_connect_error(code)
                self.drop(pending)
                return
            result.connected += 1
            result.local_addresses.append(sock.getsockname()[:2])
            if storm._on_connected(pending, result):
                self.done(pending, storm._keep())
                return
            pending.state = _SENDING
        try:
            if pending.state == _SENDING:
                sent = sock.send(pending.out)
                pending.out = pending.out[sent:]
                if pending.out:
                    return
                pending.state = _AWAITING
                self.selector.modify(sock, selectors.EVENT_READ, pending)
                return
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in RESET_ERRNOS:
                result.reset += 1
            else:
                result.other[errno_name(exc.errno)] += 1
            self.drop(pending)
            return
        if not data:
            result.eof += 1
            self.drop(pending)
            return
        bodies = pending.decoder.feed(data)
        if pending.decoder.failure is not None:
            result.mismatched += 1
            self.drop(pending)
        elif bodies:
            if check_response(bodies[0], pending.params, "ping", pending.expected) is None:
                result.answered += 1
                self.done(pending, storm._keep())
            else:
                result.mismatched += 1
                self.drop(pending)


class ConnectionStorm(_Storm):
    """``count`` connects at once, at most ``concurrency`` in flight, each optionally doing one ping.

    Runs in one thread with non-blocking sockets, so hundreds of connections
    cost no threads.  Each ping carries its connection's number and must be
    echoed: the answer's JSON value, whatever its spacing.  With ``hold=True`` every answered (or, without ping,
    connected) connection stays open until ``close``, e.g. to see which
    worker holds it; otherwise each is closed as soon as it is done.

    ``run()`` returns a ``StormResult``; ``with ConnectionStorm(...) as storm``
    runs it on entry and closes held connections on exit.
    """

    name = "connection_storm"

    def __init__(
        self,
        target: Target,
        count: int,
        concurrency: int = 100,
        hold: bool = False,
        timeout: float = 10.0,
        *,
        ping: bool = True,
    ) -> None:
        super().__init__(target, count, concurrency, timeout)
        self.hold = hold
        self.ping = ping
        self._nonce = f"{os.getpid()}-{time.monotonic_ns()}"

    def __enter__(self) -> ConnectionStorm:
        self.run()
        return self

    def _parameters(self) -> Dict[str, Any]:
        return {**super()._parameters(), "hold": self.hold, "ping": self.ping}

    def _payload(self, number: int) -> Tuple[bytes, Any, bytes]:
        if not self.ping:
            return b"", None, b""
        params = {"storm": number, "nonce": self._nonce}
        expected = protocol.response(protocol.OUT_PONG, params)[protocol.HEADER_SIZE:]
        return protocol.request("ping", params), params, expected

    def _keep(self) -> bool:
        return self.hold


class RstStorm(_Storm):
    """``count`` connections, each sending part of a frame (if ``partial``) and then reset with RST.

    A server must notice every reset and close its side: none may linger in
    CLOSE_WAIT or in the master's hands.  ``run()`` returns a ``StormResult``
    (``aborted`` counts the resets sent).
    """

    name = "rst_storm"

    def __init__(
        self,
        target: Target,
        count: int,
        concurrency: int = 100,
        timeout: float = 10.0,
        *,
        partial: bool = True,
    ) -> None:
        super().__init__(target, count, concurrency, timeout)
        self.partial = partial
        frame = protocol.request("ping", "rst")
        self._partial_frame = frame[: protocol.HEADER_SIZE + 2]

    def __enter__(self) -> RstStorm:
        self.run()
        return self

    def _parameters(self) -> Dict[str, Any]:
        return {**super()._parameters(), "partial": self.partial}

    def _on_connected(self, pending: _Pending, result: StormResult) -> bool:
        if self.partial:
            try:
                pending.sock.send(self._partial_frame)
            except OSError:
                pass  # reset already; the RST below is all that is left
        result.aborted += 1
        return True

    def _finish(self, pending: _Pending, keep: bool) -> None:
        reset_socket(pending.sock)

