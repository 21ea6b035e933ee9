"""Partial reads: a frame is a frame however the bytes arrive.

Invariants checked:
- framing: a frame split at every byte position, sent byte by byte, with its
  prefix apart from its body, or coalesced with many others in one write, is
  answered exactly once, in order;
- robustness (6): a truncated frame followed by close leaves the worker
  serving; a half-closed connection (SHUT_WR after the request) still gets its
  answer, then a clean close; frames near the 1 MiB maximum round-trip.
"""

from __future__ import annotations

import json

from pytest_fdcluster import faults, protocol

PIECE_DELAY = 0.002  # part of the fault: gives each piece its own segment and read


def test_frame_split_at_every_byte_position(fdcluster):
    request = protocol.request("ping", {"split": "日本語 ✓"})
    with fdcluster.client() as client:
        for position in range(1, len(request)):
            faults.send_in_pieces(client, request, [position], delay=PIECE_DELAY)
            reply = client.recv_frame()
            assert reply == {"out": "pong", "result": {"split": "日本語 ✓"}}, (
                f"framing: frame split at byte {position} of {len(request)} answered with {reply!r}")


def test_byte_by_byte_with_delays(fdcluster):
    with fdcluster.client() as client:
        faults.byte_by_byte(client, protocol.request("ping", "trickle"), delay=PIECE_DELAY)
        assert client.recv_frame() == {"out": "pong", "result": "trickle"}, "framing: byte-by-byte frame"


def test_prefix_apart_from_body(fdcluster):
    with fdcluster.client() as client:
        faults.send_in_pieces(client, protocol.request("ping", "prefix"), [4], delay=0.05)
        assert client.recv_frame() == {"out": "pong", "result": "prefix"}, "framing: prefix sent apart from body"


def test_pipelined_frames_in_one_write(fdcluster):
    count = 300
    with fdcluster.client() as client:
        client.send_raw(b"".join(protocol.request("ping", i) for i in range(count)))
        results = [client.recv_frame()["result"] for _ in range(count)]
    assert results == list(range(count)), "framing: pipelined frames answered out of order or lost"


def test_coalesced_frame_boundaries_inside_reads(fdcluster):
    stream = b"".join(protocol.request("ping", "x" * n) for n in range(50))
    with fdcluster.client() as client:
        faults.send_in_pieces(client, stream, list(range(7, len(stream), 97)), delay=PIECE_DELAY)
        results = [client.recv_frame()["result"] for _ in range(50)]
    assert results == ["x" * n for n in range(50)], "framing: frames straddling read boundaries"


def test_truncated_frame_then_close(fdcluster):
    workers = fdcluster.workers
    for keep in (1, 3, 4, 10):
        faults.truncate_and_close(fdcluster.address, protocol.request("ping", "cut short"), keep=keep)
    assert fdcluster.call("ping", "next") == "next", "robustness: not serving after truncated frames"
    assert fdcluster.workers == workers, (
        f"robustness: a worker died on a truncated frame: {workers} -> {fdcluster.workers}")


def test_half_close_gets_answer_then_eof(fdcluster):
    reply = faults.half_close_request(fdcluster.address, "ping", "half")
    assert reply == {"out": "pong", "result": "half"}, f"robustness: half-closed request answered with {reply!r}"


def test_frames_near_the_maximum(fdcluster):
    envelope = len(protocol.request("ping", "")) - protocol.HEADER_SIZE
    for size in (protocol.DEFAULT_MAX_FRAME - 1024, protocol.DEFAULT_MAX_FRAME):
        params = "é" * ((size - envelope) // 2)  # two UTF-8 bytes each
        request = protocol.request("ping", params)
        assert len(request) - protocol.HEADER_SIZE <= protocol.DEFAULT_MAX_FRAME
        with fdcluster.client(timeout=20) as client:
            client.send_raw(request)
            reply = client.recv_frame()
        assert reply.get("result") == params, (
            f"robustness: a {len(request) - 4}-byte frame (limit {protocol.DEFAULT_MAX_FRAME}) answered with "
            f"{json.dumps(reply)[:120]}")
