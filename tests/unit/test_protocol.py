"""The framing module: every split of the byte stream decodes to the same frames."""

from __future__ import annotations

import json
import random
import sys
import time

import pytest

from fdcluster_server import protocol


def frames(*messages):
    return b"".join(protocol.encode(m) for m in messages)


class TestEncode:
    def test_prefix_is_little_endian_length_of_utf8_body(self):
        data = protocol.encode({"in": "ping", "params": "日本"})
        (length,) = protocol.HEADER.unpack_from(data)
        assert length == len(data) - 4
        assert json.loads(data[4:].decode("utf-8")) == {"in": "ping", "params": "日本"}

    def test_error_frame_shape(self):
        body = protocol.error("boom")[4:]
        assert json.loads(body) == {"out": "error", "result": "boom"}


class TestDecoder:
    def test_split_at_every_byte_position(self):
        stream = frames({"in": "a", "params": 1}, {"in": "b", "params": [1, 2]})
        for cut in range(len(stream) + 1):
            decoder = protocol.FrameDecoder()
            bodies = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
            assert [json.loads(b)["in"] for b in bodies] == ["a", "b"], f"cut at {cut}"
            assert decoder.pending == 0

    def test_byte_by_byte(self):
        stream = frames({"in": "ping", "params": {"x": "é" * 10}})
        decoder = protocol.FrameDecoder()
        bodies = [b for i in range(len(stream)) for b in decoder.feed(stream[i : i + 1])]
        assert len(bodies) == 1

    def test_pipelined_frames_in_one_feed(self):
        decoder = protocol.FrameDecoder()
        assert len(decoder.feed(frames(*({"in": "ping", "params": i} for i in range(100))))) == 100

    def test_zero_length_frame_is_an_empty_body(self):
        assert protocol.FrameDecoder().feed(b"\0\0\0\0") == [b""]

    def test_truncated_frame_stays_pending(self):
        decoder = protocol.FrameDecoder()
        assert decoder.feed(protocol.encode({"in": "ping"})[:-1]) == []
        assert decoder.pending > 0

    def test_oversize_prefix_sets_failure_and_keeps_earlier_frames(self):
        decoder = protocol.FrameDecoder(max_frame=10)
        bodies = decoder.feed(protocol.encode_body(b"12345") + protocol.HEADER.pack(11) + b"x")
        assert bodies == [b"12345"]
        assert isinstance(decoder.failure, protocol.FrameTooLarge)
        assert "11 bytes exceeds the maximum of 10" in str(decoder.failure)
        assert decoder.feed(b"more") == []


class TestParseRequest:
    @pytest.mark.parametrize(
        "body, message",
        [
            (b"{nope", "malformed JSON"),
            (b"\xff\xfe", "invalid UTF-8 at byte 0"),
            (b"[1, 2]", "must be a JSON object, got list"),
            (b'{"params": 1}', 'string "in" field'),
            (b"", "malformed JSON"),
        ],
    )
    def test_bad_requests_say_why(self, body, message):
        with pytest.raises(protocol.BadRequest, match=message.replace("[", r"\[")):
            protocol.parse_request(body)

    def test_valid_request(self):
        assert protocol.parse_request(b'{"in": "ping", "params": [1]}') == ("ping", [1])


class TestHostileBodies:
    """Decoding raises BadRequest and nothing else; a reply to what decoded always encodes."""

    @pytest.mark.parametrize(
        "body, message",
        [
            (b"[" * 1024, "nested too deeply"),
            (b'{"in": "ping", "params": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
            (b'{"a": ' * 5000, "nested too deeply"),
            (b"1e999999", "number 1e999999 is out of range"),
            (b'{"in": "ping", "params": -1e400}', "number -1e400 is out of range"),
            (b"NaN", "NaN is not a JSON value"),
            (b'{"in": "ping", "params": [Infinity]}', "Infinity is not a JSON value"),
            (b'{"in": "ping", "params": -Infinity}', "-Infinity is not a JSON value"),
            (b"9" * 5000, "4300"),
            (b"\xed\xa0\x80", "invalid UTF-8 at byte 0"),  # a surrogate encoded as UTF-8: not UTF-8
            (b'"\xc0\xaf"', "invalid UTF-8 at byte 1"),  # overlong
            (b"\xef\xbb\xbf{}", "malformed JSON"),  # a byte-order mark
            (b'{"in": "ping"} {"in": "ping"}', "malformed JSON"),  # two documents in one frame
        ],
    )
    def test_hostile_body_is_a_bad_request(self, body, message):
        with pytest.raises(protocol.BadRequest, match=message.replace("[", r"\[")):
            protocol.parse_request(body)

    def test_huge_integer_rejected_even_with_the_interpreter_limit_off(self):
        set_limit = getattr(sys, "set_int_max_str_digits", None)
        if set_limit is None:
            pytest.skip("this Python has no int_max_str_digits")
        saved = sys.get_int_max_str_digits()
        set_limit(0)
        try:
            start = time.monotonic()
            with pytest.raises(protocol.BadRequest, match="integer of 1000000 digits exceeds the limit of 4300"):
                protocol.decode_body(b"9" * 1_000_000)
            assert time.monotonic() - start < 0.5, "the digit count is checked before int() does O(n^2) work"
            assert protocol.decode_body(b"-" + b"9" * 4300) == -int("9" * 4300)
        finally:
            set_limit(saved)

    def test_small_and_large_finite_numbers_decode(self):
        assert protocol.decode_body(b"[1e308, -1e-999, 0.5, 12345678901234567890]") == [
            1e308, -0.0, 0.5, 12345678901234567890,
        ]

    def test_duplicate_keys_last_one_wins(self):
        assert protocol.parse_request(b'{"in": "boom", "in": "ping", "params": 1}') == ("ping", 1)

    def test_lone_surrogate_decodes_and_echoes_escaped(self):
        method, params = protocol.parse_request(b'{"in": "ping", "params": "a\\ud800b"}')
        assert params == "a\ud800b"
        frame = protocol.response("pong", params)
        assert frame[4:] == b'{"out":"pong","result":"a\\ud800b"}', "the same escape the client sent"
        assert protocol.decode_body(frame[4:])["result"] == params

    def test_valid_unicode_stays_utf8_next_to_nothing_odd(self):
        assert protocol.response("pong", "é日")[4:].decode("utf-8") == '{"out":"pong","result":"é日"}'

    @pytest.mark.parametrize("message", ["x\udfffy", "\ud800", "ok"])
    def test_error_frame_always_encodes(self, message):
        body = protocol.error(message)[4:]
        assert protocol.decode_body(body) == {"out": "error", "result": message}

    def test_random_bytes_raise_only_bad_request(self):
        rng = random.Random(1234)
        alphabet = b'{}[]",:0123456789.eE+-truefalsnNI\\u "\xff\xed\xa0\x80'
        for _ in range(3000):
            body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(40)))
            try:
                message = protocol.decode_body(body)
            except protocol.BadRequest:
                continue
            assert protocol.decode_body(protocol.response("pong", message)[4:])["result"] == message, body


class TestDecoderLimit:
    def test_limit_returns_the_rest_on_the_next_feed(self):
        decoder = protocol.FrameDecoder()
        stream = frames(*({"in": "ping", "params": i} for i in range(10)))
        first = decoder.feed(stream, limit=4)
        assert len(first) == 4 and decoder.complete
        assert len(decoder.feed(limit=4)) == 4
        assert len(decoder.feed(limit=4)) == 2
        assert not decoder.complete and decoder.pending == 0

    def test_complete_is_false_for_a_partial_frame_and_true_for_an_oversize_prefix(self):
        decoder = protocol.FrameDecoder(max_frame=10)
        assert decoder.feed(protocol.HEADER.pack(5) + b"123", limit=1) == []
        assert not decoder.complete and decoder.pending == 7
        assert decoder.feed(b"45" + protocol.encode_body(b"6") + protocol.HEADER.pack(11), limit=1) == [b"12345"]
        assert decoder.complete, "a whole frame is held back"
        assert decoder.feed(limit=1) == [b"6"]
        assert decoder.complete, "the oversize prefix is still to be seen"
        assert decoder.feed(limit=1) == [] and isinstance(decoder.failure, protocol.FrameTooLarge)
        assert not decoder.complete
