"""Unit tests of pytest_fdcluster.histogram.Histogram: precision, percentiles, merging, bounded memory."""

from __future__ import annotations

import math
import pickle
import random

import pytest

from pytest_fdcluster.histogram import Histogram

#: Relative error a reported value may have: half a bucket is under 0.4 %, ~1 % is the promise.
PRECISION = 0.01


def exact_percentile(values, q):
    """The nearest-rank percentile of ``values``, the definition Histogram approximates."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def filled(values):
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    return histogram


class TestEmpty:
    def test_an_empty_histogram_has_no_figures(self):
        histogram = Histogram()
        assert histogram.count == 0
        assert len(histogram) == 0
        assert math.isnan(histogram.percentile(50))
        assert math.isnan(histogram.mean)
        assert repr(histogram) == "<Histogram empty>"

    def test_percentile_outside_0_100_is_rejected(self):
        with pytest.raises(ValueError, match="within 0..100"):
            Histogram().percentile(101)
        with pytest.raises(ValueError, match="within 0..100"):
            Histogram().percentile(-1)


class TestPrecision:
    @pytest.mark.parametrize("value", [3e-9, 1e-6, 7.3e-6, 1e-4, 0.000123, 0.0019, 0.05, 0.5, 1.0, 3.7, 100.0, 2000.0])
    def test_a_bucket_stands_for_its_values_within_one_percent(self, value):
        represented = Histogram.bucket_value(Histogram.bucket_of(value))
        assert abs(represented - value) / value < PRECISION / 2

    def test_every_bucket_boundary_maps_back_to_its_bucket(self):
        # The middle of every bucket falls into that same bucket: no gaps, no overlaps.
        for index in range(Histogram.BUCKETS):
            assert Histogram.bucket_of(Histogram.bucket_value(index)) == index

    def test_percentiles_match_the_exact_ones_within_one_percent(self):
        rng = random.Random(1234)
        values = [rng.lognormvariate(math.log(200e-6), 1.0) for _ in range(20000)]
        histogram = filled(values)
        for q in (1, 10, 50, 90, 99, 99.9):
            exact = exact_percentile(values, q)
            assert abs(histogram.percentile(q) - exact) / exact < PRECISION, f"p{q}"

    def test_min_max_and_mean_are_exact(self):
        values = [0.25e-3, 1.5e-3, 7e-3, 0.4]
        histogram = filled(values)
        assert histogram.percentile(0) == histogram.min == min(values)
        assert histogram.percentile(100) == histogram.max == max(values)
        assert histogram.mean == pytest.approx(sum(values) / len(values))

    def test_one_value_is_every_percentile(self):
        histogram = filled([0.0042])
        assert {histogram.percentile(q) for q in (0, 1, 50, 99.9, 100)} == {0.0042}


class TestPercentiles:
    def test_percentiles_never_decrease_with_q(self):
        rng = random.Random(99)
        histogram = filled(rng.expovariate(1000.0) for _ in range(5000))
        qs = [0, 0.1, 1, 5, 25, 50, 75, 90, 95, 99, 99.9, 99.99, 100]
        values = [histogram.percentile(q) for q in qs]
        assert values == sorted(values)
        assert histogram.percentiles([50, 99]) == {50: histogram.percentile(50), 99: histogram.percentile(99)}

    def test_percentiles_stay_within_min_and_max(self):
        histogram = filled([1.001e-3, 1.002e-3, 1.003e-3])
        for q in (1, 50, 99):
            assert histogram.min <= histogram.percentile(q) <= histogram.max


class TestMerge:
    def test_merging_equals_recording_everything_in_one(self):
        rng = random.Random(7)
        first = [rng.uniform(1e-5, 1e-2) for _ in range(3000)]
        second = [rng.uniform(1e-3, 1.0) for _ in range(2000)]
        merged = filled(first).merge(filled(second))
        together = filled(first + second)
        assert merged.count == together.count == 5000
        assert list(merged.counts) == list(together.counts)
        assert merged.min == together.min and merged.max == together.max
        assert merged.mean == pytest.approx(together.mean)
        for q in (50, 90, 99, 99.9):
            assert merged.percentile(q) == together.percentile(q)

    def test_merging_an_empty_histogram_changes_nothing(self):
        histogram = filled([0.001, 0.002])
        before = (list(histogram.counts), histogram.count, histogram.min, histogram.max)
        histogram.merge(Histogram())
        assert (list(histogram.counts), histogram.count, histogram.min, histogram.max) == before
        empty = Histogram().merge(histogram)
        assert empty.count == 2 and empty.min == 0.001 and empty.max == 0.002

    def test_a_histogram_survives_pickling(self):
        # Processes of the load generator send their histograms back pickled.
        histogram = filled([0.001, 0.003, 0.25])
        copy = pickle.loads(pickle.dumps(histogram))
        assert list(copy.counts) == list(histogram.counts)
        assert (copy.count, copy.min, copy.max, copy.total) == \
            (histogram.count, histogram.min, histogram.max, histogram.total)


class TestBoundedMemory:
    def test_extreme_values_are_clamped_into_the_fixed_buckets(self):
        histogram = filled([0.0, -1.0, 1e-15, 1e6, 5e-4])
        assert len(histogram.counts) == Histogram.BUCKETS
        assert histogram.count == 5
        assert histogram.min == -1.0 and histogram.max == 1e6  # exact, though clamped in buckets
        assert histogram.counts[0] == 3 and histogram.counts[Histogram.BUCKETS - 1] == 1

    def test_many_records_use_no_more_buckets(self):
        rng = random.Random(3)
        histogram = filled(rng.uniform(0, 2) for _ in range(50000))
        assert len(histogram.counts) == Histogram.BUCKETS
        assert sum(histogram.counts) == histogram.count == 50000
