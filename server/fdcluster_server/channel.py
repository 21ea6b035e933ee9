"""One worker's socketpair: the messages that cross it and the code that moves them.

Each message is one SOCK_SEQPACKET record (a datagram socketpair where that type
is missing), so a record and the descriptor riding on it arrive together:
a 9-byte header (kind, 64-bit argument) and an optional payload.

master -> worker: HANDOFF (count; payload: conn ids; as many fds attached, in
the same order, at most ``MAX_FDS``), STATS (query id), DRAIN.
worker -> master: READY, ACK (connections closed since the last report;
payload: conn ids), REJECT (payload: conn ids), CLOSED (count; least-connections
only: elsewhere closes wait for the next ACK), COUNTERS (query id, payload:
JSON), HEARTBEAT (with ``--heartbeat-timeout``).

A batch of handoffs is one ``sendmsg``: one system call and one wake-up of the
worker for every socket the master hands it in one turn.

A record never exceeds ``MAX_RECORD``: id lists are split over several
records.  One that does anyway arrives cut short (MSG_TRUNC) and ``receive``
raises ``TruncatedRecord`` rather than yield a record with ids missing.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys
from typing import Any, Iterator, List, Optional, Tuple

HEADER = struct.Struct("<BQ")
IDS = "Q"

# master -> worker
HANDOFF = 1
STATS = 2
DRAIN = 3
# worker -> master
READY = 10
ACK = 11
REJECT = 12
CLOSED = 13
COUNTERS = 14
HEARTBEAT = 15

MAX_RECORD = 65536
MAX_IDS = (MAX_RECORD - HEADER.size) // struct.calcsize(IDS)  # conn ids per record
MAX_FDS = 16  # descriptors per HANDOFF record (the kernel's own limit, SCM_MAX_FD, is 253); the window is 4 by default
# The master's send buffer: how many handoffs a worker that stopped reading (frozen, stuck) can have parked in its
# channel before the master sees EAGAIN and hands the rest elsewhere.  The default (208 KiB) held ~280 one-socket
# records; with batches of MAX_FDS it would hold ~4,000 sockets.  This keeps it near 350 at most (~20 records).
CHANNEL_SNDBUF = 8192
_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE((MAX_FDS + 4) * _FD_SIZE)  # room for strays, so extras are seen and closed
# Plain ints: the socket module's flags are IntFlag members, and ``flags & MSG_CTRUNC``
# with one costs an enum construction (0.6 us) on every record received.
_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_RECV_FLAGS = _CLOEXEC | int(getattr(socket, "MSG_DONTWAIT", 0))  # the worker's end blocks on send only
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))
_TRUNC = int(getattr(socket, "MSG_TRUNC", 0))
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_ID_SIZE = struct.calcsize(IDS)
# Linux installs the descriptors of a truncated SCM_RIGHTS message in order and stops at the first that does not
# fit (scm_detach_fds): those received are the first ones sent.
_PREFIX_ON_CTRUNC = sys.platform.startswith("linux")
SOCK_TYPE = getattr(socket, "SOCK_SEQPACKET", socket.SOCK_DGRAM)


class TruncatedRecord(Exception):
    """A record longer than ``MAX_RECORD`` arrived cut short: its sender is broken, and what it said is lost."""

    def __init__(self, kind: int) -> None:
        super().__init__(f"a channel record of kind {kind} longer than {MAX_RECORD} bytes was truncated")
        self.kind = kind


def socketpair() -> Tuple[socket.socket, socket.socket]:
    """A (master end, worker end) pair; both non-inheritable, the master's non-blocking."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, SOCK_TYPE)
    master_end.setblocking(False)
    master_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_SNDBUF)
    return master_end, worker_end


class Record:
    """One decoded channel record."""

    __slots__ = ("kind", "arg", "payload", "fds", "truncated")

    def __init__(self, kind: int, arg: int, payload: bytes, fds: List[int], truncated: bool) -> None:
        self.kind = kind
        self.arg = arg
        self.payload = payload
        self.fds = fds  # when ``truncated``: those that arrived, the first sent (Linux), else none
        self.truncated = truncated

    def ids(self) -> List[int]:
        usable = len(self.payload) - len(self.payload) % _ID_SIZE  # a hostile length never raises
        return array.array(IDS, self.payload[:usable]).tolist()

    def handoffs(self) -> List[Tuple[int, Optional[int]]]:
        """A HANDOFF's (conn id, fd) pairs; None for each fd that did not arrive (truncated: reject those).

        The kernel keeps a message's descriptors in order, so the n-th fd is the n-th id's.

        Descriptors beyond the ids are closed: nobody could say which connection they are.
        """
        ids = self.ids()
        fds = self.fds
        for extra in fds[len(ids):]:
            os.close(extra)
        return [(conn_id, fds[i] if i < len(fds) else None) for i, conn_id in enumerate(ids)]

    def json(self) -> Any:
        return json.loads(self.payload.decode("utf-8"))


class Channel:
    """A non-blocking end of a worker's socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: int, arg: int = 0, payload: bytes = b"") -> None:
        self.sock.send(HEADER.pack(kind, arg) + payload)

    def send_handoff(self, conn_id: int, fd: int) -> None:
        self.send_handoffs([conn_id], [fd])

    def send_handoffs(self, conn_ids: List[int], fds: List[int]) -> None:
        """One record, one ``sendmsg``: every socket or none (at most ``MAX_FDS``)."""
        assert 0 < len(conn_ids) == len(fds) <= MAX_FDS, f"{len(conn_ids)} ids, {len(fds)} fds in one handoff"
        self.sock.sendmsg(
            [HEADER.pack(HANDOFF, len(conn_ids)) + array.array(IDS, conn_ids).tobytes()],
            [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))],
        )

    def send_ids(self, kind: int, ids: List[int]) -> None:
        # One record per batch keeps the master's wake-ups per loop, not per connection.
        for start in range(0, len(ids), MAX_IDS):
            chunk = ids[start : start + MAX_IDS]
            self.send(kind, len(chunk), array.array(IDS, chunk).tobytes())

    def send_ack(self, ids: List[int], closed: int) -> None:
        # Closes ride on the acknowledgement: in a connection storm the master reads one record per turn, not two.
        for start in range(0, max(len(ids), 1), MAX_IDS):
            self.send(ACK, closed if start == 0 else 0, array.array(IDS, ids[start : start + MAX_IDS]).tobytes())

    def send_json(self, kind: int, arg: int, obj: Any) -> None:
        self.send(kind, arg, json.dumps(obj, separators=(",", ":")).encode("utf-8"))

    def receive(self) -> Iterator[Record]:
        """Yield every record available now; raise EOFError when the peer is gone.

        Descriptors arrive close-on-exec.  A record whose control data was
        truncated (the receiver out of descriptors, or sent more than fit) has
        ``truncated`` set: on Linux the kernel delivers the first descriptors
        in order, so they stay paired with the first ids (``Record.handoffs``)
        and the worker rejects only the rest; elsewhere what did arrive is
        closed and every socket of it rejected.  The master hands rejected
        sockets again.
        A record cut short (longer than ``MAX_RECORD``) raises ``TruncatedRecord``
        after its descriptors are closed; the records after it can still be read.
        """
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(MAX_RECORD, _ANCILLARY, _RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionResetError, BrokenPipeError):
                raise EOFError from None
            if not data:
                raise EOFError
            fds = _fds_from(ancdata) if ancdata else []
            truncated = bool(flags & _CTRUNC)
            if not _CLOEXEC:
                for fd in fds:
                    os.set_inheritable(fd, False)  # MSG_CMSG_CLOEXEC is missing
            cut = flags & _TRUNC
            if fds and (cut or len(data) < HEADER.size or (truncated and not _PREFIX_ON_CTRUNC)):
                for fd in fds:
                    os.close(fd)
                fds = []
            kind, arg = HEADER.unpack_from(data) if len(data) >= HEADER.size else (0, 0)
            if cut:
                raise TruncatedRecord(kind)
            yield Record(kind, arg, bytes(data[HEADER.size :]), fds, truncated)


def _fds_from(ancdata: list) -> List[int]:
    fds: List[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds
