"""Invariants over what ``observe`` saw: fair distribution and fd hygiene.

Each ``assert_*`` function raises a ``CheckFailed`` (an ``AssertionError``)
whose message starts with the invariant's name, one of the ``*_FAILED``
constants, then a one-line summary with the figures, then whatever a reader
needs to see why: the per-worker distribution table, the leaked descriptors
with their addresses.  Tests build expected lines from the same constants.

The fd checks never pass blind: a judged process whose descriptors could
not be read raises ``observe.ObservationError`` (or ``ObservationSkipped``).
Every ``assert_*`` hides its own frame from pytest's traceback.

The chi-square p-value is computed here (regularized upper incomplete gamma,
Numerical Recipes style) so the plugin needs no scipy.  No pytest import.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from .observe import FdInfo, Snapshot, SnapshotDiff, describe_fds
from .text import label_order, plural

__all__ = [
    "CLOSE_WAIT_FAILED",
    "FAIRNESS_FAILED",
    "FD_GROWTH_FAILED",
    "FD_LEAK_FAILED",
    "MASTER_HOLDS_CLIENTS",
    "PSEUDO_BUCKETS",
    "ROUND_ROBIN_FAILED",
    "CheckFailed",
    "FairnessError",
    "FairnessStats",
    "FdHygieneError",
    "FdLeakError",
    "assert_fair",
    "assert_master_holds_no_clients",
    "assert_no_close_wait",
    "assert_no_fd_growth",
    "assert_no_fd_leak",
    "assert_round_robin",
    "chi_square_p_value",
    "fairness",
    "fd_growth_slope",
    "format_distribution",
]

ROUND_ROBIN_FAILED = "round-robin"
FAIRNESS_FAILED = "fairness"
FD_LEAK_FAILED = "fd leak"
FD_GROWTH_FAILED = "fd growth"
CLOSE_WAIT_FAILED = "close-wait"
MASTER_HOLDS_CLIENTS = "master holds clients"

#: Why a distribution with a bucket that is not a worker is refused: ``{counted}`` is "N connections were
#: counted for master and M for unowned".
PSEUDO_BUCKETS = (FAIRNESS_FAILED + ": {counted}; only workers may be buckets \u2014 a connection held by the master "
                  "or by nobody is an 'exactly one holder' failure, not a fairness figure")
#: What a worker's label looks like: ``worker N`` (its index), or ``worker pid N`` for one the cluster could not index.
WORKER_LABEL = re.compile(r"worker (?:pid )?\d+")

FEWEST_MARK = "<- fewest"
BAR_WIDTH = 40
BAR_CHAR = "\u2588"
#: How many descriptors or sockets a message lists before "... and N more".
LIST_LIMIT = 10


class CheckFailed(AssertionError):
    """An invariant does not hold; ``invariant`` is its ``*_FAILED`` name."""

    def __init__(self, invariant: str, message: str) -> None:
        super().__init__(message)
        self.invariant = invariant


class FairnessError(CheckFailed):
    """Work was not spread across workers as required; ``stats`` has the figures."""

    def __init__(self, invariant: str, message: str, stats: FairnessStats) -> None:
        super().__init__(invariant, message)
        self.stats = stats


class FdLeakError(CheckFailed):
    """Descriptors accumulate in a process across cycles."""


class FdHygieneError(CheckFailed):
    """A process holds a descriptor it should have closed."""


def _figure(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


# -- statistics -------------------------------------------------------------

_EPS = 1e-15
_FPMIN = 1e-300
_ITMAX = 1000


def _gamma_p_series(a: float, x: float) -> float:
    """P(a, x) by its series; converges fast for x < a + 1."""
    term = total = 1.0 / a
    ap = a
    for _ in range(_ITMAX):
        ap += 1.0
        term *= x / ap
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_q_fraction(a: float, x: float) -> float:
    """Q(a, x) by its continued fraction (modified Lentz); converges fast for x >= a + 1."""
    b = x + 1.0 - a
    c = 1.0 / _FPMIN
    d = 1.0 / b
    h = d
    for i in range(1, _ITMAX):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = d if abs(d) >= _FPMIN else _FPMIN
        c = b + an / c
        c = c if abs(c) >= _FPMIN else _FPMIN
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma function Q(a, x) = 1 - P(a, x)."""
    if x <= 0.0:
        return 1.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gamma_p_series(a, x))
    return _gamma_q_fraction(a, x)


def chi_square_p_value(chi_square: float, dof: int) -> float:
    """Probability of a chi-square statistic at least this large with ``dof`` degrees of freedom."""
    if dof <= 0:
        return 1.0  # a single bucket always matches its expectation
    return _gamma_q(dof / 2.0, chi_square / 2.0)


@dataclass(frozen=True)
class FairnessStats:
    """How evenly ``total`` units of work fell on ``len(counts)`` workers."""

    counts: Dict[str, int]
    total: int
    #: Most minus fewest.
    spread: int
    #: Jain's index, (sum x)^2 / (n * sum x^2): 1.0 perfectly even, 1/n all on one.
    jain: float
    #: Most over fewest; inf when someone got none and someone got some.
    max_min_ratio: float
    #: Goodness of fit against the uniform distribution.
    chi_square: float
    #: Probability of a chi-square this large by chance if the scheduler were fair.
    p_value: float

    def __str__(self) -> str:
        return (
            f"{plural(len(self.counts), 'worker')}, {self.total} total, spread {self.spread}, "
            f"Jain {self.jain:.3f}, max/min {_figure(self.max_min_ratio)}, "
            f"chi-square {self.chi_square:.2f} ({len(self.counts) - 1} dof, p={self.p_value:.3g})"
        )


def fairness(counts: Mapping[str, int]) -> FairnessStats:
    """Statistics of a distribution of work, label -> count.

    No work at all counts as perfectly fair (Jain 1.0, ratio 1.0, p 1.0).
    Raises ValueError for no labels or a negative count, and ``CheckFailed``
    (``PSEUDO_BUCKETS``) for a label that is not a worker's (``WORKER_LABEL``):
    ``master`` or ``unowned`` counted as a worker would hide the very failure
    they stand for and skew every figure.
    """
    __tracebackhide__ = True
    if not counts:
        raise ValueError("fairness of no workers is undefined")
    _refuse_pseudo_buckets(counts)
    values = list(counts.values())
    if min(values) < 0:
        raise ValueError(f"negative count in {dict(counts)}")
    n, total = len(values), sum(values)
    fewest, most = min(values), max(values)
    if total == 0:
        return FairnessStats(dict(counts), 0, 0, 1.0, 1.0, 0.0, 1.0)
    jain = total * total / (n * sum(v * v for v in values))
    ratio = most / fewest if fewest else math.inf
    expected = total / n
    chi_square = sum((v - expected) ** 2 for v in values) / expected
    return FairnessStats(
        dict(counts), total, most - fewest, jain, ratio, chi_square, chi_square_p_value(chi_square, n - 1)
    )


def _refuse_pseudo_buckets(counts: Mapping[str, int]) -> None:
    __tracebackhide__ = True
    strays = [(label, n) for label, n in counts.items() if not WORKER_LABEL.fullmatch(str(label))]
    if not strays:
        return
    (label, n), rest = strays[0], strays[1:]
    counted = f"{plural(n, 'connection')} {'was' if n == 1 else 'were'} counted for {label}"
    counted += "".join(f" and {m} for {other}" for other, m in rest)
    raise CheckFailed(FAIRNESS_FAILED, PSEUDO_BUCKETS.format(counted=counted))


def format_distribution(counts: Mapping[str, int]) -> str:
    """One line per worker: label, a bar scaled so the most loaded is BAR_WIDTH long, count.

    The workers that got fewest are marked, unless all got the same.
    """
    if not counts:
        return "(no workers)"
    most, fewest = max(counts.values()), min(counts.values())
    label_width = max(len(label) for label in counts)
    count_width = max(len(str(v)) for v in counts.values())
    bars = {
        label: BAR_CHAR * (max(1, round(v * BAR_WIDTH / most)) if v > 0 else 0) for label, v in counts.items()
    }
    bar_width = max(len(bar) for bar in bars.values())
    lines = []
    for label in sorted(counts, key=label_order):
        value = counts[label]
        columns = [f"{label:<{label_width}}", f"{bars[label]:<{bar_width}}", f"{value:>{count_width}}"]
        line = "  ".join(c for c in columns if c)  # no bar column when nobody got any work
        if value == fewest and fewest < most:
            line += f"   {FEWEST_MARK}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def _explained(summary: str, stats: FairnessStats) -> str:
    return f"{summary}\n{format_distribution(stats.counts)}\n{stats}"


def assert_round_robin(counts: Mapping[str, int], tolerance: int = 1) -> FairnessStats:
    """Every worker got within ``tolerance`` of every other; returns the statistics.

    A tolerance of 1 allows for a total that does not divide evenly.
    """
    __tracebackhide__ = True
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, not {tolerance}")
    stats = fairness(counts)
    if stats.spread <= tolerance:
        return stats
    fewest = min(counts, key=lambda label: counts[label])
    most = max(counts, key=lambda label: counts[label])
    low, high = divmod(stats.total, len(counts))
    expected = f"{low}" if high == 0 else f"{low} or {low + 1}"
    summary = (
        f"{ROUND_ROBIN_FAILED}: spread {stats.spread} exceeds {tolerance} "
        f"({fewest} got {counts[fewest]}, {most} got {counts[most]}; expected {expected} each)"
    )
    raise FairnessError(ROUND_ROBIN_FAILED, _explained(summary, stats), stats)


def assert_fair(
    counts: Mapping[str, int],
    *,
    min_jain: Optional[float] = None,
    max_ratio: Optional[float] = None,
    min_p_value: Optional[float] = None,
) -> FairnessStats:
    """Every given threshold holds; returns the statistics.

    ``min_p_value`` rejects distributions unlikely under a fair scheduler
    (chi-square against uniform); ``max_ratio`` bounds most over fewest.
    """
    __tracebackhide__ = True
    if min_jain is None and max_ratio is None and min_p_value is None:
        raise ValueError("assert_fair needs at least one of min_jain, max_ratio, min_p_value")
    stats = fairness(counts)
    failed = []
    if min_jain is not None and stats.jain < min_jain:
        failed.append(f"Jain index {stats.jain:.3f} below {min_jain}")
    if max_ratio is not None and stats.max_min_ratio > max_ratio:
        failed.append(f"max/min ratio {_figure(stats.max_min_ratio)} above {max_ratio}")
    if min_p_value is not None and stats.p_value < min_p_value:
        failed.append(
            f"chi-square p-value {stats.p_value:.3g} below {min_p_value} "
            f"(chi-square {stats.chi_square:.2f}, {len(counts) - 1} dof)"
        )
    if failed:
        raise FairnessError(FAIRNESS_FAILED, _explained(f"{FAIRNESS_FAILED}: " + "; ".join(failed), stats), stats)
    return stats


# -- fd hygiene -------------------------------------------------------------


def assert_no_fd_leak(
    before: Snapshot,
    after: Snapshot,
    *,
    cycles: int = 1,
    allowed: int = 0,
    ignore_kinds: Collection[str] = (),
) -> SnapshotDiff:
    """No process present in both snapshots gained more than ``allowed`` descriptors.

    ``cycles`` is how many times the workload ran in between, to report the
    leak per cycle.  Descriptors of ``ignore_kinds`` (e.g. ``"anon"``) are
    not counted.  Returns the diff.
    """
    __tracebackhide__ = True
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, not {cycles}")
    diff = after - before
    lines = []
    for change in diff.changes:
        gained = [i for i in change.appeared if i.kind not in ignore_kinds]
        if len(gained) <= allowed:
            continue
        lines.append(
            f"{FD_LEAK_FAILED} in {change.process}: {plural(len(gained), 'fd')} appeared over "
            f"{plural(cycles, 'cycle')} ({len(gained) / cycles:.1f} per cycle): {describe_fds(gained, LIST_LIMIT)}"
        )
    if lines:
        raise FdLeakError(FD_LEAK_FAILED, "\n".join(lines))
    return diff


def fd_growth_slope(samples: Sequence[int]) -> float:
    """Least-squares slope of descriptor counts sampled once per cycle, in fds per cycle."""
    n = len(samples)
    if n < 2:
        return 0.0
    x_mean = (n - 1) / 2.0
    y_mean = sum(samples) / n
    covariance = sum((x - x_mean) * (y - y_mean) for x, y in enumerate(samples))
    variance = sum((x - x_mean) ** 2 for x in range(n))
    return covariance / variance


def assert_no_fd_growth(series: Mapping[str, Sequence[int]], *, max_slope: float = 0.1) -> Dict[str, float]:
    """No process's descriptor count trends upward faster than ``max_slope`` per cycle.

    ``series`` maps a process label to its fd count sampled once per cycle; a
    trend over many samples tells a slow leak from the noise of in-flight
    connections.  Returns the slopes.
    """
    __tracebackhide__ = True
    slopes = {label: fd_growth_slope(samples) for label, samples in series.items()}
    lines = [
        f"{FD_GROWTH_FAILED} in {label}: {slopes[label]:.2f} fds per cycle exceeds {max_slope} "
        f"(from {samples[0]} to {samples[-1]} fds over {len(samples)} samples)"
        for label, samples in series.items()
        if slopes[label] > max_slope
    ]
    if lines:
        raise FdLeakError(FD_GROWTH_FAILED, "\n".join(lines))
    return slopes


def _socket_lines(held: List[Tuple[str, FdInfo]]) -> str:
    lines = [f"  {owner} fd {info}" for owner, info in held[:LIST_LIMIT]]
    if len(held) > LIST_LIMIT:
        lines.append(f"  ... and {len(held) - LIST_LIMIT} more")
    return "\n".join(lines)


def assert_no_close_wait(snapshot: Snapshot) -> None:
    """No process holds a TCP socket its peer has closed (CLOSE_WAIT)."""
    __tracebackhide__ = True
    held = [(str(proc), info) for proc, info in snapshot.close_wait]
    if not held:
        return
    owners = ", ".join(dict.fromkeys(owner for owner, _ in held))
    summary = (
        f"{CLOSE_WAIT_FAILED}: {plural(len(held), 'socket')} in CLOSE_WAIT "
        f"(peer closed, holder never did) in {owners}"
    )
    raise FdHygieneError(CLOSE_WAIT_FAILED, f"{summary}\n{_socket_lines(held)}")


def assert_master_holds_no_clients(snapshot: Snapshot) -> None:
    """The master has handed off, and closed, every client socket.

    A master may hold a socket briefly during a handoff, so poll this rather
    than sampling it once right after a connect.  Passes if the master is gone.
    """
    __tracebackhide__ = True
    held = snapshot.master_client_sockets
    if not held:
        return
    master = snapshot.master
    summary = f"{MASTER_HOLDS_CLIENTS}: {master} still holds {plural(len(held), 'client socket')}"
    raise FdHygieneError(MASTER_HOLDS_CLIENTS, f"{summary}\n{_socket_lines([(str(master), i) for i in held])}")
