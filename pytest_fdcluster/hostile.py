"""Hostile frames for the bad-input invariant: named classes and a seeded fuzz corpus, replayable.

Every case is a ``HostileCase``: an id, the bytes to send (a complete frame,
4-byte little-endian length + body, except where the length itself is the
attack), and the outcome a correct server must produce:

- ``RECOVERABLE``: answer with an error frame and keep the connection usable
  (a following ``ping`` is answered with ``pong``);
- ``FATAL``: the stream cannot be resynchronised (a length above the maximum
  frame, a length that lies and then the client half-closes): the server may
  answer with an error frame, then must close the connection cleanly (EOF, not
  a reset, not left open);
- ``EITHER``: a request JSON leaves ambiguous, where a correct server may answer
  or refuse: any reply with a string ``"out"``, and a usable connection.  The
  one such case is the duplicate key the issue names, ``{"in":"ping","in":"x"}``:
  RFC 8259 leaves duplicate names to the parser, first-wins parsers answer
  ``pong``, last-wins ones (Python's, V8's) call "x" and get an error frame.

Under both, no process of the server may die.  Cases are built so that no
correct server can answer them with success, whatever its JSON parser's
leniencies: the hostile part is the whole body, the method name, or stands in
for a missing ``"in"``; fuzz mutants start from a request for a method no
server has (``NO_SUCH_METHOD``), so a mutation can only make it worse.  Hence a
leading byte order mark before a valid request is not a case (RFC 8259 lets a
parser ignore it), and duplicate keys never pair a real method with another
value except in the case the issue names (``EITHER`` above).

The cases assume the reference's maximum frame (``MAX_FRAME``, 1 MiB);
``against_limit`` restates a case for a target that declares another.

``judge`` decides by meaning: a reply is an error frame when it is a JSON object
whose ``"out"`` is a string other than a success value (``SUCCESS_OUTS``: the
reference's "pong", "echo", "whoami", "ok"); the protocol's own word is
"error", but a target saying "bad-request" counts too.

Pure: builds bytes and judges observations; sending them is the scenario's job.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

__all__ = [
    "CLASSES",
    "EITHER",
    "FATAL",
    "SEED_VARIABLE",
    "RECOVERABLE",
    "SUCCESS_OUTS",
    "HostileCase",
    "Observed",
    "against_limit",
    "fuzz_case",
    "fuzz_corpus",
    "is_error_frame",
    "judge",
    "named_cases",
    "replay_hint",
]

RECOVERABLE = "recoverable"
FATAL = "fatal"
EITHER = "error-or-answer"
#: The environment variable that fixes the fuzz corpus's seed, to replay a failure.
SEED_VARIABLE = "FDCLUSTER_HOSTILE_SEED"
SUCCESS_OUTS = frozenset({"pong", "echo", "whoami", "ok"})
MAX_FRAME = 1 << 20  # the reference's default; RECOVERABLE frames stay under it
NO_SUCH_METHOD = "fdcluster.hostile.no-such-method"

# How a connection stands after the case: the judge's vocabulary.
OPEN = "open"
CLOSED = "closed"  # clean EOF from the server
RESET = "reset"
TIMEOUT = "timeout"  # neither an answer nor a close within the deadline

_HEADER = struct.Struct("<I")


class HostileCase(NamedTuple):
    """One hostile input: send ``frame``, then half-close the connection if ``half_close``."""

    case_id: str
    frame: bytes
    expected: str
    half_close: bool = False


class Observed(NamedTuple):
    """What the client saw after sending a case.

    ``reply``: the first reply frame's body parsed as JSON, ``NO_REPLY`` if none
    came, or the raw bytes if it did not parse.  ``end``: OPEN, CLOSED, RESET or
    TIMEOUT.  ``usable``: whether a following ping was answered (None: not
    tried).  ``died``: labels of server processes that died meanwhile.
    """

    reply: Any
    end: str
    usable: Optional[bool] = None
    died: Tuple[str, ...] = ()


NO_REPLY: Any = object()


def _frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


def _text(*bodies: str) -> List[bytes]:
    return [b.encode("utf-8", "surrogatepass") for b in bodies]


def _deep_nesting() -> List[bytes]:
    return [
        b"[" * 1000 + b"]" * 1000,
        b"[" * 100_000 + b"]" * 100_000,
        b"[" * 100_000,
        b'{"a":' * 1000 + b"1" + b"}" * 1000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"in":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ]


def _huge_numbers() -> List[bytes]:
    digits = "1" + "0" * 100_000  # 10**100000
    return _text("1e999999", '{"in":1e999999}', '{"in":-1e999999}', '{"in":1e-999999}', '{"in":-0}', "-0",
                 digits, '{"in":' + digits + "}", '{"in":-' + digits + ".5e-99999}")


def _lone_surrogates() -> List[bytes]:
    return _text('{"in":"\\ud800"}', '{"in":"\\udc00\\ud800"}', '{"in":"ping\\ud800"}', '"\\ud800"') + [
        b'{"in":"\xed\xa0\x80"}',  # U+D800 encoded as if it were a character: invalid UTF-8
        b'{"in":"ping\xed\xbf\xbf"}',
    ]


def _non_finite() -> List[bytes]:
    return _text('{"in":NaN}', '{"in":Infinity}', '{"in":-Infinity}', "NaN", "[Infinity,-Infinity,NaN]")


def _duplicate_keys() -> List[Tuple[bytes, str, bool]]:
    # First-wins or last-wins is the parser's choice: only the first case can succeed, and only on a first-wins one.
    ambiguous = [(_frame(b'{"in":"ping","in":"x"}'), EITHER, False)]
    return ambiguous + [(_frame(b), RECOVERABLE, False) for b in _text('{"in":"x","in":"y"}', '{"in":5,"in":null}')]


def _wrong_types() -> List[bytes]:
    return _text('{"in":5}', "[]", '"str"', "null", '{"params":1}', "{}", "true", "0", '{"in":null}',
                 '{"in":["ping"]}', '{"in":{"ping":1}}', '{"in":true}', '[{"in":"ping"}]', '{"IN":"ping"}')


def _invalid_utf8() -> List[bytes]:
    return [b'{"in":"\xff\xfe"}', b"\xc0\xaf", b'{"in":"\xc1\xbf"}', b'{"in":"\xf8\x88\x80\x80\x80"}',
            b'{"in":"ping"}\x80', b"\x80" * 64, b'{"in":"\xf4\x90\x80\x80"}']


def _truncated_utf8() -> List[bytes]:
    return [b'{"in":"\xe2\x82"}', b'{"in":"\xf0\x9f\x98"}', b'{"in":"ping"}\xe2', b'{"in":"\xc3']


def _empty_body() -> List[bytes]:
    return [b""]


def _bom() -> List[bytes]:
    return [b"\xef\xbb\xbf", b'{"\xef\xbb\xbfin":"ping"}', b'\xef\xbb\xbf{"in":5}', b"\xef\xbb\xbf\xef\xbb\xbf{}",
            b"\xff\xfe{\x00}\x00"]  # UTF-16 LE with its BOM


def _recoverable(make: Callable[[], List[bytes]]) -> Callable[[], List[Tuple[bytes, str, bool]]]:
    return lambda: [(_frame(body), RECOVERABLE, False) for body in make()]


def _oversized_length() -> List[Tuple[bytes, str, bool]]:
    # Only the header and a few bytes go out: the server must give up on the length alone.
    return [(_HEADER.pack(length) + b'{"in"', FATAL, False) for length in (MAX_FRAME + 1, 1 << 31, 0xFFFFFFFF)]


def _lying_length() -> List[Tuple[bytes, str, bool]]:
    # Says 10, sends 5, then the client half-closes: EOF in mid-frame.
    return [(_HEADER.pack(10) + b'{"in"', FATAL, True), (_HEADER.pack(3) + b"{", FATAL, True)]


#: Class name -> its cases as (frame, expected, half_close), built on demand.
CLASSES: Dict[str, Callable[[], List[Tuple[bytes, str, bool]]]] = {
    "deep-nesting": _recoverable(_deep_nesting),
    "huge-numbers": _recoverable(_huge_numbers),
    "lone-surrogates": _recoverable(_lone_surrogates),
    "non-finite": _recoverable(_non_finite),
    "duplicate-keys": _duplicate_keys,
    "wrong-types": _recoverable(_wrong_types),
    "invalid-utf8": _recoverable(_invalid_utf8),
    "truncated-utf8": _recoverable(_truncated_utf8),
    "empty-body": _recoverable(_empty_body),
    "bom": _recoverable(_bom),
    "oversized-length": _oversized_length,
    "lying-length": _lying_length,
}


def named_cases() -> List[HostileCase]:
    """Every case of every class, ids ``class/number``."""
    return [
        HostileCase(f"{name}/{i}", frame, expected, half_close)
        for name, make in CLASSES.items()
        for i, (frame, expected, half_close) in enumerate(make())
    ]


# -- the seeded fuzz corpus -------------------------------------------------------

# Small hostile pieces to splice into a request: none names a real method.
_FRAGMENTS = (
    b"[" * 64, b"]", b"{", b"}", b'{"a":' * 32, b"1e999999", b"-0", b"1e-999999", b"9" * 400, b"NaN", b"Infinity",
    b"-Infinity", b'"\\ud800"', b"\xed\xa0\x80", b"\xff", b"\xc0\xaf", b"\xe2\x82", b"\xef\xbb\xbf", b"\x00",
    b'"in":"x","in":"y"', b'"in":5', b"null", b"\\", b'"', b",", b":", b"\\u", b"\\uZZZZ", b"\r\n\t ", b"/*",
)
_MUTATIONS = ("flip", "truncate", "insert", "replace-in", "random-bytes", "named")


def _params(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.randrange(-(10**12), 10**12)
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(-5, 15)
    if kind == 2:
        return "".join(rng.choice("abcé€😀 \"\\/\n") for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.choice((None, True, False))
    if kind == 4:
        return [_params(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _params(rng, depth + 1) for i in range(rng.randrange(4))}


def _base_body(rng: random.Random) -> bytes:
    return json.dumps({"in": NO_SUCH_METHOD, "params": _params(rng)}, ensure_ascii=rng.random() < 0.5).encode()


def fuzz_case(seed: int, index: int, _named: Optional[List[HostileCase]] = None) -> HostileCase:
    """Case ``index`` of the corpus of ``seed``, regenerated on its own (its RNG depends on both only)."""
    rng = random.Random(seed * 1_000_003 + index)
    mutation = _MUTATIONS[rng.randrange(len(_MUTATIONS))]
    case_id = f"{seed}:{index}:{mutation}"
    if mutation == "named":
        named = _named if _named is not None else named_cases()
        case = named[rng.randrange(len(named))]
        return HostileCase(f"{case_id}:{case.case_id}", case.frame, case.expected, case.half_close)
    if mutation == "random-bytes":
        size = min(MAX_FRAME, int(rng.expovariate(1 / 512)) if rng.random() < 0.995 else rng.randrange(MAX_FRAME))
        return HostileCase(case_id, _frame(rng.randbytes(size)), RECOVERABLE)
    body = bytearray(_base_body(rng))
    if mutation == "flip":
        for _ in range(rng.randrange(1, 5)):
            body[rng.randrange(len(body))] ^= rng.randrange(1, 256)
    elif mutation == "truncate":
        del body[rng.randrange(1, len(body)):]
    elif mutation == "insert":
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(body) + 1)
            body[at:at] = rng.choice(_FRAGMENTS)
    else:  # replace-in: a hostile value where the method name belongs
        body = bytearray(b'{"in":' + rng.choice(_FRAGMENTS) + body[body.index(b","):])
    return HostileCase(case_id, _frame(bytes(body)), RECOVERABLE)


def fuzz_corpus(seed: int, count: int = 10_000) -> Iterator[HostileCase]:
    """``count`` cases, the same for the same seed: mutations of a request, random bytes, named cases."""
    named = named_cases()
    for index in range(count):
        yield fuzz_case(seed, index, named)


def replay_hint(seed: int, case_id: str) -> str:
    """One line that tells a reader how to replay a failing case: the seed's variable, and the case alone."""
    if case_id.count(":") >= 2:  # a fuzz case: seed:index:mutation[:named case]
        alone = f"pytest_fdcluster.hostile.fuzz_case({seed}, {case_id.split(':')[1]})"
    else:
        alone = f"the named case {case_id} of pytest_fdcluster.hostile.named_cases()"
    return f"replay: {SEED_VARIABLE}={seed} (case {case_id}); in Python: {alone}"


def against_limit(case: HostileCase, max_frame: int) -> Optional[HostileCase]:
    """``case`` restated for a target whose largest frame is ``max_frame`` bytes; None if it says nothing there.

    A complete frame above the limit becomes FATAL (its length alone must be
    refused).  An oversized length prefix at or below the limit is only an
    incomplete frame there, which a correct server rightly waits for: None.
    """
    length = _HEADER.unpack_from(case.frame)[0]
    complete = len(case.frame) - _HEADER.size >= length
    if complete and length > max_frame and case.expected != FATAL:
        return case._replace(expected=FATAL)
    if not complete and not case.half_close and length <= max_frame:
        return None
    return case


# -- judging ------------------------------------------------------------------------


def is_error_frame(reply: Any) -> bool:
    """A JSON object whose "out" is a string other than a success value."""
    return isinstance(reply, dict) and isinstance(reply.get("out"), str) and reply["out"] not in SUCCESS_OUTS


def _describe(reply: Any) -> str:
    if reply is NO_REPLY:
        return "no reply"
    if isinstance(reply, (bytes, bytearray)):
        return f"an unparseable reply {bytes(reply[:60])!r}"
    text = repr(reply)
    return f"the reply {text[:120]}{'...' if len(text) > 120 else ''}"


def judge(case_id: str, expected: str, observed: Observed) -> Optional[str]:
    """None if ``observed`` is what ``expected`` requires, else a message starting "hostile input:"."""
    want = {
        RECOVERABLE: "an error frame and a usable connection (recoverable)",
        FATAL: "at most an error frame, then a clean close (fatal)",
        EITHER: "an error frame or an answer, and a usable connection (ambiguous request)",
    }[expected]
    head = f"hostile input: case {case_id}: expected {want}; got"
    if observed.died:
        return f"{head} the death of {', '.join(observed.died)}"
    reply, end = observed.reply, observed.end
    if expected == EITHER:
        if reply is not NO_REPLY and not (isinstance(reply, dict) and isinstance(reply.get("out"), str)):
            return f"{head} {_describe(reply)}, which is neither an error frame nor an answer"
    elif reply is not NO_REPLY and not is_error_frame(reply):
        return f"{head} {_describe(reply)}, which is not an error frame"
    if expected in (RECOVERABLE, EITHER):
        if reply is NO_REPLY:
            return f"{head} no reply, and the connection {_END_WORDS[end]}"
        if end != OPEN:
            return f"{head} {_describe(reply)}, then the connection {_END_WORDS[end]}"
        if observed.usable is False:
            return f"{head} {_describe(reply)}, then no answer to a ping on the same connection"
        return None
    if end != CLOSED:
        return f"{head} {_describe(reply)}, and the connection {_END_WORDS[end]}"
    return None


_END_WORDS = {
    OPEN: "was left open",
    CLOSED: "was closed",
    RESET: "was reset (not a clean close)",
    TIMEOUT: "neither answered nor closed before the deadline",
}
