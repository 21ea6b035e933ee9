"""Framing of the length-prefixed JSON RPC, shared by the server and every client.

A frame is a 4-byte unsigned little-endian length followed by that many bytes
of UTF-8 JSON.  A request is ``{"in": METHOD, "params": ANY}``, a response
``{"out": STR, "result": ANY}``; errors are ``{"out": "error", "result": MSG}``.

Pure: no sockets, no I/O.  ``FrameDecoder`` accepts bytes split at any point.
"""

from __future__ import annotations

import json
import struct
from typing import Any, List, Tuple

HEADER = struct.Struct("<I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB

OUT_ERROR = "error"
OUT_PONG = "pong"


class ProtocolError(ValueError):
    """A frame or request that cannot be served; the message is sent to the peer."""


class FrameTooLarge(ProtocolError):
    """A length prefix above the limit: the stream cannot be resynchronised, so close it."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the maximum of {limit} bytes")
        self.length = length
        self.limit = limit


class BadRequest(ProtocolError):
    """A well-framed body that is not a valid request; the connection stays usable."""


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_body(body: bytes) -> bytes:
    """Prefix ``body`` with its length, as one buffer so it goes out in one write."""
    return HEADER.pack(len(body)) + body


def encode(message: Any) -> bytes:
    """Serialise ``message`` as a complete frame."""
    return encode_body(_encoder.encode(message).encode("utf-8"))


def request(method: str, params: Any = None) -> bytes:
    """A complete request frame."""
    return encode({"in": method, "params": params})


def response(out: str, result: Any) -> bytes:
    """A complete response frame."""
    return encode({"out": out, "result": result})


def error(message: str) -> bytes:
    """A complete error frame."""
    return response(OUT_ERROR, message)


def decode_body(body: bytes) -> Any:
    """Parse a frame body as UTF-8 JSON, raising ``BadRequest`` with a readable reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"invalid UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def parse_request(body: bytes) -> Tuple[str, Any]:
    """Return ``(method, params)`` of a request body or raise ``BadRequest``."""
    message = decode_body(body)
    if not isinstance(message, dict):
        raise BadRequest(f"request must be a JSON object, got {type(message).__name__}")
    method = message.get("in")
    if not isinstance(method, str):
        raise BadRequest('request needs a string "in" field naming the method')
    return method, message.get("params")


class FrameDecoder:
    """Incremental decoder: feed any bytes, get complete frame bodies back."""

    __slots__ = ("max_frame", "failure", "_buffer")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        #: Set once a length prefix above ``max_frame`` is seen; the stream is then dead.
        self.failure: FrameTooLarge | None = None
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[bytes]:
        """Append ``data`` and return every frame body it completes, in order.

        When a length prefix above the limit is seen, decoding stops for good:
        the frames completed before it are still returned, ``failure`` is set,
        and the caller answers them, sends an error frame and closes.
        """
        if self.failure is not None:
            return []
        buffer = self._buffer
        buffer += data
        bodies: List[bytes] = []
        offset = 0
        available = len(buffer)
        while available - offset >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(buffer, offset)
            if length > self.max_frame:
                self.failure = FrameTooLarge(length, self.max_frame)
                del buffer[:]
                return bodies
            end = offset + HEADER_SIZE + length
            if end > available:
                break
            bodies.append(bytes(buffer[offset + HEADER_SIZE : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return bodies
