"""Framing of the length-prefixed JSON RPC, shared by the server and every client.

A frame is a 4-byte unsigned little-endian length followed by that many bytes
of UTF-8 JSON.  A request is ``{"in": METHOD, "params": ANY}``, a response
``{"out": STR, "result": ANY}``; errors are ``{"out": "error", "result": MSG}``.

Pure: no sockets, no I/O.  ``FrameDecoder`` accepts bytes split at any point.

Safe against any input: decoding raises only ``BadRequest`` (malformed JSON or
UTF-8, nesting deeper than the interpreter's recursion limit, ``NaN`` and
``Infinity``, which JSON does not have, a number beyond a double's range, an
integer of more than ``MAX_INT_DIGITS`` digits); encoding a string that holds a
lone surrogate (a ``"\\ud800"`` escape in a request) sends the same escape back
rather than failing; ``error`` always produces a frame.  Duplicate keys in an
object: the last one wins, as in every mainstream JSON parser.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any, Callable, List, Optional, Tuple

HEADER = struct.Struct("<I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB
# Python's own default for int <-> str conversion: int() of n digits costs O(n^2), 7 s for a 1 MB frame of digits.
MAX_INT_DIGITS = 4300

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
_ascii_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def encode_body(body: bytes) -> bytes:
    """Prefix ``body`` with its length, as one buffer so it goes out in one write."""
    return HEADER.pack(len(body)) + body


def encode(message: Any) -> bytes:
    """Serialise ``message`` as a complete frame.

    Raises ``TypeError``, ``ValueError`` (NaN, infinity) or ``RecursionError`` for
    what JSON cannot carry.  A lone surrogate has no UTF-8 form: such a message
    goes out ASCII-escaped (``"\\ud800"``), the form the client used to send it.
    """
    text = _encoder.encode(message)
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        body = _ascii_encoder.encode(message).encode("ascii")
    return encode_body(body)


def request(method: str, params: Any = None) -> bytes:
    """A complete request frame."""
    return encode({"in": method, "params": params})


def response(out: str, result: Any) -> bytes:
    """A complete response frame."""
    return encode({"out": out, "result": result})


def error(message: str) -> bytes:
    """A complete error frame; never raises, whatever ``message`` holds."""
    return response(OUT_ERROR, str(message))


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON value")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise BadRequest(f"number {text[:32]}{'...' if len(text) > 32 else ''} is out of range")
    return value


def _parse_bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"integer of {len(text)} digits exceeds the limit of {MAX_INT_DIGITS}")
    return int(text)


def _json_decoder(parse_int: Optional[Callable[[str], Any]]) -> json.JSONDecoder:
    # Only floats and the NaN/Infinity literals pay for a Python callback; the rest stays in the C scanner.
    return json.JSONDecoder(parse_float=_parse_float, parse_int=parse_int, parse_constant=_reject_constant)


_decoder = _json_decoder(None)
_bounded_decoder = _json_decoder(_parse_bounded_int)  # for an interpreter whose own limit is off or too high
_int_digit_limit: Callable[[], int] = getattr(sys, "get_int_max_str_digits", lambda: 0)  # 0: no limit


def decode_body(body: bytes) -> Any:
    """Parse a frame body as UTF-8 JSON, raising ``BadRequest`` (and only that) with a readable reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"invalid UTF-8 at byte {exc.start}") from None
    limit = _int_digit_limit()
    decoder = _decoder if 0 < limit <= MAX_INT_DIGITS else _bounded_decoder
    try:
        return decoder.decode(text)
    except BadRequest:
        raise
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None


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
        """Bytes held back: an incomplete frame, and complete ones not yet returned under a ``limit``."""
        return len(self._buffer)

    @property
    def complete(self) -> bool:
        """Whether a complete frame (or an oversize prefix) is held back, waiting for ``feed``."""
        buffer = self._buffer
        if self.failure is not None or len(buffer) < HEADER_SIZE:
            return False
        (length,) = HEADER.unpack_from(buffer)
        return length > self.max_frame or len(buffer) >= HEADER_SIZE + length

    def feed(self, data: bytes = b"", limit: int = 0) -> List[bytes]:
        """Append ``data`` and return every frame body it completes, in order.

        With ``limit``, return at most that many and keep the rest buffered:
        ``feed(b"", limit)`` returns the next ones (a server stops decoding once a
        connection's output is large, and resumes when it drains).

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
            if len(bodies) == limit:
                break
        if offset:
            del buffer[:offset]
        return bodies
