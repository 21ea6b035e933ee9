"""Unit tests of pytest_fdcluster.hostile: the cases are what they claim, replayable, and judged by meaning."""

from __future__ import annotations

import struct
import time

import pytest

from pytest_fdcluster import hostile
from pytest_fdcluster.hostile import (
    CLOSED,
    EITHER,
    FATAL,
    NO_REPLY,
    OPEN,
    RECOVERABLE,
    RESET,
    TIMEOUT,
    HostileCase,
    Observed,
    judge,
)

ONE_MIB = 1 << 20
ERROR = {"out": "error", "result": "malformed JSON"}


def declared_length(frame: bytes) -> int:
    return struct.unpack_from("<I", frame)[0]


class TestNamedCases:
    def test_every_class_is_present(self):
        names = {case.case_id.split("/")[0] for case in hostile.named_cases()}
        assert names == set(hostile.CLASSES)
        assert {"deep-nesting", "huge-numbers", "lone-surrogates", "non-finite", "duplicate-keys", "wrong-types",
                "invalid-utf8", "truncated-utf8", "empty-body", "bom", "oversized-length", "lying-length"} <= names

    def test_recoverable_frames_are_complete_and_under_the_maximum(self):
        for case in hostile.named_cases():
            if case.expected == RECOVERABLE:
                assert declared_length(case.frame) == len(case.frame) - 4 < ONE_MIB, case.case_id
                assert not case.half_close, case.case_id

    def test_fatal_frames_lie_about_their_length_or_exceed_the_maximum(self):
        fatal = [c for c in hostile.named_cases() if c.expected == FATAL]
        lengths = {declared_length(c.frame) for c in fatal}
        assert {ONE_MIB + 1, 0xFFFFFFFF} <= lengths
        for case in fatal:
            assert len(case.frame) < 16, f"{case.case_id}: only a header and a few bytes are sent"
            lies = case.half_close and declared_length(case.frame) > len(case.frame) - 4
            assert declared_length(case.frame) > ONE_MIB or lies, case.case_id

    def test_the_issue_examples_are_there(self):
        bodies = {c.frame[4:] for c in hostile.named_cases()}
        for body in (b"[" * 100_000 + b"]" * 100_000, b"1e999999", b'{"in":"\\ud800"}', b"\xed\xa0\x80", b"NaN",
                     b'{"in":"ping","in":"x"}', b'{"in":5}', b"[]", b"null", b'{"params":1}', b""):
            assert any(body in b for b in bodies), body
        assert any(len(b) > 100_000 and b.strip(b"1-0") == b"" for b in bodies), "10**100000 as digits"


class TestFuzzCorpus:
    def test_deterministic_per_seed(self):
        assert list(hostile.fuzz_corpus(11, 500)) == list(hostile.fuzz_corpus(11, 500))
        assert list(hostile.fuzz_corpus(11, 500)) != list(hostile.fuzz_corpus(12, 500))

    def test_any_case_regenerates_on_its_own(self):
        corpus = list(hostile.fuzz_corpus(5, 300))
        for index in (0, 17, 299):
            assert hostile.fuzz_case(5, index) == corpus[index]

    def test_count_ids_and_every_mutation(self):
        corpus = list(hostile.fuzz_corpus(3))
        assert len(corpus) == 10_000 and len({c.case_id for c in corpus}) == 10_000
        assert {c.case_id.split(":")[2] for c in corpus} == set(hostile._MUTATIONS)
        assert all(c.case_id.startswith("3:") and c.case_id.isprintable() for c in corpus)

    def test_recoverable_frames_are_complete_and_under_the_maximum(self):
        for case in hostile.fuzz_corpus(9, 3000):
            if case.expected == RECOVERABLE:
                assert declared_length(case.frame) == len(case.frame) - 4 < ONE_MIB, case.case_id

    def test_mutants_never_name_a_real_method(self):
        for case in hostile.fuzz_corpus(2, 3000):
            if ":named:" not in case.case_id:
                assert b'"ping"' not in case.frame, case.case_id

    def test_ten_thousand_frames_are_fast(self):
        started = time.perf_counter()
        frames = sum(1 for _ in hostile.fuzz_corpus(1))
        elapsed = time.perf_counter() - started
        assert frames == 10_000
        assert elapsed < 3.0, f"10,000 frames took {elapsed:.2f} s (about 0.2 s unloaded)"

    def test_replay_hint_is_one_line_with_seed_and_case(self):
        case = hostile.fuzz_case(42, 7)
        hint = hostile.replay_hint(42, case.case_id)
        assert "\n" not in hint and f"{hostile.SEED_VARIABLE}=42" in hint and case.case_id in hint
        assert "fuzz_case(42, 7)" in hint
        named = hostile.replay_hint(42, "deep-nesting/1")
        assert "deep-nesting/1" in named and "named_cases()" in named and "fuzz_case" not in named


class TestJudge:
    @pytest.mark.parametrize("reply, is_error", [
        ({"out": "error", "result": "x"}, True), ({"out": "bad-request"}, True), ({"out": "pong", "result": 1}, False),
        ({"out": "ok"}, False), ({"result": "no out"}, False), ({"out": 5}, False), ([], False), (b"\xff", False),
    ])
    def test_error_frame_by_meaning(self, reply, is_error):
        assert hostile.is_error_frame(reply) is is_error

    def test_recoverable_passes_with_an_error_and_a_usable_connection(self):
        assert judge("c", RECOVERABLE, Observed(ERROR, OPEN, usable=True)) is None
        assert judge("c", RECOVERABLE, Observed(ERROR, OPEN)) is None  # usability not probed

    @pytest.mark.parametrize("observed, words", [
        (Observed(NO_REPLY, CLOSED), "no reply, and the connection was closed"),
        (Observed(NO_REPLY, TIMEOUT), "neither answered nor closed"),
        (Observed(ERROR, CLOSED), "'out': 'error', 'result': 'malformed JSON'}, then the connection was closed"),
        (Observed(ERROR, OPEN, usable=False), "then no answer to a ping"),
        (Observed({"out": "pong", "result": None}, OPEN, usable=True), "not an error frame"),
        (Observed(b"garbage", OPEN), "unparseable reply"),
        (Observed(ERROR, OPEN, usable=True, died=("worker 1 pid 42",)), "death of worker 1 pid 42"),
    ])
    def test_recoverable_failures_say_what_happened(self, observed, words):
        message = judge("deep-nesting/1", RECOVERABLE, observed)
        assert message is not None and message.startswith("hostile input: case deep-nesting/1: expected an error frame")
        assert words in message

    def test_fatal_passes_with_a_clean_close(self):
        assert judge("c", FATAL, Observed(NO_REPLY, CLOSED)) is None
        assert judge("c", FATAL, Observed(ERROR, CLOSED)) is None

    @pytest.mark.parametrize("observed, words", [
        (Observed(ERROR, OPEN), "was left open"),
        (Observed(NO_REPLY, RESET), "reset (not a clean close)"),
        (Observed(NO_REPLY, TIMEOUT), "neither answered nor closed"),
        (Observed({"out": "pong"}, CLOSED), "not an error frame"),
        (Observed(NO_REPLY, CLOSED, died=("master pid 7",)), "death of master pid 7"),
    ])
    def test_fatal_failures_say_what_happened(self, observed, words):
        message = judge("oversized-length/2", FATAL, observed)
        assert message is not None and message.startswith("hostile input: case oversized-length/2: expected at most")
        assert words in message


class TestDuplicateKeys:
    """``{"in":"ping","in":"x"}``: a first-wins parser answers pong, a last-wins one an error; both are correct."""

    def test_only_the_ping_case_is_ambiguous(self):
        cases = {c.frame[4:]: c.expected for c in hostile.named_cases() if c.case_id.startswith("duplicate-keys/")}
        assert cases[b'{"in":"ping","in":"x"}'] == EITHER
        assert set(cases.values()) == {EITHER, RECOVERABLE}
        assert all(b'"ping"' not in body for body, expected in cases.items() if expected == RECOVERABLE)

    @pytest.mark.parametrize("reply", [ERROR, {"out": "pong", "result": None}])
    def test_first_wins_and_last_wins_both_pass(self, reply):
        assert judge("duplicate-keys/0", EITHER, Observed(reply, OPEN, usable=True)) is None

    @pytest.mark.parametrize("observed, words", [
        (Observed(b"\xff", OPEN, usable=True), "neither an error frame nor an answer"),
        (Observed([1], OPEN, usable=True), "neither an error frame nor an answer"),
        (Observed(NO_REPLY, CLOSED), "no reply, and the connection was closed"),
        (Observed({"out": "pong"}, OPEN, usable=False), "then no answer to a ping"),
        (Observed({"out": "pong"}, OPEN, usable=True, died=("worker 0 pid 9",)), "death of worker 0 pid 9"),
    ])
    def test_garbage_a_close_or_a_death_fail(self, observed, words):
        message = judge("duplicate-keys/0", EITHER, observed)
        assert message is not None and message.startswith("hostile input: case duplicate-keys/0: expected an error")
        assert words in message


class TestAgainstLimit:
    def test_the_reference_limit_changes_nothing(self):
        for case in hostile.named_cases():
            assert hostile.against_limit(case, ONE_MIB) == case, case.case_id

    def test_a_smaller_limit_makes_big_complete_frames_fatal(self):
        deep = next(c for c in hostile.named_cases() if c.case_id == "deep-nesting/1")  # 200,000 bytes
        assert hostile.against_limit(deep, 1000).expected == FATAL
        small = next(c for c in hostile.named_cases() if c.case_id == "empty-body/0")
        assert hostile.against_limit(small, 1000) == small

    def test_a_larger_limit_drops_prefixes_that_are_only_incomplete_there(self):
        oversized = [c for c in hostile.named_cases() if c.case_id.startswith("oversized-length/")]
        kept = [hostile.against_limit(c, 16 * ONE_MIB) for c in oversized]
        assert [c.case_id for c in kept if c is not None] == ["oversized-length/1", "oversized-length/2"]
        lying = HostileCase("lying", struct.pack("<I", 10) + b"{", FATAL, half_close=True)
        assert hostile.against_limit(lying, 16 * ONE_MIB) == lying  # EOF in mid-frame is fatal under any limit
