"""Fairness statistics with stated power: how sure a check is that a dispatcher is what it claims.

Two questions, two tools, no scipy:

- Is a distribution skewed (shared-accept pile-up, a sticky dispatcher)?  The
  chi-square goodness of fit against uniform, ``chi_square_uniform``, with an
  exact p-value from ``chi2_sf`` (closed forms of the regularized upper
  incomplete gamma function for integer degrees of freedom).  Its false-alarm
  rate and its power against a given skew are computed exactly, not assumed, by
  ``chi_square_rejection_probability``.
- Is it really round-robin, or merely random?  A dispatcher that picks workers
  uniformly at random produces multinomial counts, which often look even: at 2
  workers and 16 connections, a "max/min <= 2" check passes it 79% of the time.
  ``random_pass_probability`` gives, exactly, the chance that random dispatch
  passes "spread <= tolerance" (a small dynamic programme over workers of the
  number of labelled assignments with every count inside a window), and
  ``min_sample_size`` the smallest sample that rejects it with the power asked
  for.  Counts alone are weak at 2 workers (exact balance of coin flips decays
  only like 1/sqrt(n)); the order of owners is strong: ``is_rotation`` and
  ``rotation_pass_probability`` (k!/k^n) for connections served one at a time.

Figures (exact, from these functions; power = 1 - pass probability of random dispatch):

- one at a time, ``is_rotation`` over 4 connections per worker: random passes
  0.78% (2 workers), 0.0011% (3), 6e-7% (4).  Counts alone at spread <= 1 would
  need 6366, 84 and 24 connections for the same 99%.
- concurrent bursts of 8 per worker, spread <= 2 per burst, one failed burst
  allowed (``rounds_needed``): 12, 5 and 4 bursts; random passes 0.76%, 0.84%, 0.26%.

Every probability here is a probability under uniform random dispatch unless a
docstring says otherwise.  Pure: no I/O, no pytest.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

__all__ = [
    "BurstPlan",
    "ChiSquare",
    "burst_plan",
    "bursts_pass",
    "chi2_cdf",
    "chi2_sf",
    "chi_square_rejection_probability",
    "chi_square_uniform",
    "failed_bursts",
    "is_rotation",
    "min_sample_size",
    "random_pass_probability",
    "rotation_pass_probability",
    "rounds_needed",
    "rounds_pass_probability",
    "within_probability",
]

#: Default miss probability of the checks: random dispatch passes at most 1% of the time (power >= 99%).
DEFAULT_BETA = 0.01
#: Default significance of the skew check: a fair dispatcher is flagged at most 0.1% of the time.
DEFAULT_ALPHA = 0.001
_SEARCH_LIMIT = 100_000
_ENUMERATION_LIMIT = 2_000_000


# -- chi-square distribution --------------------------------------------------


def _check_dof(dof: int) -> None:
    if not isinstance(dof, int) or dof < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, not {dof!r}")


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with ``dof`` degrees of freedom: the upper-tail p-value.

    Exact closed forms of Q(dof/2, x/2): for even dof a finite Poisson sum, for
    odd dof erfc plus a finite sum.  Every term is positive and computed in log
    space, so there is no cancellation and no overflow for large ``x``.
    """
    _check_dof(dof)
    if x <= 0.0:
        return 1.0
    half = x / 2.0
    log_half = math.log(half)
    if dof % 2 == 0:
        # Q(m, y) = e^-y * sum_{i<m} y^i / i!
        total = sum(math.exp(-half + i * log_half - math.lgamma(i + 1)) for i in range(dof // 2))
    else:
        # Q(m + 1/2, y) = erfc(sqrt y) + e^-y * sum_{1<=i<=m} y^(i-1/2) / Gamma(i + 1/2)
        total = math.erfc(math.sqrt(half)) + sum(
            math.exp(-half + (i - 0.5) * log_half - math.lgamma(i + 0.5)) for i in range(1, dof // 2 + 1)
        )
    return min(1.0, total)


def chi2_cdf(x: float, dof: int) -> float:
    """P(X <= x) for X chi-square with ``dof`` degrees of freedom: the lower tail.

    A statistic implausibly small for random dispatch is the signature of a
    rotation.  Below the mode the series P(a, y) = sum_i e^-y y^(a+i) / Gamma(a+i+1)
    (positive terms) keeps tiny tails exact; above it 1 - ``chi2_sf`` loses nothing.
    """
    _check_dof(dof)
    if x <= 0.0:
        return 0.0
    a, half = dof / 2.0, x / 2.0
    if half >= a + 1.0:
        return max(0.0, 1.0 - chi2_sf(x, dof))
    log_half = math.log(half)
    total = 0.0
    for i in range(10_000):  # converges in a few dozen terms below the mode
        term = math.exp(-half + (a + i) * log_half - math.lgamma(a + i + 1.0))
        total += term
        if term < total * 1e-17:
            break
    return min(1.0, total)


class ChiSquare(NamedTuple):
    """A goodness-of-fit result against the uniform distribution."""

    statistic: float
    dof: int
    #: Upper tail: the chance of a statistic this large if every worker were equally likely.
    p_value: float


def chi_square_uniform(counts: Sequence[int], per_unit: int = 1) -> ChiSquare:
    """Chi-square of ``counts`` against uniform, with its upper-tail p-value.

    ``per_unit`` is how many counted items ride on one dispatch decision: on
    long-lived connections each carrying r requests, per-request counts are r
    times per-connection counts and their raw chi-square is r times too large,
    so a fair dispatcher would be flagged.  Dividing by r restores the test
    (exact when every connection carries r requests; count connections otherwise).
    Fail a distribution as skewed when ``p_value < alpha``; the false-alarm rate at
    a given n and alpha is ``chi_square_rejection_probability(n, [1/k]*k, alpha)``.
    """
    if len(counts) < 2:
        raise ValueError(f"a goodness of fit needs at least 2 workers, got {len(counts)}")
    if min(counts) < 0 or per_unit < 1:
        raise ValueError(f"counts must be >= 0 and per_unit >= 1, got {list(counts)} and {per_unit}")
    total = sum(counts)
    dof = len(counts) - 1
    if total == 0:
        return ChiSquare(0.0, dof, 1.0)
    expected = total / len(counts)
    statistic = sum((c - expected) ** 2 for c in counts) / expected / per_unit
    return ChiSquare(statistic, dof, chi2_sf(statistic, dof))


def _compositions(n: int, k: int) -> Iterator[Tuple[int, ...]]:
    """Every way to write n as an ordered sum of k non-negative counts."""
    if k == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in _compositions(n - first, k - 1):
            yield (first, *rest)


def chi_square_rejection_probability(n: int, probabilities: Sequence[float], alpha: float = DEFAULT_ALPHA) -> float:
    """Exact chance that ``chi_square_uniform`` flags n dispatches drawn with these worker probabilities.

    With equal probabilities this is the false-alarm rate of the skew check
    against a fair random dispatcher (at most about ``alpha``); with a skew, e.g.
    [0.5, 0.25, 0.25], it is the check's power against that skew.  Enumerates the
    multinomial outcomes, so n and k must be small (C(n+k-1, k-1) outcomes).
    """
    k = len(probabilities)
    outcomes = math.comb(n + k - 1, k - 1)
    if outcomes > _ENUMERATION_LIMIT:
        raise ValueError(f"{outcomes} outcomes for n={n}, k={k}: too many to enumerate")
    if abs(sum(probabilities) - 1.0) > 1e-9 or min(probabilities) < 0:
        raise ValueError(f"probabilities must be >= 0 and sum to 1, got {list(probabilities)}")
    logs = [math.log(p) if p > 0 else -math.inf for p in probabilities]
    base = math.lgamma(n + 1)
    rejected = 0.0
    for counts in _compositions(n, k):
        if chi_square_uniform(counts).p_value >= alpha:
            continue
        if any(c and p == 0 for c, p in zip(counts, probabilities)):
            continue  # impossible outcome: some worker got work it could never be given
        rejected += math.exp(base + sum(c * lp - math.lgamma(c + 1) for c, lp in zip(counts, logs) if c))
    return min(1.0, rejected)


# -- random dispatch against a tolerance ---------------------------------------


def _within_ways(n: int, k: int, lo: int, hi: int) -> int:
    """How many of the k^n assignments of n labelled connections give every worker a count in [lo, hi]."""
    lo, hi = max(lo, 0), min(hi, n)
    if lo > hi or k * lo > n or k * hi < n:
        return 0
    # placed -> ways: worker by worker, comb(placed, c) interleaves the c new labels
    # (the product of those binomials is the multinomial coefficient n! / prod c_i!).
    ways: Dict[int, int] = {0: 1}
    for worker in range(k):
        left = k - worker - 1
        step: Dict[int, int] = {}
        for placed, count in ways.items():
            for c in range(lo, hi + 1):
                total = placed + c
                if total + left * lo > n:
                    break
                if total + left * hi < n:
                    continue  # the workers left could not take the rest
                step[total] = step.get(total, 0) + count * math.comb(total, c)
        ways = step
    return ways.get(n, 0)


def within_probability(n: int, k: int, lo: int, hi: int) -> float:
    """Exact chance that uniform random dispatch of n connections to k workers gives each between lo and hi."""
    _check_sizes(n, k)
    return _within_ways(n, k, lo, hi) / k**n  # int / int: correctly rounded, even for huge ints


def _check_sizes(n: int, k: int) -> None:
    if n < 0 or k < 1:
        raise ValueError(f"need n >= 0 connections and k >= 1 workers, got n={n}, k={k}")


def random_pass_probability(n: int, k: int, tolerance: int) -> float:
    """Exact chance that uniform random dispatch passes "most minus fewest <= tolerance" (``assert_round_robin``).

    Sums, over the possible minimum m, assignments with every count in
    [m, m + tolerance] minus those with every count in [m + 1, m + tolerance].
    Cost: about (tolerance + 1)^2 * k^2 big-integer operations, whatever n.
    """
    _check_sizes(n, k)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, not {tolerance}")
    share = n // k
    ways = 0
    for m in range(max(0, -(-n // k) - tolerance), share + 1):
        ways += _within_ways(n, k, m, m + tolerance) - _within_ways(n, k, m + 1, m + tolerance)
    return ways / k**n


def min_sample_size(
    k: int, tolerance: int, beta: float = DEFAULT_BETA, step: int = 0, limit: int = _SEARCH_LIMIT
) -> int:
    """The smallest n, a multiple of ``step`` (default k), at which random dispatch passes the tolerance with <= beta.

    Power against random dispatch at that n is 1 - ``random_pass_probability``
    >= 1 - beta.  Multiples of k are the natural sizes: exact round-robin then
    has spread 0.  Along them the pass probability falls as n grows (the
    multinomial spreads out like sqrt(n)), so a doubling search then a bisection
    finds the threshold in a few dozen evaluations; the unit tests check it
    against a linear scan.  Raises ValueError if no n up to ``limit`` is enough.
    """
    step = step or k

    def rejects(multiple: int) -> bool:
        return random_pass_probability(multiple * step, k, tolerance) <= beta

    low, high = 0, 1  # in multiples of step: rejects(low) is false (or low is 0), rejects(high) is the question
    while not rejects(high):
        if high * step > limit:
            raise ValueError(
                f"no n <= {limit} rejects random dispatch to {k} workers at tolerance {tolerance} with beta {beta}")
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if rejects(middle) else (middle, high)
    return high * step


def rounds_pass_probability(pass_probability: float, rounds: int, allowed_failures: int = 0) -> float:
    """Chance that random dispatch fails at most ``allowed_failures`` of ``rounds`` independent rounds.

    Each round passes with ``pass_probability`` (``random_pass_probability`` of
    one burst).  Allowing one failed round absorbs a worker stalled past the
    dispatcher's ``skip_after`` during one burst, which legitimately skews it.
    """
    if rounds < 1 or not 0 <= allowed_failures:
        raise ValueError(f"need rounds >= 1 and allowed_failures >= 0, got {rounds} and {allowed_failures}")
    fail = 1.0 - pass_probability
    terms = (math.comb(rounds, j) * fail**j * pass_probability ** (rounds - j) for j in range(allowed_failures + 1))
    return min(1.0, sum(terms))


def rounds_needed(pass_probability: float, beta: float = DEFAULT_BETA, allowed_failures: int = 0) -> int:
    """The fewest rounds after which random dispatch passes (all but ``allowed_failures``) with <= beta.

    For bursts of concurrent connections, held and closed round by round, each
    round's spread checked on its own: with no failure allowed random dispatch
    passes all R with p^R.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), not {beta}")
    if pass_probability >= 1.0:
        raise ValueError("a check that random dispatch always passes never gains power")
    for rounds in range(1, 10_000):
        if rounds_pass_probability(pass_probability, rounds, allowed_failures) <= beta:
            return rounds
    raise ValueError(f"more than 10000 rounds needed at a per-round pass probability of {pass_probability}")


# -- the order of owners ---------------------------------------------------------


def is_rotation(owners: Sequence[str], k: int) -> bool:
    """True if ``owners`` (the worker of each connection, in arrival order) rotates with period k.

    The first k owners are k different workers and every later one repeats the
    owner k places before: what round-robin does to connections that arrive one
    at a time, whatever its starting worker and its order of workers.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    head = list(owners[:k])
    if len(set(head)) != len(head):
        return False
    return all(owners[i] == owners[i - k] for i in range(k, len(owners)))


def rotation_pass_probability(n: int, k: int) -> float:
    """Exact chance that uniform random dispatch of n >= k connections passes ``is_rotation``: k! / k^n.

    2 workers x 8 connections: 0.78%; 3 x 6: 0.82%; 4 x 6: 0.59% (each >= 99% power).
    """
    _check_sizes(n, k)
    if n < k:
        return math.perm(k, n) / k**n
    return math.factorial(k) / k**n


# -- the concurrent check, as the scenarios make it --------------------------------


class BurstPlan(NamedTuple):
    """Bursts of concurrent connections that reject random dispatch: how many, how big, how tolerant."""

    workers: int
    per_worker: int
    #: Most minus fewest allowed within one burst.
    tolerance: int
    #: Bursts that may exceed the tolerance (a worker stalled past ``skip_after`` during one).
    allowed_failures: int
    rounds: int
    #: Exact chance that uniform random dispatch passes the whole plan: at most the beta asked for.
    random_pass: float

    @property
    def size(self) -> int:
        """Connections per burst."""
        return self.per_worker * self.workers


def burst_plan(k: int, per_worker: int = 8, tolerance: int = 2, allowed_failures: int = 1,
               beta: float = DEFAULT_BETA) -> BurstPlan:
    """The fewest bursts of ``per_worker * k`` concurrent connections after which random dispatch passes <= beta.

    12, 5 and 4 bursts for 2, 3 and 4 workers at the defaults.  Raises
    ValueError for fewer than 2 workers: one worker has nothing to balance.
    """
    if k < 2:
        raise ValueError(f"a burst check needs at least 2 workers, got {k}")
    per_round = random_pass_probability(per_worker * k, k, tolerance)
    rounds = rounds_needed(per_round, beta, allowed_failures)
    return BurstPlan(k, per_worker, tolerance, allowed_failures, rounds,
                     rounds_pass_probability(per_round, rounds, allowed_failures))


def failed_bursts(bursts: Sequence[Sequence[int]], tolerance: int) -> List[int]:
    """Indexes of the bursts (each a list of per-worker counts, zeros included) whose spread exceeds ``tolerance``."""
    return [i for i, counts in enumerate(bursts) if max(counts) - min(counts) > tolerance]


def bursts_pass(bursts: Sequence[Sequence[int]], plan: BurstPlan) -> bool:
    """The concurrent check: every burst within the plan's tolerance but at most ``allowed_failures``."""
    return len(failed_bursts(bursts, plan.tolerance)) <= plan.allowed_failures
