"""Load generator: many clients, checked answers, latency histograms, per-worker spread.

``run_load`` drives a target with concurrent clients -- threads in this
process, or spread over several processes started with the ``spawn``
method so the generator is not the bottleneck -- for a number of requests
or a duration.  Every response is checked (``check_response``: a ``ping``
must echo its params exactly), every failure is counted by kind, and every
successful request's latency goes into a ``Histogram`` that processes merge.

Given a ``Cluster``, it also tells which worker served which connection,
observed from outside by ``connection_owners`` while the connection is
still open, records the run in the cluster's events, and logs progress at
INFO on ``fdcluster.load`` once a second.  With ``fault=``, a seeded share
of the clients misbehave (``faults.misbehaviours``) while the rest are
measured.  The result, ``LoadResult``, and the judging of answers live in
``load_result``; the histogram in ``histogram``; one process's clients in
``load_clients``.  All are importable from here as before.

Framing comes from ``fdcluster_server.protocol``.  No pytest import.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
import traceback
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .cluster import Cluster
from .connection_owners import OBSERVE_TIMEOUT
from .faults._record import record, resolve
from .faults.misbehaviours import Misbehaviour, check_misbehaviour, choose_misbehaving
from .histogram import Histogram
from .load_clients import PROGRESS_INTERVAL, LoadError, Part, Payload, Plan, run_part
from .load_result import ERROR_KINDS, LoadResult, Misbehaving, check_response
from .sockets import Address
from .text import format_address

__all__ = [
    "ERROR_KINDS",
    "MAX_DURATION",
    "Histogram",
    "LoadError",
    "LoadResult",
    "Misbehaving",
    "check_response",
    "run_load",
]

#: Hard cap on a run, whether bounded by duration or by a request count.
MAX_DURATION = 300.0

#: How long worker processes may take to start (interpreter, imports) before the run is abandoned.
PROCESS_START_TIMEOUT = 60.0

logger = logging.getLogger("fdcluster.load")


class _Progress:
    """Logs a run's progress at INFO, at most once per ``PROGRESS_INTERVAL``: requests, errors, rate."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.started = self.last_time = time.monotonic()
        self.last_ok = 0

    def __call__(self, ok: int, failed: int) -> None:
        now = time.monotonic()
        # A little slack: reports from several processes arrive close to, not exactly at, the interval.
        if now - self.last_time < 0.9 * PROGRESS_INTERVAL:
            return
        rate = (ok - self.last_ok) / (now - self.last_time)
        logger.info("load on %s: %d requests ok, %d failed, %.0f req/s, %.1f s", self.where, ok, failed, rate,
                    now - self.started)
        self.last_time, self.last_ok = now, ok


def _process_main(plan: Plan, ready: Any, go: Any, results: Any) -> None:
    """Entry point of a spawned load process: report ready, wait for go, run, send back the part."""
    try:
        def gate() -> None:
            ready.put(("ready", os.getpid()))
            if not go.wait(PROCESS_START_TIMEOUT):
                raise LoadError("the parent never gave the start signal")

        def progress(ok: int, failed: int) -> None:
            results.put(("progress", (os.getpid(), ok, failed)))

        results.put(("done", run_part(plan, gate, progress)))
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
    target: Union[Cluster, Address],
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
    fault: Optional[Misbehaviour] = None,
    fraction: float = 0.1,
    seed: int = 0,
) -> LoadResult:
    """Drive ``target`` (a ``Cluster``, or any server's address) with ``clients`` concurrent clients.

    The run ends after ``requests`` requests in all, or after ``duration``
    seconds, whichever comes first (at least one is required; never more than
    ``MAX_DURATION``).  ``keepalive=False`` opens a connection per request.

    ``payload`` is the params of every request: None for the request's unique
    number, a callable ``payload(i) -> params`` of that number (module-level,
    so other processes can import it), or any other JSON value, sent as is
    and encoded once.  ``ping``/``echo`` answers must echo the params (as a
    JSON value: any spacing, any key order).

    ``processes > 1`` spreads the clients over that many processes (started
    with ``spawn``, never forked from this threaded process) whose histograms
    and counters are merged; a script doing this needs the usual
    ``if __name__ == "__main__":`` guard of ``multiprocessing``.

    Given a cluster (as ``target``, or ``cluster=`` with an address), each
    connection is placed on the worker that held it (in per-request mode
    only with ``observe=True``, which waits for a snapshot per connection
    and is slow), and the run is recorded in the cluster's events.

    ``fault`` makes ``round(clients * fraction)`` clients (at least one, and
    never all) misbehave instead of sending requests, each connection they
    open doing ``fault`` (see ``faults.misbehaviours``: ``"rst"``,
    ``"truncate"``, ``"slowloris"``, ``"slow_reader"`` or a callable given
    the connected socket); ``seed`` chooses which clients, replayably.  The
    requests go to the other clients only, and every figure of the result
    (errors, latency, per-worker counts) is theirs; what the misbehaving
    ones saw is in ``result.misbehaving``.
    """
    run_for = _validate(clients, requests, duration, processes, timeout)
    address, given = resolve(target)
    cluster = cluster if cluster is not None else given
    misbehaving: List[int] = []
    fault_name = None
    if fault is not None:
        fault_name = check_misbehaviour(fault, fraction)
        misbehaving = choose_misbehaving(clients, fraction, seed)
    measured = [c for c in range(clients) if c not in misbehaving]
    processes = min(processes, len(measured))
    labels: Optional[Dict[int, str]] = None
    master_pid: Optional[int] = None
    if cluster is not None and (keepalive or observe):
        labels = cluster.labels()
        master_pid = cluster.master
    quotas = dict(zip(measured, _quotas(requests, len(measured))))
    plans = []
    for p in range(processes):
        # Every process gets well-behaved clients: misbehaving ones stop when those are done.
        ids = measured[p::processes] + misbehaving[p::processes]
        plans.append(Plan(address, method, payload, keepalive, timeout, run_for,
                           [(i, quotas.get(i)) for i in ids], clients, master_pid, labels, observe,
                           fault, tuple(misbehaving)))
    where = cluster.name if cluster is not None else format_address(address)
    record(cluster, "load", address, log=logger, clients=clients, requests=requests, duration=duration,
           keepalive=keepalive, processes=processes, method=method, fault=fault_name,
           fraction=fraction if fault is not None else None, seed=seed if fault is not None else None,
           misbehaving=misbehaving or None)
    if processes == 1:
        part = run_part(plans[0], progress=_Progress(where))
        total, started, ended = part, part.started, part.ended
    else:
        parts = _run_processes(plans, _Progress(where))
        total = Part()
        for part in parts:
            total.merge(part)
        started, ended = min(p.started for p in parts), max(p.ended for p in parts)

    result = LoadResult(
        requests_ok=total.ok, errors=Counter({k: v for k, v in total.errors.items() if v}),
        duration=max(0.0, ended - started), histogram=total.histogram, clients=clients,
        processes=processes, keepalive=keepalive, method=method, connections=total.connections,
    )
    result.capped = duration is None and requests is not None and result.requests < requests
    if fault is not None:
        bad = total.misbehaving
        result.misbehaving = Misbehaving(fault_name or "", fraction, seed, misbehaving, bad.connections,
                                         bad.closed_by_server, Counter({k: v for k, v in bad.errors.items() if v}))
    if labels is not None:
        spread = {label: 0 for pid, label in labels.items() if pid != master_pid}
        requests_spread = dict(spread)
        for label, n in total.per_worker.items():
            spread[label] = spread.get(label, 0) + n
        for label, n in total.requests_per_worker.items():
            requests_spread[label] = requests_spread.get(label, 0) + n
        result.per_worker, result.requests_per_worker = spread, requests_spread
    record(cluster, "load done", address, log=logger, ok=result.requests_ok, failed=result.error_count,
           seconds=round(result.duration, 3), misbehaving_connections=total.misbehaving.connections if fault else None)
    return result


def _run_processes(plans: Sequence[Plan], progress: Callable[[int, int], None]) -> List[Part]:
    """Run each plan in its own spawned process, start them together, collect their parts.

    Each process reports its progress; ``progress`` gets the sums.
    """
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_process_main, args=(plan, ready, go, results), daemon=True,
                         name=f"fdcluster-load-{n}") for n, plan in enumerate(plans)]
    parts: List[Part] = []
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
        reported: Dict[int, Tuple[int, int]] = {}
        while len(parts) < len(procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadError(f"{len(procs) - len(parts)} load processes sent no result in time")
            try:
                kind, value = results.get(timeout=min(PROGRESS_INTERVAL, remaining))
            except queue.Empty:
                continue
            if kind == "error":
                raise LoadError(f"a load process failed:\n{value}")
            if kind == "progress":
                pid, ok, failed = value
                reported[pid] = (ok, failed)
                progress(sum(r[0] for r in reported.values()), sum(r[1] for r in reported.values()))
                continue
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
