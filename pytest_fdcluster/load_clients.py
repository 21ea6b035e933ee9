"""One process's share of a load run: its clients as threads, each request checked and timed.

``run_part`` runs a ``Plan`` (picklable, so it crosses to spawned
processes) and returns a ``Part``: the counts, errors by kind, latency
histogram and per-worker spread its clients measured, and what its
misbehaving clients did.  ``load.run_load`` builds the plans, runs them here
or in spawned processes, and merges the parts.  No pytest import.
"""

from __future__ import annotations

import socket
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from fdcluster_server import protocol

from .connection_owners import OBSERVE_TIMEOUT, ConnectionOwners
from .faults.misbehaviours import Misbehaviour, misbehave
from .histogram import Histogram
from .load_result import ECHOING_METHODS, Misbehaving, check_response
from .sockets import RECV_SIZE, Address, error_kind

__all__ = ["LoadError", "Part", "Payload", "Plan", "PROGRESS_INTERVAL", "run_part"]

Payload = Union[None, Callable[[int], Any], Any]

_MAX_RESPONSE = 16 * protocol.DEFAULT_MAX_FRAME

#: Seconds between two progress reports.
PROGRESS_INTERVAL = 1.0

#: Pause between two connections of one misbehaving client: a misbehaving client stays one client, not a storm.
MISBEHAVE_PAUSE = 0.01


class LoadError(RuntimeError):
    """The load generator itself failed (a client thread or process crashed); the message carries the traceback."""




# -- one process's share of the clients -------------------------------------------------------


@dataclass
class Plan:
    """What one process runs; picklable, so it crosses to spawned processes."""

    address: Address
    method: str
    payload: Payload
    keepalive: bool
    timeout: float
    duration: float
    #: (global client id, request quota or None) for each client of this process.
    clients: List[Tuple[int, Optional[int]]]
    total_clients: int
    master_pid: Optional[int] = None
    labels: Optional[Dict[int, str]] = None
    observe_each: bool = False
    fault: Optional[Misbehaviour] = None
    #: The global ids of the clients that misbehave (``fault``) instead of sending requests.
    misbehaving: Tuple[int, ...] = ()


@dataclass
class Part:
    """What one process (or one client) measured."""

    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    histogram: Histogram = field(default_factory=Histogram)
    connections: int = 0
    per_worker: Counter = field(default_factory=Counter)
    requests_per_worker: Counter = field(default_factory=Counter)
    misbehaving: Misbehaving = field(default_factory=Misbehaving)
    started: float = 0.0
    ended: float = 0.0

    @property
    def failed(self) -> int:
        # list() copies in one step, while client threads may add a kind.
        return sum(list(self.errors.values()))

    def merge(self, other: Part) -> None:
        self.ok += other.ok
        self.misbehaving.connections += other.misbehaving.connections
        self.misbehaving.closed_by_server += other.misbehaving.closed_by_server
        self.misbehaving.errors.update(other.misbehaving.errors)
        self.errors.update(other.errors)
        self.histogram.merge(other.histogram)
        self.connections += other.connections
        self.per_worker.update(other.per_worker)
        self.requests_per_worker.update(other.requests_per_worker)


class _Eof(Exception):
    """The server closed the connection while a response was awaited."""


class _Connection:
    """One client connection; its receive buffer is the client's, reused across connections."""

    __slots__ = ("sock", "decoder", "buffer", "view", "address", "ticket", "requests")

    def __init__(self, address: Address, timeout: float, buffer: bytearray, view: memoryview) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.address: Address = self.sock.getsockname()[:2]
        except BaseException:
            self.sock.close()
            raise
        self.decoder = protocol.FrameDecoder(_MAX_RESPONSE)
        self.buffer = buffer
        self.view = view
        self.ticket: Optional[int] = None
        self.requests = 0

    def exchange(self, frame: bytes) -> bytes:
        """Send one request frame and return the body of the response frame."""
        sock = self.sock
        sock.sendall(frame)
        decoder = self.decoder
        while True:
            n = sock.recv_into(self.buffer)
            if not n:
                raise _Eof()
            bodies = decoder.feed(self.view[:n])  # type: ignore[arg-type]  # any bytes-like, no copy
            if decoder.failure is not None:
                raise protocol.ProtocolError(str(decoder.failure))
            if bodies:
                return bodies[0]  # one request in flight: one response per exchange

    def close(self) -> None:
        self.sock.close()


def _error_kind(exc: BaseException) -> str:
    """The ``ERROR_KINDS`` entry a failed exchange counts under."""
    if isinstance(exc, _Eof):
        return "eof"
    if isinstance(exc, protocol.ProtocolError):
        return "mismatched"
    return error_kind(exc)


def _misbehaving_loop(plan: Plan, deadline: float, stop: threading.Event, part: Part) -> None:
    """One misbehaving client: connection after connection, each misbehaving, until ``stop`` or the deadline."""
    assert plan.fault is not None
    counts = part.misbehaving
    while not stop.is_set() and time.monotonic() < deadline:
        outcome = misbehave(plan.fault, plan.address, stop, plan.timeout)
        counts.connections += 1
        if outcome == "closed":
            counts.closed_by_server += 1
        elif outcome is not None:
            counts.errors[outcome] += 1
        stop.wait(MISBEHAVE_PAUSE)


def _client_loop(plan: Plan, client_id: int, quota: Optional[int], deadline: float,
                 observer: Optional[ConnectionOwners], part: Part) -> None:
    """One client's requests until its quota or the deadline; results go into ``part``."""
    method = plan.method
    payload = plan.payload
    expected_out = ECHOING_METHODS.get(method)
    fixed = payload is not None and not callable(payload)
    if fixed:
        # A fixed payload is encoded once for the whole run.
        fixed_frame = protocol.request(method, payload)
        fixed_expected = protocol.response(expected_out, payload)[protocol.HEADER_SIZE:] if expected_out else None
    histogram = part.histogram
    errors = part.errors
    record = histogram.record
    perf = time.perf_counter
    now = time.monotonic
    stride = plan.total_clients
    conn: Optional[_Connection] = None
    sent = 0
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)

    def finish(connection: _Connection) -> None:
        if connection.ticket is not None and observer is not None:
            label = observer.verdict(connection.ticket)
            part.per_worker[label] += 1
            part.requests_per_worker[label] += connection.requests
        connection.close()

    try:
        while (quota is None or sent < quota) and now() < deadline:
            i = client_id + stride * sent  # unique across clients and processes
            sent += 1
            if fixed:
                frame, expected, params = fixed_frame, fixed_expected, payload
            else:
                params = i if payload is None else payload(i)
                frame = protocol.request(method, params)
                expected = protocol.response(expected_out, params)[protocol.HEADER_SIZE:] if expected_out else None
            started = perf()
            try:
                if conn is None:
                    conn = _Connection(plan.address, plan.timeout, buffer, view)
                    part.connections += 1
                body = conn.exchange(frame)
            except Exception as exc:  # every failure of one request is counted, not raised
                errors[_error_kind(exc)] += 1
                if conn is not None:
                    finish(conn)  # its stream may be out of step: start afresh
                    conn = None
                continue
            kind = (None if (expected is not None and body == expected)
                    else check_response(body, params, method, expected))
            if kind is not None:
                errors[kind] += 1
                finish(conn)
                conn = None
                continue
            record(perf() - started)
            part.ok += 1
            conn.requests += 1
            if observer is not None and conn.ticket is None and (plan.keepalive or plan.observe_each):
                conn.ticket = observer.register(conn.address)
            if not plan.keepalive:
                finish(conn)
                conn = None
    finally:
        if conn is not None:
            finish(conn)


def run_part(plan: Plan, start_gate: Optional[Callable[[], None]] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> Part:
    """Run this process's clients as threads; return their merged measurements.

    ``progress(ok, failed)`` is called about once a second while they run.
    Misbehaving clients stop once every well-behaved one is done.
    """
    observer = ConnectionOwners(plan.master_pid, plan.labels or {}) if plan.master_pid is not None else None
    parts = [Part() for _ in plan.clients]
    failures: List[str] = []
    stop = threading.Event()

    def body(index: int, client_id: int, quota: Optional[int], deadline: float) -> None:
        try:
            if client_id in plan.misbehaving:
                _misbehaving_loop(plan, deadline, stop, parts[index])
            else:
                _client_loop(plan, client_id, quota, deadline, observer, parts[index])
        except BaseException:
            failures.append(traceback.format_exc())

    try:
        if start_gate is not None:
            start_gate()
        started = time.monotonic()
        deadline = started + plan.duration
        threads = [threading.Thread(target=body, args=(index, client_id, quota, deadline),
                                    name=f"fdcluster-load-client-{client_id}", daemon=True)
                   for index, (client_id, quota) in enumerate(plan.clients)]
        for thread in threads:
            thread.start()
        measured = [thread for thread, (client_id, _) in zip(threads, plan.clients)
                    if client_id not in plan.misbehaving]
        # Every client stops by the deadline plus one request's timeout (and a reconnect's).
        join_deadline = deadline + 3 * plan.timeout + OBSERVE_TIMEOUT
        _join_reporting(measured, join_deadline, parts, progress)
        stop.set()
        for thread in threads:
            thread.join(max(0.0, join_deadline - time.monotonic()))
        ended = time.monotonic()
        if any(thread.is_alive() for thread in threads):
            failures.append("a load client did not stop within its deadline")
    finally:
        stop.set()
        if observer is not None:
            observer.stop()
    if observer is not None and observer.error is not None:
        error = observer.error
        failures.append("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    if failures:
        raise LoadError("load client failed:\n" + failures[0])
    total = Part(started=started, ended=ended)
    for part in parts:
        total.merge(part)
    return total


def _join_reporting(threads: Sequence[threading.Thread], deadline: float, parts: Sequence[Part],
                    progress: Optional[Callable[[int, int], None]]) -> None:
    """Wait for ``threads`` until ``deadline``, calling ``progress`` once per ``PROGRESS_INTERVAL`` meanwhile."""
    next_report = time.monotonic() + PROGRESS_INTERVAL
    for thread in threads:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(max(0.0, min(next_report, deadline) - time.monotonic()))
            if progress is not None and time.monotonic() >= next_report:
                progress(sum(part.ok for part in parts), sum(part.failed for part in parts))
                next_report += PROGRESS_INTERVAL
