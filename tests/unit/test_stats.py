"""Unit tests of pytest_fdcluster.stats: known values, brute force, and simulated dispatchers.

The simulations drive the reference server's own round-robin state machine
(``fdcluster_server.dispatch.Dispatcher``) with a fake clock, so "a correct
round-robin server passes" is judged against the real rotation, its window and
its ``skip_after``, not against an idealised one.
"""

from __future__ import annotations

import errno
import itertools
import math
import random
from collections import Counter
from typing import Dict, List, Sequence

import pytest

from fdcluster_server.dispatch import ROUND_ROBIN, Dispatcher, WorkerSlot
from pytest_fdcluster import stats
from pytest_fdcluster.checks import chi_square_p_value

TRIALS = 2000
MIN_REJECTION = 0.985
SEQUENTIAL_PER_WORKER = 4  # scenarios' PER_WORKER: is_rotation then has >= 99.2% power
BURST_PER_WORKER = 8  # one concurrent burst per round
BURST_TOLERANCE = 2  # absorbs one passed-over turn per burst
BURST_ALLOWED_FAILURES = 1  # absorbs one burst during which a worker stalled past skip_after


def spread(counts: Sequence[int]) -> int:
    return max(counts) - min(counts)


def per_worker(owners: Sequence[int], k: int) -> List[int]:
    """Counts of workers 0..k-1 among ``owners``, zeros included."""
    tally = Counter(owners)
    return [tally.get(w, 0) for w in range(k)]


class TestChiSquareDistribution:
    @pytest.mark.parametrize("x, dof, p", [
        (3.841, 1, 0.05), (5.991, 2, 0.05), (7.815, 3, 0.05), (11.345, 3, 0.01), (13.277, 4, 0.01),
        (23.209, 10, 0.01), (18.307, 10, 0.05), (10.828, 1, 0.001), (16.266, 3, 0.001), (124.342, 100, 0.05),
    ])
    def test_tabulated_critical_values(self, x, dof, p):
        assert stats.chi2_sf(x, dof) == pytest.approx(p, rel=2e-3)

    def test_closed_forms(self):
        # dof 2 is the exponential distribution; dof 1 is a squared standard normal.
        for x in (1e-9, 0.3, 2.0, 40.0, 700.0):
            assert stats.chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-12)
            assert stats.chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-12)
            assert stats.chi2_cdf(x, 2) == pytest.approx(-math.expm1(-x / 2), rel=1e-12)

    @pytest.mark.parametrize("dof", [1, 2, 3, 4, 7, 10, 31, 100])
    def test_agrees_with_the_continued_fraction_in_checks(self, dof):
        for x in (0.01, 0.5, 1.0, 3.0, 10.0, 50.0, 150.0):
            assert stats.chi2_sf(x, dof) == pytest.approx(chi_square_p_value(x, dof), rel=1e-9, abs=1e-300)

    @pytest.mark.parametrize("dof", [1, 2, 5, 12])
    def test_tails_add_up_to_one(self, dof):
        for x in (0.001, 0.7, dof, 3.0 * dof + 5):
            assert stats.chi2_sf(x, dof) + stats.chi2_cdf(x, dof) == pytest.approx(1.0, abs=1e-12)

    def test_edges(self):
        assert stats.chi2_sf(0.0, 3) == 1.0 and stats.chi2_cdf(0.0, 3) == 0.0
        assert stats.chi2_sf(5000.0, 3) == 0.0
        # A tiny lower tail, computed without cancellation: P(3, y) ~ y^3 / 3!.
        assert stats.chi2_cdf(1e-8, 6) == pytest.approx((1e-8 / 2) ** 3 / 6, rel=1e-6)
        for bad in (0, -1, 2.5):
            with pytest.raises(ValueError, match="degrees of freedom"):
                stats.chi2_sf(1.0, bad)


class TestChiSquareUniform:
    def test_statistic_and_p_value(self):
        result = stats.chi_square_uniform([10, 20, 30])
        assert result.statistic == pytest.approx(10.0) and result.dof == 2
        assert result.p_value == pytest.approx(math.exp(-5.0))

    def test_per_unit_removes_the_inflation_of_long_lived_connections(self):
        connections = [7, 3, 6]
        requests = [c * 50 for c in connections]  # 50 requests on every connection
        assert stats.chi_square_uniform(requests).p_value < 1e-9  # fair dispatch, wrongly damned
        scaled, direct = stats.chi_square_uniform(requests, per_unit=50), stats.chi_square_uniform(connections)
        assert scaled.statistic == pytest.approx(direct.statistic) and scaled.p_value == pytest.approx(direct.p_value)

    def test_rejects_bad_input(self):
        for counts in ([5], [3, -1]):
            with pytest.raises(ValueError):
                stats.chi_square_uniform(counts)
        assert stats.chi_square_uniform([0, 0]).p_value == 1.0

    def test_rejection_probability_matches_brute_force(self):
        n, probabilities, alpha = 7, [0.5, 0.3, 0.2], 0.05
        expected = 0.0
        for owners in itertools.product(range(3), repeat=n):
            counts = Counter(owners)
            if stats.chi_square_uniform([counts[w] for w in range(3)]).p_value < alpha:
                expected += math.prod(probabilities[w] for w in owners)
        assert stats.chi_square_rejection_probability(n, probabilities, alpha) == pytest.approx(expected, rel=1e-9)

    @pytest.mark.parametrize("k, n", [(2, 40), (3, 60), (4, 60)])
    def test_false_alarm_rate_of_a_fair_random_dispatcher_is_about_alpha(self, k, n):
        rate = stats.chi_square_rejection_probability(n, [1.0 / k] * k, 0.001)
        assert rate < 0.002, f"{k} workers x {n}: a fair random dispatcher is flagged {rate:.4%} of the time"

    def test_power_against_a_sticky_dispatcher(self):
        # Half of all connections go to worker 0 of 3: at alpha 0.001, 300 connections flag it 99% of the time.
        assert stats.chi_square_rejection_probability(300, [0.5, 0.25, 0.25], 0.001) > 0.99
        assert stats.chi_square_rejection_probability(120, [0.5, 0.25, 0.25], 0.001) < 0.6


class TestMultinomialWindow:
    @pytest.mark.parametrize("n, k", [(0, 1), (1, 2), (5, 2), (6, 3), (7, 3), (8, 4), (5, 5)])
    def test_within_matches_brute_force(self, n, k):
        tallies = Counter(tuple(sorted(per_worker(o, k))) for o in itertools.product(range(k), repeat=n))
        for lo in range(n + 2):
            for hi in range(lo - 1, n + 2):
                ways = sum(t for counts, t in tallies.items() if lo <= counts[0] and counts[-1] <= hi)
                assert stats.within_probability(n, k, lo, hi) == ways / k**n, (n, k, lo, hi)

    @pytest.mark.parametrize("n, k", [(1, 1), (4, 2), (9, 2), (6, 3), (8, 3), (8, 4), (7, 5)])
    def test_spread_matches_brute_force(self, n, k):
        spreads = Counter(spread(per_worker(o, k)) for o in itertools.product(range(k), repeat=n))
        for tolerance in range(n + 1):
            ways = sum(t for s, t in spreads.items() if s <= tolerance)
            assert stats.random_pass_probability(n, k, tolerance) == ways / k**n, (n, k, tolerance)

    def test_todays_concurrent_check_lets_random_dispatch_through(self):
        # max/min <= 2 on 16 connections to 2 workers is 6..10 each: the 79% the issue quotes.
        assert stats.within_probability(16, 2, 6, 10) == pytest.approx(0.79, abs=0.005)

    @pytest.mark.parametrize("k, tolerance", [(3, 0), (3, 1), (3, 2), (4, 1), (4, 2), (4, 3)])
    def test_min_sample_size_is_the_first_multiple_that_suffices(self, k, tolerance):
        n = stats.min_sample_size(k, tolerance)
        assert n % k == 0 and stats.random_pass_probability(n, k, tolerance) <= stats.DEFAULT_BETA
        assert all(stats.random_pass_probability(m, k, tolerance) > stats.DEFAULT_BETA for m in range(k, n, k))

    def test_min_sample_size_figures(self):
        assert stats.min_sample_size(2, 1) == 6366  # counts alone are weak at 2 workers
        assert stats.min_sample_size(3, 1) == 84
        assert stats.min_sample_size(4, 1) == 24
        with pytest.raises(ValueError, match="no n <= 100"):
            stats.min_sample_size(2, 1, limit=100)

    def test_rounds(self):
        assert stats.rounds_needed(0.5) == 7  # 0.5^7 < 0.01 < 0.5^6
        assert stats.rounds_needed(0.005) == 1
        p = 0.3
        assert stats.rounds_pass_probability(p, 4, 1) == pytest.approx(p**4 + 4 * p**3 * (1 - p))
        r = stats.rounds_needed(p, allowed_failures=1)
        assert stats.rounds_pass_probability(p, r, 1) <= 0.01 < stats.rounds_pass_probability(p, r - 1, 1)
        with pytest.raises(ValueError):
            stats.rounds_needed(1.0)


class TestRotation:
    @pytest.mark.parametrize("n, k", [(1, 2), (5, 2), (6, 3), (7, 3), (6, 4)])
    def test_pass_probability_matches_brute_force(self, n, k):
        passing = sum(stats.is_rotation(o, k) for o in itertools.product("abcd"[:k], repeat=n))
        assert stats.rotation_pass_probability(n, k) == pytest.approx(passing / k**n, rel=1e-12)

    def test_is_rotation(self):
        assert stats.is_rotation(["w1", "w0", "w2", "w1", "w0", "w2", "w1"], 3)
        assert not stats.is_rotation(["w1", "w0", "w1", "w0", "w2", "w1"], 3)  # w2 passed over once
        assert not stats.is_rotation(["w1", "w1", "w0", "w0"], 2)


# -- simulated dispatchers ------------------------------------------------------


class _Conn:
    def __init__(self, number: int) -> None:
        self.number = number

    def fileno(self) -> int:
        return 1000 + self.number

    def close(self) -> None:
        pass


class _Channel:
    """A worker's channel that records the owner of each handoff and may report a full buffer."""

    def __init__(self, index: int, owners: Dict[int, int], full: List[bool]) -> None:
        self.index, self.owners, self.full = index, owners, full

    def send_handoff(self, conn_id: int, fd: int) -> None:
        if self.full[0]:
            self.full[0] = False  # one EAGAIN: the dispatcher requeues and the turn is passed over
            raise OSError(errno.EAGAIN, "channel full")
        self.owners[fd - 1000] = self.index


class ReferenceRoundRobin:
    """The reference Dispatcher under a fake clock: 1 ms between arrivals, workers ack every tick unless stalled."""

    def __init__(self, k: int) -> None:
        self.now = 0.0
        self.owners: Dict[int, int] = {}
        self.full = [False]
        self.blocked: List[int] = []  # channels that refused a handoff: writable again at the next tick
        self.dispatcher = Dispatcher(ROUND_ROBIN, window=4, max_pending=4096, skip_after=0.2, clock=lambda: self.now,
                                     on_blocked=self.blocked.append)
        for i in range(k):
            self.dispatcher.add(WorkerSlot(i, 100 + i, _Channel(i, self.owners, self.full)))
        self.served = 0

    def tick(self, stalled: int = -1) -> None:
        self.now += 0.001
        d = self.dispatcher
        while self.blocked:  # the master's loop sees the drained channel writable and resumes that worker
            d.resume(self.blocked.pop())
        for worker in list(d.workers.values()):
            if worker.index != stalled and worker.unacked:
                d.ack(worker.index, list(worker.unacked))
        d.distribute_due()  # as the master's loop does every turn

    def burst(self, size: int, rng: random.Random, stall: bool, skip: bool) -> List[int]:
        """``size`` connections arriving 1 ms apart; returns their owners once every one is acknowledged."""
        first = self.served
        stalled, stall_from, stall_to = -1, -1.0, -1.0
        if stall:
            stalled = rng.randrange(len(self.dispatcher.workers))
            stall_from = self.now + rng.uniform(0.0, size * 0.001)
            stall_to = stall_from + rng.uniform(0.0, 0.5)
        # A refused handoff is retried on the next event; the next arrival is one (not the last arrival then).
        skip_at = first + rng.randrange(size - 1) if skip else -1
        for _ in range(size):
            self.full[0] = self.served == skip_at
            self.dispatcher.distribute(_Conn(self.served))
            self.served += 1
            self.tick(stalled if stall_from <= self.now < stall_to else -1)
        for _ in range(2000):  # drain: bounded, a stall lasts at most 0.5 s of ticks
            if len(self.owners) == self.served and not self.dispatcher.held:
                break
            self.tick(stalled if stall_from <= self.now < stall_to else -1)
        assert len(self.owners) == self.served, "simulated dispatcher lost a connection"
        return [self.owners[i] for i in range(first, self.served)]


def plan(k: int) -> stats.BurstPlan:
    """The plan scenarios/test_load_balance.py makes at run time."""
    return stats.burst_plan(k, BURST_PER_WORKER, BURST_TOLERANCE, BURST_ALLOWED_FAILURES)


def bursts_pass(rounds: Sequence[Sequence[int]], k: int) -> bool:
    """The scenario's concurrent check on the owners of each burst: ``stats.bursts_pass`` of the plan."""
    return stats.bursts_pass([per_worker(owners, k) for owners in rounds], plan(k))


def burst_rounds(k: int) -> int:
    return plan(k).rounds


def skew_flagged(rounds: Sequence[Sequence[int]], k: int, alpha: float = stats.DEFAULT_ALPHA) -> bool:
    """The scenario's skew check: requests per worker (4 per connection) over all bursts, chi-square at alpha."""
    connections = per_worker([owner for owners in rounds for owner in owners], k)
    return stats.chi_square_uniform([4 * c for c in connections], per_unit=4).p_value < alpha


class TestBurstPlan:
    def test_the_figures_the_scenarios_state(self):
        assert [(plan(k).rounds, plan(k).size) for k in (2, 3, 4)] == [(12, 16), (5, 24), (4, 32)]
        assert [round(plan(k).random_pass, 4) for k in (2, 3, 4)] == [0.0076, 0.0084, 0.0026]
        assert all(plan(k).random_pass <= stats.DEFAULT_BETA for k in range(2, 9))

    def test_failed_bursts(self):
        assert stats.failed_bursts([[8, 8], [5, 11], [7, 9], [0, 16]], 2) == [1, 3]
        assert stats.bursts_pass([[8, 8], [5, 11], [7, 9]], plan(2))
        assert not stats.bursts_pass([[8, 8], [5, 11], [0, 16]], plan(2))

    def test_one_worker_has_nothing_to_balance(self):
        with pytest.raises(ValueError, match="at least 2 workers"):
            stats.burst_plan(1)


@pytest.mark.parametrize("k", [2, 3, 4])
class TestSimulatedDispatchers:
    def test_random_dispatch_fails_the_sequential_rotation_check(self, k):
        """Power: random dispatch passes is_rotation over 4 connections per worker <= 0.78% of the time."""
        rng = random.Random(1000 + k)
        n = SEQUENTIAL_PER_WORKER * k
        assert stats.rotation_pass_probability(n, k) <= 0.0079
        passed = sum(stats.is_rotation([rng.randrange(k) for _ in range(n)], k) for _ in range(TRIALS))
        assert passed <= (1 - MIN_REJECTION) * TRIALS, f"random dispatch passed {passed} of {TRIALS}"

    def test_random_dispatch_fails_the_burst_check(self, k):
        """Power: 8 per worker per burst, spread <= 2, one failed burst allowed: random passes <= 0.84%."""
        rng = random.Random(2000 + k)
        rounds, size = burst_rounds(k), BURST_PER_WORKER * k
        per_round = stats.random_pass_probability(size, k, BURST_TOLERANCE)
        assert stats.rounds_pass_probability(per_round, rounds, BURST_ALLOWED_FAILURES) <= 0.0085
        passed = sum(
            bursts_pass([[rng.randrange(k) for _ in range(size)] for _ in range(rounds)], k) for _ in range(TRIALS)
        )
        assert passed <= (1 - MIN_REJECTION) * TRIALS, f"random dispatch passed {passed} of {TRIALS}"

    def test_a_sticky_dispatcher_fails_the_concurrent_checks(self, k):
        """One worker gets twice the share of each other: the burst check and the skew check reject it >= 99%."""
        rng = random.Random(4000 + k)
        weights = [2] + [1] * (k - 1)
        rounds, size = burst_rounds(k), BURST_PER_WORKER * k
        passed = 0
        for _ in range(TRIALS):
            owners = [rng.choices(range(k), weights, k=size) for _ in range(rounds)]
            passed += bursts_pass(owners, k) and not skew_flagged(owners, k)
        assert passed <= 0.01 * TRIALS, f"a sticky dispatcher passed {passed} of {TRIALS}"

    def test_a_fair_random_dispatcher_is_rarely_flagged_as_skewed(self, k):
        """The skew check alone at alpha 0.001: a dispatcher fair on average is flagged about 0.1% of the time."""
        rng = random.Random(5000 + k)
        rounds, size = burst_rounds(k), BURST_PER_WORKER * k
        flagged = sum(skew_flagged([[rng.randrange(k) for _ in range(size)] for _ in range(rounds)], k)
                      for _ in range(TRIALS))
        assert flagged <= 0.005 * TRIALS, f"flagged {flagged} of {TRIALS}"

    def test_reference_round_robin_passes_the_sequential_check(self, k):
        # One at a time: a connection is acknowledged before the next arrives, the window never fills, no skip.
        for trial in range(50):
            sim = ReferenceRoundRobin(k)
            owners = [sim.burst(1, random.Random(trial), stall=False, skip=False)[0] for _ in range(4 * k)]
            assert stats.is_rotation(owners, k), owners

    def test_reference_round_robin_passes_the_burst_check_despite_skips_and_a_stall(self, k):
        rng = random.Random(3000 + k)
        rounds, size = burst_rounds(k), BURST_PER_WORKER * k
        for _ in range(200):
            sim = ReferenceRoundRobin(k)
            stalled_round = rng.randrange(rounds)
            owners = [sim.burst(size, rng, stall=r == stalled_round, skip=rng.random() < 0.3) for r in range(rounds)]
            assert bursts_pass(owners, k), [Counter(o) for o in owners]
            assert not skew_flagged(owners, k), [Counter(o) for o in owners]
