"""What a load run returns, and how each answer is judged: error kinds, response checking, ``LoadResult``.

Every failed request counts under one of ``ERROR_KINDS``; a storm's
``StormResult`` names the same outcomes the same way (``refused``,
``reset``, ``timed_out``, ``eof``, ``mismatched``).  Pure: no sockets, no
pytest.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fdcluster_server import protocol

from .histogram import Histogram, format_seconds

__all__ = ["ECHOING_METHODS", "ERROR_KINDS", "LoadResult", "Misbehaving", "check_response"]

#: Why a request failed.  "other" is an OS error none of the rest describes.
ERROR_KINDS = ("refused", "reset", "timed_out", "eof", "error-frame", "mismatched", "other")

#: The built-in methods that echo their params, and the ``out`` they answer with.
ECHOING_METHODS = {"ping": protocol.OUT_PONG, "echo": "echo"}


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


def check_response(body: bytes, params: Any, method: str = "ping",
                   expected_body: Optional[bytes] = None) -> Optional[str]:
    """None if ``body`` correctly answers ``method(params)``, else the error kind.

    ``"error-frame"`` for ``{"out": "error"}``; ``"mismatched"`` for anything
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
        return "mismatched"
    if not isinstance(message, dict) or not isinstance(message.get("out"), str):
        return "mismatched"
    out = message["out"]
    if out == protocol.OUT_ERROR:
        return "error-frame"
    expected_out = ECHOING_METHODS.get(method)
    if expected_out is None:
        return None
    if out != expected_out or "result" not in message:
        return "mismatched"
    # Compare with what params become through JSON (tuples turn into lists).
    normalized = protocol.decode_body(protocol.encode(params)[protocol.HEADER_SIZE:])
    return None if _same_json(message["result"], normalized) else "mismatched"


# -- the result ------------------------------------------------------------------------------------


@dataclass
class Misbehaving:
    """What the misbehaving share of a load run did (``run_load(fault=...)``); none of it is in the load's figures."""

    #: The misbehaviour's name (``"slowloris"``...) or the callable's qualified name.
    fault: str = ""
    fraction: float = 0.0
    seed: int = 0
    #: The numbers of the clients that misbehaved (``choose_misbehaving``).
    clients: List[int] = field(default_factory=list)
    #: Misbehaving connections opened.
    connections: int = 0
    #: Held connections (slowloris, slow_reader) the server closed before the run ended.
    closed_by_server: int = 0
    #: What went wrong for the misbehaving connections, by kind: expected, and never the load's errors.
    errors: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        text = (f"  misbehaving  {len(self.clients)} clients {self.clients} ({self.fault}, fraction {self.fraction:g}, "
                f"seed {self.seed}): {self.connections} connections, {self.closed_by_server} closed by the server")
        if self.errors:
            text += ", " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.errors.items()))
        return text + "; not counted above"


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
    #: The misbehaving share, with ``fault``; every other figure is the well-behaved clients' only.
    misbehaving: Optional[Misbehaving] = None

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
            f"{name} {format_seconds(value)}"
            for name, value in (("p50", self.p50), ("p90", self.p90), ("p99", self.p99),
                                ("p99.9", self.p999), ("max", self.max))))
        if self.per_worker is not None:
            requests = self.requests_per_worker or {}
            width = max(len("worker"), *(len(label) for label in self.per_worker))
            lines.append(f"  {'worker':<{width}}  connections  requests")
            for label, n in self.per_worker.items():
                lines.append(f"  {label:<{width}}  {n:>11}  {requests.get(label, 0):>8}")
        if self.misbehaving is not None:
            lines.append(str(self.misbehaving))
        return "\n".join(lines)

