"""Load generator: many clients, checked answers, latency histograms, per-worker spread.

``run_load`` drives a target with concurrent clients -- threads in this
process, or spread over several processes started with the ``spawn``
method so the generator is not the bottleneck -- for a number of requests
or a duration.  Every response is checked (a ``ping`` must echo its params
exactly), every failure is counted by kind, and every successful request's
latency goes into a log-bucketed ``Histogram`` that processes merge.

Given a ``Cluster``, it also tells which worker served which connection,
observed from outside: each connection's local address is looked up in a
snapshot of the target taken while the connection is still open.

Framing comes from ``fdcluster_server.protocol``.  No pytest import.
"""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import queue
import socket
import threading
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from fdcluster_server import protocol

from . import observe
from .cluster import Cluster

__all__ = [
    "ERROR_KINDS",
    "MAX_DURATION",
    "Histogram",
    "LoadError",
    "LoadResult",
    "check_response",
    "run_load",
]

Address = Tuple[str, int]
Payload = Union[None, Callable[[int], Any], Any]

#: Hard cap on a run, whether bounded by duration or by a request count.
MAX_DURATION = 300.0

#: Why a request failed.  "other" is an OS error none of the rest describes.
ERROR_KINDS = ("refused", "reset", "timeout", "eof", "error-frame", "mismatch", "other")

#: The built-in methods that echo their params, and the ``out`` they answer with.
ECHOING_METHODS = {"ping": protocol.OUT_PONG, "echo": "echo"}

#: How long a closing connection waits for the observer to place it before it counts as unowned.
OBSERVE_TIMEOUT = 5.0

#: How long worker processes may take to start (interpreter, imports) before the run is abandoned.
PROCESS_START_TIMEOUT = 60.0

_RECV_SIZE = 65536
_MAX_RESPONSE = 16 * protocol.DEFAULT_MAX_FRAME
_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


class LoadError(RuntimeError):
    """The load generator itself failed (a client thread or process crashed); the message carries the traceback."""


# -- the histogram -------------------------------------------------------------------------


class Histogram:
    """Latencies in seconds, HDR-style: power-of-two ranges split into linear sub-buckets.

    ``SUB_BUCKETS`` sub-buckets per octave give a relative bucket width under
    1/128 (values are reported at the bucket's middle, within 0.4 %), from
    about 1 ns to about an hour, in a fixed 5376 counters whatever the number
    of records.  ``min``, ``max`` and the sum are kept exactly.
    """

    SUB_BUCKETS = 128
    #: ``math.frexp`` exponents covered: 2**-30 s (~1 ns) up to 2**12 s (~68 min).
    MIN_EXPONENT = -29
    MAX_EXPONENT = 12
    BUCKETS = (MAX_EXPONENT - MIN_EXPONENT + 1) * SUB_BUCKETS

    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.counts = array("Q", bytes(8 * self.BUCKETS))
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def __getstate__(self) -> Tuple[bytes, int, float, float, float]:
        return (self.counts.tobytes(), self.count, self.total, self.min, self.max)

    def __setstate__(self, state: Tuple[bytes, int, float, float, float]) -> None:
        raw, self.count, self.total, self.min, self.max = state
        self.counts = array("Q")
        self.counts.frombytes(raw)

    def __repr__(self) -> str:
        if not self.count:
            return "<Histogram empty>"
        return (f"<Histogram n={self.count} p50={_format_seconds(self.percentile(50))} "
                f"max={_format_seconds(self.max)}>")

    def __len__(self) -> int:
        return self.count

    @classmethod
    def bucket_of(cls, seconds: float) -> int:
        """The index of the bucket ``seconds`` falls in (clamped to the covered range)."""
        if not seconds > 0:
            return 0
        mantissa, exponent = math.frexp(seconds)
        if exponent < cls.MIN_EXPONENT:
            return 0
        if exponent > cls.MAX_EXPONENT:
            return cls.BUCKETS - 1
        return (exponent - cls.MIN_EXPONENT) * cls.SUB_BUCKETS + int((mantissa - 0.5) * (2 * cls.SUB_BUCKETS))

    @classmethod
    def bucket_value(cls, index: int) -> float:
        """The value a bucket stands for: the middle of its range."""
        octave, sub = divmod(index, cls.SUB_BUCKETS)
        return math.ldexp(0.5 + (sub + 0.5) / (2 * cls.SUB_BUCKETS), octave + cls.MIN_EXPONENT)

    def record(self, seconds: float) -> None:
        """Add one measurement."""
        self.count += 1
        self.total += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds
        self.counts[self.bucket_of(seconds)] += 1

    def merge(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s measurements to this one; returns self."""
        if not other.count:
            return self
        counts = self.counts
        for index, n in enumerate(other.counts):
            if n:
                counts[index] += n
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    @property
    def mean(self) -> float:
        """The exact mean (nan when empty)."""
        return self.total / self.count if self.count else math.nan

    def percentile(self, q: float) -> float:
        """The value below which ``q`` percent of measurements fall (nan when empty).

        0 gives the exact minimum and 100 the exact maximum; in between the
        bucket's middle, kept within [min, max].  Monotone in ``q``.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be within 0..100, got {q!r}")
        if not self.count:
            return math.nan
        if q == 0:
            return self.min
        if q == 100:
            return self.max
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            if n:
                seen += n
                if seen >= rank:
                    return min(self.max, max(self.min, self.bucket_value(index)))
        return self.max  # unreachable while counts add up to count

    def percentiles(self, qs: Iterable[float]) -> Dict[float, float]:
        """Several percentiles at once."""
        return {q: self.percentile(q) for q in qs}


def _format_seconds(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1.0:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


# -- checking a response ---------------------------------------------------------------------


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (1 == 1.0), but true is not 1 and a list is not a tuple."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return a == b


def check_response(body: bytes, params: Any, method: str = "ping", expected_body: Optional[bytes] = None) -> Optional[str]:
    """None if ``body`` correctly answers ``method(params)``, else the error kind.

    ``"error-frame"`` for ``{"out": "error"}``; ``"mismatch"`` for anything
    else that is wrong: not JSON, not a response object, or -- for the
    echoing methods ``ping``/``echo`` -- the wrong ``out`` or a ``result``
    that is not ``params``.  Other methods only need a non-error answer.
    ``expected_body`` (the exact bytes the reference server would send) is a
    fast path; a body that differs is still decoded and compared as JSON.
    """
    if expected_body is not None and body == expected_body:
        return None
    try:
        message = protocol.decode_body(body)
    except protocol.ProtocolError:
        return "mismatch"
    if not isinstance(message, dict) or not isinstance(message.get("out"), str):
        return "mismatch"
    out = message["out"]
    if out == protocol.OUT_ERROR:
        return "error-frame"
    expected_out = ECHOING_METHODS.get(method)
    if expected_out is None:
        return None
    if out != expected_out or "result" not in message:
        return "mismatch"
    # Compare with what params become through JSON (tuples turn into lists).
    normalized = protocol.decode_body(protocol.encode(params)[protocol.HEADER_SIZE:])
    return None if _same_json(message["result"], normalized) else "mismatch"


# -- the result ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a load run did: counts, errors by kind, latency histogram, per-worker spread."""

    requests_ok: int = 0
    #: Failed requests by kind, one of ``ERROR_KINDS``.
    errors: Counter = field(default_factory=Counter)
    #: Wall-clock seconds from the first client's start to the last one's end.
    duration: float = 0.0
    #: Latency of every successful request (in per-request mode, connect included).
    histogram: Histogram = field(default_factory=Histogram)
    clients: int = 0
    processes: int = 1
    keepalive: bool = True
    method: str = "ping"
    #: Connections opened (one per client in keep-alive mode unless errors forced reconnects).
    connections: int = 0
    #: Connections each worker served, by label; None when not observed (no cluster, or
    #: per-request mode without ``observe``).  ``master``/``unowned`` appear when counted.
    per_worker: Optional[Dict[str, int]] = None
    #: Successful requests each worker served (same labels and conditions).
    requests_per_worker: Optional[Dict[str, int]] = None
    #: The run stopped at ``MAX_DURATION`` before its request count was reached.
    capped: bool = False

    @property
    def requests(self) -> int:
        """Requests attempted: successes plus failures."""
        return self.requests_ok + sum(self.errors.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return self.requests_ok / self.duration if self.duration > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile in seconds (see ``Histogram.percentile``)."""
        return self.histogram.percentile(q)

    @property
    def p50(self) -> float:
        return self.histogram.percentile(50)

    @property
    def p90(self) -> float:
        return self.histogram.percentile(90)

    @property
    def p99(self) -> float:
        return self.histogram.percentile(99)

    @property
    def p999(self) -> float:
        return self.histogram.percentile(99.9)

    @property
    def max(self) -> float:
        return self.histogram.max if self.histogram.count else math.nan

    def __str__(self) -> str:
        mode = "keep-alive" if self.keepalive else "connection per request"
        procs = "1 process" if self.processes == 1 else f"{self.processes} processes"
        lines = [
            f"load: {self.clients} clients in {procs}, {mode}, {self.method}, {self.duration:.2f} s"
            + (" (capped)" if self.capped else ""),
            f"  requests  {self.requests_ok} ok, {self.error_count} failed, {self.throughput:.0f} req/s, "
            f"{self.connections} connections",
        ]
        if self.errors:
            lines.append("  errors    " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.errors.items())))
        lines.append("  latency   " + "  ".join(
            f"{name} {_format_seconds(value)}"
            for name, value in (("p50", self.p50), ("p90", self.p90), ("p99", self.p99),
                                ("p99.9", self.p999), ("max", self.max))))
        if self.per_worker is not None:
            requests = self.requests_per_worker or {}
            width = max(len("worker"), *(len(label) for label in self.per_worker))
            lines.append(f"  {'worker':<{width}}  connections  requests")
            for label, n in self.per_worker.items():
                lines.append(f"  {label:<{width}}  {n:>11}  {requests.get(label, 0):>8}")
        return "\n".join(lines)


# -- observing which worker holds a connection ------------------------------------------------


class _Observer:
    """Places connections on workers: a thread takes a snapshot after each batch of registrations.

    A connection registers while open and, before closing, waits for the
    verdict of a snapshot taken after it registered.
    """

    def __init__(self, master_pid: int, labels: Dict[int, str]) -> None:
        self.master_pid = master_pid
        self.labels = dict(labels)
        self._cond = threading.Condition()
        self._pending: List[Tuple[int, Address]] = []
        self._verdicts: Dict[int, str] = {}
        self._next = 0
        self._stopped = False
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="fdcluster-load-observer", daemon=True)
        self._thread.start()

    def register(self, address: Address) -> int:
        with self._cond:
            self._next += 1
            self._pending.append((self._next, address))
            self._cond.notify_all()
            return self._next

    def verdict(self, ticket: int, timeout: float = OBSERVE_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while ticket not in self._verdicts:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped:
                    return observe.UNOWNED
                self._cond.wait(remaining)
            return self._verdicts.pop(ticket)

    def _label(self, view: Optional[observe.ProcessView]) -> str:
        if view is None:
            return observe.UNOWNED
        # A worker respawned during the run is not among the labels taken at the start.
        return self.labels.get(view.pid) or f"worker pid {view.pid}"

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    batch, self._pending = self._pending, []
                snap = observe.snapshot(self.master_pid, self.labels)
                verdicts = {ticket: self._label(snap.owner_of(address)) for ticket, address in batch}
                with self._cond:
                    self._verdicts.update(verdicts)
                    self._cond.notify_all()
        except BaseException as exc:  # re-raised by run_load in the caller's thread
            self.error = exc
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(OBSERVE_TIMEOUT)


# -- one process's share of the clients -------------------------------------------------------


@dataclass
class _Plan:
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


@dataclass
class _Part:
    """What one process (or one client) measured."""

    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    histogram: Histogram = field(default_factory=Histogram)
    connections: int = 0
    per_worker: Counter = field(default_factory=Counter)
    requests_per_worker: Counter = field(default_factory=Counter)
    started: float = 0.0
    ended: float = 0.0

    def merge(self, other: "_Part") -> None:
        self.ok += other.ok
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
            bodies = decoder.feed(self.view[:n])
            if decoder.failure is not None:
                raise protocol.ProtocolError(str(decoder.failure))
            if bodies:
                return bodies[0]  # one request in flight: one response per exchange

    def close(self) -> None:
        self.sock.close()


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, _Eof):
        return "eof"
    if isinstance(exc, socket.timeout):
        return "timeout"
    if isinstance(exc, protocol.ProtocolError):
        return "mismatch"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in _RESET_ERRNOS:
        return "reset"
    if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
        return "timeout"
    return "other"


def _client_loop(plan: _Plan, client_id: int, quota: Optional[int], deadline: float,
                 observer: Optional[_Observer], part: _Part) -> None:
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
    buffer = bytearray(_RECV_SIZE)
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
            kind = None if (expected is not None and body == expected) else check_response(body, params, method, expected)
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


def _run_part(plan: _Plan, start_gate: Optional[Callable[[], None]] = None) -> _Part:
    """Run this process's clients as threads; return their merged measurements."""
    observer = _Observer(plan.master_pid, plan.labels or {}) if plan.master_pid is not None else None
    parts = [_Part() for _ in plan.clients]
    failures: List[str] = []

    def body(index: int, client_id: int, quota: Optional[int], deadline: float) -> None:
        try:
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
        for thread in threads:
            # Every client stops by the deadline plus one request's timeout (and a reconnect's).
            thread.join(max(0.0, deadline - time.monotonic()) + 3 * plan.timeout + OBSERVE_TIMEOUT)
        ended = time.monotonic()
        if any(thread.is_alive() for thread in threads):
            failures.append("a load client did not stop within its deadline")
    finally:
        if observer is not None:
            observer.stop()
    if observer is not None and observer.error is not None:
        error = observer.error
        failures.append("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    if failures:
        raise LoadError("load client failed:\n" + failures[0])
    total = _Part(started=started, ended=ended)
    for part in parts:
        total.merge(part)
    return total


def _process_main(plan: _Plan, ready: Any, go: Any, results: Any) -> None:
    """Entry point of a spawned load process: report ready, wait for go, run, send back the part."""
    try:
        def gate() -> None:
            ready.put(("ready", os.getpid()))
            if not go.wait(PROCESS_START_TIMEOUT):
                raise LoadError("the parent never gave the start signal")

        results.put(("done", _run_part(plan, gate)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


# -- the entry point -------------------------------------------------------------------------------


def _quotas(requests: Optional[int], clients: int) -> List[Optional[int]]:
    if requests is None:
        return [None] * clients
    low, extra = divmod(requests, clients)
    return [low + (1 if k < extra else 0) for k in range(clients)]


def _validate(clients: int, requests: Optional[int], duration: Optional[float], processes: int,
              timeout: float) -> float:
    if requests is None and duration is None:
        raise ValueError("run_load needs requests or duration (or both: the first reached ends the run)")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an int >= 1, got {clients!r}")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    if requests is not None and (isinstance(requests, bool) or not isinstance(requests, int) or requests < 1):
        raise ValueError(f"requests must be an int >= 1, got {requests!r}")
    if duration is not None and not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be within (0, {MAX_DURATION:g}] seconds, got {duration!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    return MAX_DURATION if duration is None else float(duration)


def run_load(
    address: Address,
    *,
    clients: int = 4,
    requests: Optional[int] = None,
    duration: Optional[float] = None,
    keepalive: bool = True,
    payload: Payload = None,
    processes: int = 1,
    timeout: float = 5.0,
    cluster: Optional[Cluster] = None,
    method: str = "ping",
    observe: bool = False,
) -> LoadResult:
    """Drive ``address`` with ``clients`` concurrent clients and return what they saw.

    The run ends after ``requests`` requests in all, or after ``duration``
    seconds, whichever comes first (at least one is required; never more than
    ``MAX_DURATION``).  ``keepalive=False`` opens a connection per request.

    ``payload`` is the params of every request: None for the request's unique
    number, a callable ``payload(i) -> params`` of that number (module-level,
    so other processes can import it), or any other JSON value, sent as is
    and encoded once.  ``ping``/``echo`` answers must echo the params.

    ``processes > 1`` spreads the clients over that many processes (started
    with ``spawn``, never forked from this threaded process) whose histograms
    and counters are merged; a script doing this needs the usual
    ``if __name__ == "__main__":`` guard of ``multiprocessing``.  With ``cluster``, each connection is placed on
    the worker that held it; in per-request mode only with ``observe=True``,
    which waits for a snapshot per connection and is slow.
    """
    run_for = _validate(clients, requests, duration, processes, timeout)
    address = (address[0], int(address[1]))
    processes = min(processes, clients)
    labels: Optional[Dict[int, str]] = None
    master_pid: Optional[int] = None
    if cluster is not None and (keepalive or observe):
        labels = cluster.labels()
        master_pid = cluster.master
    quotas = _quotas(requests, clients)
    plans = []
    for p in range(processes):
        ids = list(range(p, clients, processes))
        plans.append(_Plan(address, method, payload, keepalive, timeout, run_for,
                           [(i, quotas[i]) for i in ids], clients, master_pid, labels, observe))
    if processes == 1:
        part = _run_part(plans[0])
        total, started, ended = part, part.started, part.ended
    else:
        parts = _run_processes(plans)
        total = _Part()
        for part in parts:
            total.merge(part)
        started, ended = min(p.started for p in parts), max(p.ended for p in parts)

    result = LoadResult(
        requests_ok=total.ok, errors=Counter({k: v for k, v in total.errors.items() if v}),
        duration=max(0.0, ended - started), histogram=total.histogram, clients=clients,
        processes=processes, keepalive=keepalive, method=method, connections=total.connections,
    )
    result.capped = duration is None and requests is not None and result.requests < requests
    if labels is not None:
        spread = {label: 0 for pid, label in labels.items() if pid != master_pid}
        requests_spread = dict(spread)
        for label, n in total.per_worker.items():
            spread[label] = spread.get(label, 0) + n
        for label, n in total.requests_per_worker.items():
            requests_spread[label] = requests_spread.get(label, 0) + n
        result.per_worker, result.requests_per_worker = spread, requests_spread
    return result


def _run_processes(plans: Sequence[_Plan]) -> List[_Part]:
    """Run each plan in its own spawned process, start them together, collect their parts."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_process_main, args=(plan, ready, go, results), daemon=True,
                         name=f"fdcluster-load-{n}") for n, plan in enumerate(plans)]
    parts: List[_Part] = []
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + PROCESS_START_TIMEOUT
        waiting = len(procs)
        while waiting:
            try:
                ready.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
                waiting -= 1
            except queue.Empty:
                _check_started(procs, results, deadline)
        go.set()
        plan = plans[0]
        deadline = time.monotonic() + plan.duration + 3 * plan.timeout + OBSERVE_TIMEOUT + PROCESS_START_TIMEOUT
        while len(parts) < len(procs):
            try:
                kind, value = results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise LoadError(f"{len(procs) - len(parts)} load processes sent no result in time") from None
            if kind == "error":
                raise LoadError(f"a load process failed:\n{value}")
            parts.append(value)
        return parts
    finally:
        go.set()  # a process still waiting to start must not wait out its timeout
        for proc in procs:
            if proc.pid is None:
                continue  # never started
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for q in (ready, results):
            q.close()
            q.join_thread()


def _check_started(procs: Sequence[Any], results: Any, deadline: float) -> None:
    """While waiting for processes to start: fail fast on one that died, or on the start-up timeout."""
    for proc in procs:
        if proc.exitcode is not None:
            try:
                _, value = results.get_nowait()
            except queue.Empty:
                value = f"exit code {proc.exitcode}"
            raise LoadError(f"load process {proc.name} ended before starting: {value}")
    if time.monotonic() >= deadline:
        raise LoadError(f"load processes did not start within {PROCESS_START_TIMEOUT:g} s")
