"""A latency histogram, HDR-style: bounded memory and ~1 % precision whatever the number of records.

Log-bucketed like HdrHistogram (power-of-two ranges split into linear
sub-buckets), on float seconds, picklable so that load processes can send
theirs back to be merged.  Pure: no sockets, no pytest.
"""

from __future__ import annotations

import math
from array import array
from typing import Dict, Iterable, Tuple

__all__ = ["Histogram", "format_seconds"]


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
        return (f"<Histogram n={self.count} p50={format_seconds(self.percentile(50))} "
                f"max={format_seconds(self.max)}>")

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

    def merge(self, other: Histogram) -> Histogram:
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


def format_seconds(value: float) -> str:
    """A latency as a person reads it: ``850 us``, ``12.5 ms``, ``1.2 s``; ``-`` for none."""
    if math.isnan(value) or math.isinf(value):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1.0:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"
