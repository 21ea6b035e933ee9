"""Bad input: every malformed frame gets an error frame or a clean close, never a dead worker.

Invariants checked:
- robustness (6): malformed JSON, invalid UTF-8, non-object requests, a missing
  or non-string method, unknown methods, zero-length frames, oversize length
  prefixes and garbage bytes each get an error frame (the connection stays
  usable) or a clean close; no worker dies; other connections are unaffected.
- round trip: Faker-generated valid payloads of every shape come back exactly.
"""

from __future__ import annotations

import random
import struct

import pytest

from pytest_fdcluster import ClientTimeout, ConnectionClosed, RemoteError

ANSWER_TIMEOUT = 5.0


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


# name -> bytes on the wire; each is answered with an error frame and the connection stays usable
RECOVERABLE = {
    "malformed JSON": frame(b'{"in": "ping", "params": '),
    "invalid UTF-8": frame(b'{"in": "ping", "params": "\xff\xfe"}'),
    "array request": frame(b'["ping"]'),
    "number request": frame(b"42"),
    "string request": frame(b'"ping"'),
    "null request": frame(b"null"),
    "missing method": frame(b'{"params": 1}'),
    "non-string method": frame(b'{"in": 7, "params": 1}'),
    "unknown method": frame(b'{"in": "no-such-method", "params": null}'),
    "zero-length frame": frame(b""),
    "random bytes in a frame": frame(random.Random(7).randbytes(64)),
}

# name -> bytes after which the server may close the connection (the stream cannot be resynchronised)
FATAL = {
    "oversize length prefix": struct.pack("<I", 0xFFFFFFF0) + b"x" * 16,
    "HTTP request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
}


@pytest.mark.parametrize("name", list(RECOVERABLE))
def test_bad_frame_gets_error_frame_and_connection_survives(fdcluster, name):
    workers = fdcluster.workers
    with fdcluster.client(ANSWER_TIMEOUT) as bystander, fdcluster.client(ANSWER_TIMEOUT) as client:
        bystander.call("ping", "before")
        client.send_raw(RECOVERABLE[name])
        try:
            reply = client.recv_frame()
        except ConnectionClosed:
            pytest.fail(f"robustness: {name}: the connection was closed instead of answered with an error frame "
                        f"(workers before: {workers}, now: {fdcluster.workers})")
        except ClientTimeout:
            pytest.fail(f"robustness: {name}: no error frame within {ANSWER_TIMEOUT} s (the server hangs)")
        assert isinstance(reply, dict) and reply.get("out") == "error", (
            f"robustness: {name} should get an error frame, got {reply!r}")
        assert client.call("ping", "after") == "after", f"robustness: connection unusable after {name}"
        assert bystander.call("ping", "still") == "still", f"robustness: another connection broke after {name}"
    assert fdcluster.workers == workers, f"robustness: worker died after {name}: {workers} -> {fdcluster.workers}"


@pytest.mark.parametrize("name", list(FATAL))
def test_unframeable_bytes_get_error_or_clean_close(fdcluster, name):
    workers = fdcluster.workers
    with fdcluster.client(ANSWER_TIMEOUT) as bystander, fdcluster.client(ANSWER_TIMEOUT) as client:
        bystander.call("ping", "before")
        client.send_raw(FATAL[name])
        try:
            reply = client.recv_frame()
        except ConnectionClosed:
            reply = None  # a clean close is an acceptable answer
        except ClientTimeout:
            pytest.fail(f"robustness: {name}: no error frame and no close within {ANSWER_TIMEOUT} s (the server hangs)")
        if reply is not None:
            assert reply.get("out") == "error", f"robustness: {name} answered with {reply!r}, expected an error frame"
        assert bystander.call("ping", "still") == "still", f"robustness: another connection broke after {name}"
    assert fdcluster.call("ping", "new") == "new", f"robustness: no new connection served after {name}"
    assert fdcluster.workers == workers, f"robustness: worker died after {name}: {workers} -> {fdcluster.workers}"


def test_unknown_method_is_an_error_not_a_result(fdcluster):
    with pytest.raises(RemoteError):
        fdcluster.call("no-such-method")


@pytest.mark.parametrize("shape", ["scalar", "text", "person", "nested", "list", "large"])
def test_faker_payloads_round_trip_exactly(fdcluster, fdcluster_payloads, shape):
    count = 3 if shape == "large" else 40
    with fdcluster.client(ANSWER_TIMEOUT) as client:
        for params in fdcluster_payloads.many(count, shape):
            echoed = client.call("ping", params)
            assert echoed == params, (
                f"round trip: {shape} payload changed on the way: sent {params!r:.200}, got {echoed!r:.200}")
