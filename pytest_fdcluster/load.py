"""Load generator: many clients, checked answers, latency histograms, per-worker spread.

``run_load`` drives a target with concurrent clients -- threads in this
process, or spread over several processes started with the ``spawn``
method so the generator is not the bottleneck -- for a number of requests
or a duration.  Every response is checked (``check_response``: a ``ping``
must echo its params exactly), every failure is counted by kind, and every
successful request's latency goes into a ``Histogram`` that processes merge.

Given a ``Cluster``, it also tells which worker served which connection,
observed from outside by ``connection_owners`` while the connection is
still open.  The result, ``LoadResult``, and the judging of answers live in
``load_result``; the histogram in ``histogram``.  All are importable from
here as before.

Framing comes from ``fdcluster_server.protocol``.  No pytest import.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from fdcluster_server import protocol

from .cluster import Cluster
from .connection_owners import OBSERVE_TIMEOUT, ConnectionOwners
from .histogram import Histogram
from .load_result import ECHOING_METHODS, ERROR_KINDS, LoadResult, check_response
from .sockets import RECV_SIZE, Address, errno_kind

__all__ = [
    "ERROR_KINDS",
    "MAX_DURATION",
    "Histogram",
    "LoadError",
    "LoadResult",
    "check_response",
    "run_load",
]

Payload = Union[None, Callable[[int], Any], Any]

#: Hard cap on a run, whether bounded by duration or by a request count.
MAX_DURATION = 300.0

#: How long worker processes may take to start (interpreter, imports) before the run is abandoned.
PROCESS_START_TIMEOUT = 60.0

_MAX_RESPONSE = 16 * protocol.DEFAULT_MAX_FRAME


class LoadError(RuntimeError):
    """The load generator itself failed (a client thread or process crashed); the message carries the traceback."""


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

    def merge(self, other: _Part) -> None:
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
    if isinstance(exc, socket.timeout):
        return "timed_out"
    if isinstance(exc, protocol.ProtocolError):
        return "mismatched"
    if isinstance(exc, OSError):
        return errno_kind(exc.errno) or "other"
    return "other"


def _client_loop(plan: _Plan, client_id: int, quota: Optional[int], deadline: float,
                 observer: Optional[ConnectionOwners], part: _Part) -> None:
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


def _run_part(plan: _Plan, start_gate: Optional[Callable[[], None]] = None) -> _Part:
    """Run this process's clients as threads; return their merged measurements."""
    observer = ConnectionOwners(plan.master_pid, plan.labels or {}) if plan.master_pid is not None else None
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
