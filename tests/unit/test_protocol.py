"""The framing module: every split of the byte stream decodes to the same frames."""

from __future__ import annotations

import json

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
