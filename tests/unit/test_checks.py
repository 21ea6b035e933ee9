"""Unit tests of pytest_fdcluster.checks: statistics, thresholds and the messages a user reads.

Snapshots here are built by hand from observe's dataclasses; the real thing
is exercised in tests/integration/test_observe.py.
"""

from __future__ import annotations

import math
import unittest
from typing import Optional

import pytest

from pytest_fdcluster import ObservationError, ObservationSkipped, checks, observe
from pytest_fdcluster.checks import (
    BAR_CHAR,
    BAR_WIDTH,
    CLOSE_WAIT_FAILED,
    FAIRNESS_FAILED,
    FD_GROWTH_FAILED,
    FD_LEAK_FAILED,
    FEWEST_MARK,
    MASTER_HOLDS_CLIENTS,
    PSEUDO_BUCKETS,
    ROUND_ROBIN_FAILED,
    CheckFailed,
    FairnessError,
    FdHygieneError,
    FdLeakError,
    assert_fair,
    assert_master_holds_no_clients,
    assert_no_close_wait,
    assert_no_fd_growth,
    assert_no_fd_leak,
    assert_round_robin,
    chi_square_p_value,
    fairness,
    fd_growth_slope,
    format_distribution,
)
from pytest_fdcluster.observe import FdInfo, ProcessView, Snapshot

UNEVEN = {"worker 0": 7, "worker 1": 3, "worker 2": 0}
SERVER = ("127.0.0.1", 5000)


def tcp(fd: int, client_port: int, status: str = "ESTABLISHED") -> FdInfo:
    """A server-side TCP socket connected to a client on 127.0.0.1:client_port."""
    return FdInfo(fd, "tcp", f"socket:[{10000 + fd}]", False, SERVER, ("127.0.0.1", client_port), status)


def unix(fd: int) -> FdInfo:
    return FdInfo(fd, "unix", f"socket:[{20000 + fd}]", False)


def anon(fd: int) -> FdInfo:
    return FdInfo(fd, "anon", "anon_inode:[eventpoll]", False)


def listener(fd: int = 3) -> FdInfo:
    return FdInfo(fd, "tcp", "socket:[1]", False, SERVER, None, "LISTEN")


def process(pid: int, label: str, *fds: FdInfo) -> ProcessView:
    return ProcessView(pid, 1, label, "server", {f.fd: f for f in fds})


def tree(*processes: ProcessView) -> Snapshot:
    return Snapshot(processes[0].pid, {p.pid: p for p in processes})


class TestChiSquare:
    @pytest.mark.parametrize(
        "chi_square, dof, expected, rel",
        [
            (3.841458820694124, 1, 0.05, 1e-9),
            (6.634896601021214, 1, 0.01, 1e-9),
            (5.991464547107979, 2, 0.05, 1e-9),
            (11.070497693516351, 5, 0.05, 1e-9),
            (18.307038053275146, 10, 0.05, 1e-9),
            (9.341817765591966, 10, 0.5, 1e-9),
            # Printed tables give three decimals here.
            (3.84, 1, 0.05, 1e-3),
            (11.07, 5, 0.05, 1e-3),
            (124.342, 100, 0.05, 1e-4),
        ],
    )
    def test_critical_values_from_tables(self, chi_square, dof, expected, rel):
        assert chi_square_p_value(chi_square, dof) == pytest.approx(expected, rel=rel)

    @pytest.mark.parametrize("x", [0.01, 0.5, 1.0, 2.0, 3.0, 10.0, 40.0, 200.0])
    def test_two_dof_is_exponential(self, x):
        assert chi_square_p_value(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10)

    @pytest.mark.parametrize("x", [0.01, 0.5, 1.0, 2.0, 3.0, 10.0, 40.0])
    def test_one_dof_is_complementary_error_function(self, x):
        assert chi_square_p_value(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)

    @pytest.mark.parametrize("x", [0.3, 2.5, 3.0, 7.0, 30.0])
    def test_four_dof_closed_form(self, x):
        # Q(2, x/2) = exp(-x/2) * (1 + x/2); x on both sides of the series/fraction switch.
        assert chi_square_p_value(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-10)

    def test_zero_statistic_is_certain(self):
        assert chi_square_p_value(0.0, 3) == 1.0

    def test_no_degrees_of_freedom_is_certain(self):
        assert chi_square_p_value(5.0, 0) == 1.0

    def test_decreases_with_the_statistic_and_stays_in_range(self):
        values = [chi_square_p_value(x, 7) for x in range(0, 200, 5)]
        assert values == sorted(values, reverse=True)
        assert all(0.0 <= v <= 1.0 for v in values)


class TestFairness:
    def test_even_distribution(self):
        stats = fairness({"worker 0": 5, "worker 1": 5, "worker 2": 5})
        assert (stats.total, stats.spread, stats.max_min_ratio) == (15, 0, 1.0)
        assert stats.jain == pytest.approx(1.0)
        assert stats.chi_square == 0.0
        assert stats.p_value == 1.0

    def test_uneven_distribution(self):
        stats = fairness(UNEVEN)
        assert (stats.total, stats.spread) == (10, 7)
        assert stats.max_min_ratio == math.inf
        assert stats.jain == pytest.approx(100 / (3 * 58))
        assert stats.chi_square == pytest.approx(7.4)
        assert stats.p_value == pytest.approx(math.exp(-3.7))

    def test_all_on_one_worker_has_jain_one_over_n(self):
        assert fairness({"worker 0": 9, "worker 1": 0, "worker 2": 0, "worker 3": 0}).jain == pytest.approx(0.25)

    def test_ratio_without_zero(self):
        assert fairness({"worker 0": 6, "worker 1": 3}).max_min_ratio == 2.0

    def test_no_work_is_fair(self):
        stats = fairness({"worker 0": 0, "worker 1": 0})
        assert (stats.total, stats.spread, stats.jain, stats.max_min_ratio, stats.p_value) == (0, 0, 1.0, 1.0, 1.0)

    def test_single_worker(self):
        stats = fairness({"worker 0": 12})
        assert (stats.spread, stats.jain, stats.chi_square, stats.p_value) == (0, 1.0, 0.0, 1.0)

    def test_no_workers_is_an_error(self):
        with pytest.raises(ValueError, match="no workers"):
            fairness({})

    def test_negative_count_is_an_error(self):
        with pytest.raises(ValueError, match="negative"):
            fairness({"worker 0": 1, "worker 1": -1})

    def test_counts_are_copied(self):
        counts = {"worker 0": 1}
        stats = fairness(counts)
        counts["a"] = 5
        assert stats.counts == {"worker 0": 1}

    def test_stats_line(self):
        assert str(fairness(UNEVEN)) == (
            "3 workers, 10 total, spread 7, Jain 0.575, max/min inf, chi-square 7.40 (2 dof, p=0.0247)"
        )


class TestFormatDistribution:
    def test_table(self):
        full, part = BAR_CHAR * BAR_WIDTH, BAR_CHAR * 17  # 3/7 of 40, rounded
        assert format_distribution(UNEVEN).splitlines() == [
            f"worker 0  {full}  7",
            f"worker 1  {part.ljust(BAR_WIDTH)}  3",
            f"worker 2  {' ' * BAR_WIDTH}  0   {FEWEST_MARK}",
        ]

    def test_counts_are_right_aligned_after_aligned_labels(self):
        lines = format_distribution({"w": 1000, "worker 10": 5, "worker 2": 40}).splitlines()
        lines = [line.replace(FEWEST_MARK, "").rstrip() for line in lines]
        assert len({len(line) for line in lines}) == 1
        assert [line.split()[0] for line in lines] == ["worker", "worker", "w"]

    def test_workers_are_listed_in_natural_order(self):
        lines = format_distribution({"worker 10": 1, "worker 2": 1, "master": 0, "worker 0": 1}).splitlines()
        assert [line.split("  ")[0].strip() for line in lines] == ["master", "worker 0", "worker 2", "worker 10"]

    def test_nonzero_count_gets_at_least_one_block(self):
        lines = format_distribution({"busy": 10000, "idle": 1}).splitlines()
        assert lines[1].count(BAR_CHAR) == 1
        assert lines[0].count(BAR_CHAR) == BAR_WIDTH

    def test_even_counts_mark_nobody(self):
        assert FEWEST_MARK not in format_distribution({"a": 3, "b": 3})

    def test_ties_for_fewest_are_all_marked(self):
        lines = format_distribution({"a": 1, "b": 4, "c": 1}).splitlines()
        assert [FEWEST_MARK in line for line in lines] == [True, False, True]

    def test_all_zero_has_no_bars_and_no_trailing_space(self):
        assert format_distribution({"a": 0, "bb": 0}) == "a   0\nbb  0"

    def test_no_workers(self):
        assert format_distribution({}) == "(no workers)"


class TestRoundRobin:
    def test_within_tolerance_returns_stats(self):
        stats = assert_round_robin({"worker 0": 4, "worker 1": 3, "worker 2": 3})
        assert stats.spread == 1

    def test_failure_message(self):
        with pytest.raises(FairnessError) as info:
            assert_round_robin(UNEVEN)
        lines = str(info.value).splitlines()
        assert lines[0] == (
            f"{ROUND_ROBIN_FAILED}: spread 7 exceeds 1 (worker 2 got 0, worker 0 got 7; expected 3 or 4 each)"
        )
        assert lines[1:4] == format_distribution(UNEVEN).splitlines()
        assert lines[4] == str(fairness(UNEVEN))

    def test_expected_share_when_total_divides(self):
        with pytest.raises(FairnessError, match=r"worker 1 got 1, worker 0 got 5; expected 3 each\)"):
            assert_round_robin({"worker 0": 5, "worker 1": 1})

    def test_zero_tolerance(self):
        with pytest.raises(FairnessError, match="spread 1 exceeds 0"):
            assert_round_robin({"worker 0": 4, "worker 1": 3}, tolerance=0)

    def test_wider_tolerance(self):
        assert assert_round_robin({"worker 0": 5, "worker 1": 2}, tolerance=3).spread == 3

    def test_error_is_an_assertion_error_with_the_figures(self):
        with pytest.raises(AssertionError) as info:
            assert_round_robin(UNEVEN)
        assert isinstance(info.value, FairnessError)
        assert info.value.invariant == ROUND_ROBIN_FAILED
        assert info.value.stats == fairness(UNEVEN)

    def test_negative_tolerance_is_an_error(self):
        with pytest.raises(ValueError):
            assert_round_robin({"worker 0": 1}, tolerance=-1)


class TestAssertFair:
    def test_jain_threshold(self):
        with pytest.raises(FairnessError) as info:
            assert_fair(UNEVEN, min_jain=0.9)
        assert str(info.value).splitlines()[0] == f"{FAIRNESS_FAILED}: Jain index 0.575 below 0.9"

    def test_ratio_threshold(self):
        with pytest.raises(FairnessError, match=r"^fairness: max/min ratio 2\.5 above 2\.0\n"):
            assert_fair({"worker 0": 10, "worker 1": 4}, max_ratio=2.0)

    def test_infinite_ratio(self):
        with pytest.raises(FairnessError, match="max/min ratio inf above 3"):
            assert_fair(UNEVEN, max_ratio=3)

    def test_p_value_threshold(self):
        with pytest.raises(FairnessError) as info:
            assert_fair(UNEVEN, min_p_value=0.05)
        assert str(info.value).splitlines()[0] == (
            f"{FAIRNESS_FAILED}: chi-square p-value 0.0247 below 0.05 (chi-square 7.40, 2 dof)"
        )

    def test_every_failed_threshold_is_named(self):
        with pytest.raises(FairnessError) as info:
            assert_fair(UNEVEN, min_jain=0.9, max_ratio=2, min_p_value=0.05)
        first = str(info.value).splitlines()[0]
        assert first.count("; ") == 2
        assert "Jain" in first and "max/min" in first and "p-value" in first

    def test_only_failed_thresholds_are_named(self):
        with pytest.raises(FairnessError) as info:
            assert_fair(UNEVEN, min_jain=0.5, max_ratio=2)
        assert "Jain" not in str(info.value).splitlines()[0]

    def test_message_has_table_and_stats(self):
        with pytest.raises(FairnessError) as info:
            assert_fair(UNEVEN, min_jain=0.9)
        text = str(info.value)
        assert format_distribution(UNEVEN) in text
        assert text.endswith(str(fairness(UNEVEN)))

    def test_fair_enough_returns_stats(self):
        stats = assert_fair({"worker 0": 48, "worker 1": 52, "worker 2": 50},
                            min_jain=0.99, max_ratio=1.2, min_p_value=0.05)
        assert stats.total == 150

    def test_needs_a_threshold(self):
        with pytest.raises(ValueError, match="at least one"):
            assert_fair(UNEVEN)


class TestPseudoBuckets:
    """Only workers are buckets: a connection held by the master or by nobody is another invariant's failure."""

    EXPECTED = (f"{FAIRNESS_FAILED}: 3 connections were counted for master and 1 for unowned; only workers may be "
                "buckets \u2014 a connection held by the master or by nobody is an 'exactly one holder' failure, "
                "not a fairness figure")

    @pytest.mark.parametrize("check", [
        fairness, assert_round_robin, lambda counts: assert_fair(counts, min_jain=0.5),
    ], ids=["fairness", "assert_round_robin", "assert_fair"])
    def test_master_and_unowned_are_refused_with_the_reason(self, check):
        with pytest.raises(CheckFailed) as info:
            check({"worker 0": 4, "worker 1": 4, "master": 3, "unowned": 1})
        assert str(info.value) == self.EXPECTED
        assert info.value.invariant == FAIRNESS_FAILED and isinstance(info.value, AssertionError)

    @pytest.mark.parametrize("label", ["master", "unowned", "a", "w1", "worker", "worker x", "Worker 1", "worker 1 "])
    def test_anything_but_a_worker_label_is_refused(self, label):
        with pytest.raises(CheckFailed, match=f"^{FAIRNESS_FAILED}: 1 connection was counted for {label}; only"):
            fairness({"worker 0": 2, label: 1})

    def test_a_zero_count_is_refused_too(self):
        # A master bucket of 0 would still count as a worker that got nothing: every figure would be wrong.
        with pytest.raises(CheckFailed, match="0 connections were counted for master"):
            assert_round_robin({"worker 0": 2, "worker 1": 2, "master": 0})

    def test_worker_indexes_and_worker_pids_are_buckets(self):
        assert fairness({"worker 0": 2, "worker 12": 2, "worker pid 4242": 2}).spread == 0

    def test_the_message_template_is_exported(self):
        assert PSEUDO_BUCKETS.format(counted="X").startswith(f"{FAIRNESS_FAILED}: X; only workers may be buckets")

    def test_fairness_helpers_hide_their_frames(self):
        for helper in (fairness, assert_round_robin, assert_fair, checks._refuse_pseudo_buckets):
            assert "__tracebackhide__" in helper.__code__.co_varnames, helper.__name__


class TestFdLeak:
    def test_no_new_fds_returns_the_diff(self):
        before = tree(process(10, "master", listener()), process(11, "worker 0", unix(4)))
        diff = assert_no_fd_leak(before, before)
        assert diff.is_empty

    def test_leak_message(self):
        worker_before = process(4242, "worker 1", unix(4))
        leaked = [tcp(fd, 40000 + fd) for fd in range(12, 52)]
        worker_after = process(4242, "worker 1", unix(4), *leaked)
        master = process(4240, "master", listener())
        with pytest.raises(FdLeakError) as info:
            assert_no_fd_leak(tree(master, worker_before), tree(master, worker_after), cycles=20)
        text = str(info.value)
        assert info.value.invariant == FD_LEAK_FAILED
        assert text.startswith(
            f"{FD_LEAK_FAILED} in worker 1 (pid 4242): 40 fds appeared over 20 cycles (2.0 per cycle): "
            "12 tcp 127.0.0.1:5000->127.0.0.1:40012 ESTABLISHED, 13 tcp 127.0.0.1:5000->127.0.0.1:40013 ESTABLISHED, "
        )
        assert text.endswith("21 tcp 127.0.0.1:5000->127.0.0.1:40021 ESTABLISHED, ... and 30 more")

    def test_singular_wording(self):
        before = tree(process(7, "master"))
        after = tree(process(7, "master", unix(9)))
        with pytest.raises(FdLeakError) as info:
            assert_no_fd_leak(before, after)
        assert str(info.value) == (
            f"{FD_LEAK_FAILED} in master (pid 7): 1 fd appeared over 1 cycle (1.0 per cycle): 9 unix"
        )

    def test_allowed_growth(self):
        before = tree(process(7, "master"))
        after = tree(process(7, "master", unix(9), unix(10)))
        assert_no_fd_leak(before, after, allowed=2)
        with pytest.raises(FdLeakError):
            assert_no_fd_leak(before, after, allowed=1)

    def test_ignored_kinds(self):
        before = tree(process(7, "master"))
        after = tree(process(7, "master", anon(9)))
        assert_no_fd_leak(before, after, ignore_kinds={"anon"})

    def test_every_leaking_process_gets_a_line(self):
        before = tree(process(7, "master"), process(8, "worker 0"), process(9, "worker 1"))
        after = tree(process(7, "master", unix(5)), process(8, "worker 0"), process(9, "worker 1", unix(6)))
        with pytest.raises(FdLeakError) as info:
            assert_no_fd_leak(before, after)
        lines = str(info.value).splitlines()
        assert [line.split(":")[0] for line in lines] == [
            f"{FD_LEAK_FAILED} in master (pid 7)",
            f"{FD_LEAK_FAILED} in worker 1 (pid 9)",
        ]

    def test_processes_that_came_or_went_are_not_leaks(self):
        before = tree(process(7, "master"), process(8, "worker 0", unix(3)))
        after = tree(process(7, "master"), process(9, "worker 0", unix(3), unix(4)))
        assert_no_fd_leak(before, after)

    def test_reused_fd_number_is_a_new_fd(self):
        before = tree(process(7, "master", tcp(12, 40000)))
        after = tree(process(7, "master", FdInfo(12, "tcp", "socket:[999]", False, SERVER, ("127.0.0.1", 40001))))
        with pytest.raises(FdLeakError, match="1 fd appeared"):
            assert_no_fd_leak(before, after)

    def test_closed_fds_do_not_offset_new_ones(self):
        # A leak is what appeared; that older sockets were closed meanwhile does not excuse it.
        before = tree(process(7, "master", tcp(12, 40000)))
        after = tree(process(7, "master", tcp(13, 40001)))
        with pytest.raises(FdLeakError):
            assert_no_fd_leak(before, after)

    def test_cycles_must_be_positive(self):
        snap = tree(process(7, "master"))
        with pytest.raises(ValueError):
            assert_no_fd_leak(snap, snap, cycles=0)


class TestFdGrowth:
    def test_slope_of_a_line(self):
        assert fd_growth_slope([10, 12, 14, 16, 18]) == pytest.approx(2.0)

    def test_slope_of_flat_noise(self):
        assert fd_growth_slope([10, 11, 10, 11, 10, 11, 10, 11]) == pytest.approx(1 / 21)

    def test_slope_of_a_falling_count(self):
        assert fd_growth_slope([9, 6, 3]) == pytest.approx(-3.0)

    @pytest.mark.parametrize("samples", [[], [5]])
    def test_too_few_samples_is_flat(self, samples):
        assert fd_growth_slope(samples) == 0.0

    def test_growth_message(self):
        series = {"master": [8] * 21, "worker 1": [12 + 2 * i for i in range(21)]}
        with pytest.raises(FdLeakError) as info:
            assert_no_fd_growth(series)
        assert info.value.invariant == FD_GROWTH_FAILED
        assert str(info.value) == (
            f"{FD_GROWTH_FAILED} in worker 1: 2.00 fds per cycle exceeds 0.1 (from 12 to 52 fds over 21 samples)"
        )

    def test_no_growth_returns_slopes(self):
        slopes = assert_no_fd_growth({"master": [8, 9, 8, 8], "worker 0": [5, 5, 5, 5]})
        assert slopes["worker 0"] == 0.0

    def test_custom_slope(self):
        assert_no_fd_growth({"worker 0": [1, 2, 3]}, max_slope=1.0)
        with pytest.raises(FdLeakError):
            assert_no_fd_growth({"worker 0": [1, 2, 3]}, max_slope=0.9)


class TestCloseWait:
    def test_clean(self):
        assert_no_close_wait(tree(process(7, "master", listener()), process(8, "worker 0", tcp(9, 40000))))

    def test_message_names_process_fd_and_addresses(self):
        snap = tree(
            process(7, "master", listener()),
            process(8, "worker 0", tcp(9, 40000, "CLOSE_WAIT"), tcp(10, 40001)),
            process(9, "worker 1", tcp(11, 40002, "CLOSE_WAIT")),
        )
        with pytest.raises(FdHygieneError) as info:
            assert_no_close_wait(snap)
        assert info.value.invariant == CLOSE_WAIT_FAILED
        assert str(info.value).splitlines() == [
            f"{CLOSE_WAIT_FAILED}: 2 sockets in CLOSE_WAIT (peer closed, holder never did) "
            "in worker 0 (pid 8), worker 1 (pid 9)",
            "  worker 0 (pid 8) fd 9 tcp 127.0.0.1:5000->127.0.0.1:40000 CLOSE_WAIT",
            "  worker 1 (pid 9) fd 11 tcp 127.0.0.1:5000->127.0.0.1:40002 CLOSE_WAIT",
        ]

    def test_long_lists_are_truncated(self):
        snap = tree(process(7, "master", *[tcp(fd, 40000 + fd, "CLOSE_WAIT") for fd in range(3, 28)]))
        with pytest.raises(FdHygieneError) as info:
            assert_no_close_wait(snap)
        lines = str(info.value).splitlines()
        assert len(lines) == 1 + checks.LIST_LIMIT + 1
        assert lines[-1] == "  ... and 15 more"


class TestMasterHoldsNoClients:
    def test_clean(self):
        assert_master_holds_no_clients(
            tree(process(7, "master", listener(), unix(4)), process(8, "worker 0", tcp(9, 1)))
        )

    def test_message(self):
        snap = tree(process(7, "master", listener(), tcp(9, 40000)), process(8, "worker 0"))
        with pytest.raises(FdHygieneError) as info:
            assert_master_holds_no_clients(snap)
        assert info.value.invariant == MASTER_HOLDS_CLIENTS
        assert str(info.value).splitlines() == [
            f"{MASTER_HOLDS_CLIENTS}: master (pid 7) still holds 1 client socket",
            "  master (pid 7) fd 9 tcp 127.0.0.1:5000->127.0.0.1:40000 ESTABLISHED",
        ]

    def test_gone_master_holds_nothing(self):
        assert_master_holds_no_clients(Snapshot(7, {}))


def blind_process(pid: int, label: str, blind: Optional[str] = "fail") -> ProcessView:
    """A process whose descriptors were refused, as ``observe.snapshot`` records it."""
    return ProcessView(pid, 1, label, "server", {}, fds_visible=False, user="postgres",
                       fds_error=f"PermissionError reading /proc/{pid}/fd", blind=blind)


class TestBlindChecks:
    """No check passes without seeing: the real unreadable process is in tests/integration/test_cluster_api.py."""

    MESSAGE = observe.BLIND_FAILED.format(process="worker 0", pid=8, user="postgres",
                                          reason="PermissionError reading /proc/8/fd", option=observe.BLIND_OPTION)

    @pytest.mark.parametrize("check", [
        lambda snap: assert_no_close_wait(snap),
        lambda snap: assert_no_fd_leak(snap, snap),
        lambda snap: snap.owner_of(("127.0.0.1", 40000)),
        lambda snap: snap.connections_per_process([("127.0.0.1", 40000)]),
        lambda snap: snap.workers[0].fd_count,
        lambda snap: 9 in snap.workers[0].fds,
    ], ids=["close-wait", "fd leak", "owner_of", "connections_per_process", "fd_count", "fds"])
    def test_judging_an_unreadable_worker_fails_naming_it(self, check) -> None:
        snap = tree(process(7, "master", listener()), blind_process(8, "worker 0"))
        with pytest.raises(ObservationError) as info:
            check(snap)
        assert str(info.value) == self.MESSAGE
        assert (info.value.pid, info.value.label, info.value.user) == (8, "worker 0", "postgres")

    def test_the_master_alone_is_judged_for_holding_clients(self) -> None:
        assert_master_holds_no_clients(tree(process(7, "master", listener()), blind_process(8, "worker 0")))
        with pytest.raises(ObservationError, match=r"cannot see the descriptors of master \(pid 7, user postgres\)"):
            assert_master_holds_no_clients(tree(blind_process(7, "master")))

    def test_skip_is_a_unittest_skip_and_never_a_pass(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(observe, "BLIND", "skip")
        snap = tree(process(7, "master", listener()), blind_process(8, "worker 0", blind=None))
        with pytest.raises(ObservationSkipped) as info:
            assert_no_close_wait(snap)
        assert isinstance(info.value, unittest.SkipTest)
        assert str(info.value).endswith(f"skipped, as {observe.BLIND_OPTION} is skip")

    def test_descriptions_of_an_unreadable_process_do_not_raise(self) -> None:
        before = tree(process(7, "master", listener()))
        after = tree(process(7, "master", listener()), blind_process(8, "worker 0"))
        assert "fds=unreadable" in repr(after.workers[0])
        assert str(after - before) == "worker 0 (pid 8): process appeared (descriptors unreadable)"
        assert [p.pid for p in after.unreadable] == [8]

    def test_an_unknown_mode_is_refused(self) -> None:
        with pytest.raises(ValueError, match="blind checks must be one of"):
            len(blind_process(8, "worker 0", blind="pass").fds)
