"""Faults in the bytes of one connection: frames split across writes, and connections ended badly.

A frame cut at any offset, sent byte by byte or in pieces with pauses, must
be answered as if sent whole; a connection reset (RST), truncated mid-frame
or half-closed must leave nothing behind in the server.  Framing comes from
``fdcluster_server.protocol``; these functions only misbehave with the bytes.

Each is one call that is over when it returns: nothing stays open, so there
is nothing for a ``with`` block to undo.  Those that open their own
connection take a ``Cluster`` or an address; those that misbehave on the
test's own connection take a ``Client`` or a socket, and ``cluster=`` to
record in.  Every one records itself (see ``_record``).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, List, Optional, Sequence, Union

from fdcluster_server import protocol

from ..client import Client
from ..cluster import Cluster
from ..sockets import Address
from ._record import Target, local_of, peer_of, record, resolve

SockOrClient = Union[socket.socket, Client]

#: Upper bound, so a typo in a test cannot send a frame in millions of writes.
MAX_PIECES = 1 << 16

_LINGER_RST = struct.pack("ii", 1, 0)


# -- split frames -----------------------------------------------------------------------


def split_frame(frame: bytes, at: Union[int, Sequence[int]]) -> List[bytes]:
    """Cut ``frame`` at byte offset ``at`` (or at each offset of a sequence) into pieces.

    Offsets must lie strictly inside the frame (1 .. len-1), so no piece is
    empty; they are sorted and duplicates dropped.  ``b"".join(pieces) == frame``.
    """
    positions = [at] if isinstance(at, int) else list(at)
    cuts = sorted(set(int(p) for p in positions))
    for cut in cuts:
        if not 0 < cut < len(frame):
            raise ValueError(f"split offset {cut} is outside 1..{len(frame) - 1} for a frame of {len(frame)} bytes")
    bounds = [0] + cuts + [len(frame)]
    return [frame[start:end] for start, end in zip(bounds, bounds[1:])]


def _even_cuts(length: int, pieces: int) -> List[int]:
    if not 1 <= pieces <= length:
        raise ValueError(f"cannot send a frame of {length} bytes in {pieces} non-empty pieces")
    return [length * k // pieces for k in range(1, pieces)]


def _pieces_of(frame: bytes, pieces: Union[int, Sequence[int], Sequence[bytes]]) -> List[bytes]:
    chunks = _split_as_asked(frame, pieces)
    if len(chunks) > MAX_PIECES:
        raise ValueError(f"{len(chunks)} pieces is more than the limit of {MAX_PIECES}")
    return chunks


def _split_as_asked(frame: bytes, pieces: Union[int, Sequence[int], Sequence[bytes]]) -> List[bytes]:
    if isinstance(pieces, int):
        return split_frame(frame, _even_cuts(len(frame), pieces)) if pieces > 1 else [frame]
    items: List[Any] = list(pieces)  # offsets or bytes: told apart below
    if items and all(isinstance(p, (bytes, bytearray, memoryview)) for p in items):
        chunks = [bytes(p) for p in items]
        if b"".join(chunks) != frame:
            raise ValueError("the pieces given do not add up to the frame")
        return chunks
    return split_frame(frame, items) if items else [frame]


def _cluster_of(target: SockOrClient, cluster: Optional[Cluster]) -> Optional[Cluster]:
    """The cluster to record in: the one given, else one the client names (a ``cluster`` attribute)."""
    if cluster is not None:
        return cluster
    found = getattr(target, "cluster", None)
    return found if isinstance(found, Cluster) else None


def _sendall(target: SockOrClient, data: bytes) -> None:
    if isinstance(target, Client):
        target.send_raw(data)
    else:
        target.sendall(data)


def send_in_pieces(
    target: SockOrClient,
    frame: bytes,
    pieces: Union[int, Sequence[int], Sequence[bytes]],
    delay: float = 0.0,
    *,
    cluster: Optional[Cluster] = None,
) -> List[bytes]:
    """Send ``frame`` in pieces, each in its own write, ``delay`` seconds apart; return the pieces.

    ``pieces`` is a number of roughly equal pieces, a sequence of split
    offsets (see ``split_frame``), or the pieces themselves.  ``TCP_NODELAY``
    is set, so Nagle does not glue the pieces back together on the way out.
    ``cluster`` is where the injection is recorded (else only logged).
    """
    chunks = _pieces_of(frame, pieces)
    record(_cluster_of(target, cluster), "send_in_pieces", peer_of(target), frame=frame,
           sizes=[len(chunk) for chunk in chunks], delay=delay)
    _send_chunks(target, chunks, delay)
    return chunks


def _send_chunks(target: SockOrClient, chunks: List[bytes], delay: float) -> None:
    if not isinstance(target, Client):
        target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A Client sets TCP_NODELAY when it connects.
    for number, chunk in enumerate(chunks):
        if number and delay > 0:
            time.sleep(delay)  # the gap between pieces is the fault itself
        _sendall(target, chunk)


def byte_by_byte(target: SockOrClient, frame: bytes, delay: float = 0.0, *,
                 cluster: Optional[Cluster] = None) -> None:
    """Send ``frame`` one byte per write, ``delay`` seconds apart (``cluster``: where to record it)."""
    chunks = _pieces_of(frame, len(frame))
    record(_cluster_of(target, cluster), "byte_by_byte", peer_of(target), frame=frame, delay=delay)
    _send_chunks(target, chunks, delay)


# -- ending a connection badly -----------------------------------------------------------


def rst_close(target: SockOrClient, *, cluster: Optional[Cluster] = None) -> None:
    """Abortive close: SO_LINGER 0, so the kernel sends RST instead of FIN and keeps no TIME_WAIT.

    ``cluster`` is where the injection is recorded (else only logged).
    """
    record(_cluster_of(target, cluster), "rst_close", peer_of(target), local=local_of(target))
    reset_socket(target)


def reset_socket(target: SockOrClient) -> None:
    """RST without recording: the storms reset hundreds of sockets and record the storm once."""
    if isinstance(target, Client):
        target.abort()
        return
    try:
        target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass  # already reset or closed: closing is all that is left to do
    finally:
        target.close()


def truncate_and_close(target: Target, frame: bytes, keep: int, timeout: float = 5.0) -> Address:
    """Connect, send the first ``keep`` bytes of ``frame``, close normally; return the local address.

    The returned address names the connection in a later snapshot, e.g. to
    check that the server closed its side too.
    """
    if not 0 <= keep <= len(frame):
        raise ValueError(f"keep={keep} is outside 0..{len(frame)}")
    address, cluster = resolve(target)
    with Client(address, timeout=timeout) as client:
        record(cluster, "truncate_and_close", address, frame=frame, keep=keep,
               local=client.local_address)
        if keep:
            client.send_raw(frame[:keep])
        return client.local_address


def half_close_request(target: Target, method: str, params: Any = None, timeout: float = 5.0) -> dict:
    """Send one request, half-close (SHUT_WR), read the response, then expect the server's EOF.

    Returns the response object; raises ``ClientError`` if no response comes,
    or if the server does not end the stream after answering.
    """
    address, cluster = resolve(target)
    with Client(address, timeout=timeout) as client:
        record(cluster, "half_close_request", address, method=method, params=params,
               local=client.local_address)
        client.send_raw(protocol.request(method, params))
        client.shutdown_write()
        response = client.recv_frame()
        client.expect_eof()
        return response

