"""One worker's socketpair: the messages that cross it and the code that moves them.

Each message is one SOCK_SEQPACKET record (a datagram socketpair where that type
is missing), so a record and the descriptor riding on it arrive together:
a 9-byte header (kind, 64-bit argument) and an optional payload.

master -> worker: HANDOFF (conn id, one fd attached), STATS (query id), DRAIN.
worker -> master: READY, ACK (connections closed since the last report;
payload: conn ids), REJECT (payload: conn ids), CLOSED (count; least-connections
only: elsewhere closes wait for the next ACK), COUNTERS (query id, payload:
JSON), HEARTBEAT (with ``--heartbeat-timeout``).

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
_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(4 * _FD_SIZE)  # room for strays, so extras are seen and closed
# Plain ints: the socket module's flags are IntFlag members, and ``flags & MSG_CTRUNC``
# with one costs an enum construction (0.6 us) on every record received.
_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_RECV_FLAGS = _CLOEXEC | int(getattr(socket, "MSG_DONTWAIT", 0))  # the worker's end blocks on send only
_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))
_TRUNC = int(getattr(socket, "MSG_TRUNC", 0))
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
    return master_end, worker_end


class Record:
    """One decoded channel record."""

    __slots__ = ("kind", "arg", "payload", "fd", "truncated")

    def __init__(self, kind: int, arg: int, payload: bytes, fd: Optional[int], truncated: bool) -> None:
        self.kind = kind
        self.arg = arg
        self.payload = payload
        self.fd = fd
        self.truncated = truncated

    def ids(self) -> List[int]:
        return list(array.array(IDS, self.payload))

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
        self.sock.sendmsg(
            [HEADER.pack(HANDOFF, conn_id)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", (fd,)))],
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

        Descriptors arrive close-on-exec.  Any descriptor beyond the first, or
        one on a record whose control data was truncated, is closed here so
        nothing leaks; a truncated HANDOFF is reported with ``truncated`` set
        and no fd, so the worker can reject it and the master hand it again.
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
            fds = _fds_from(ancdata)
            truncated = bool(flags & _CTRUNC)
            if not _CLOEXEC:
                for fd in fds:
                    os.set_inheritable(fd, False)  # MSG_CMSG_CLOEXEC is missing (where present: one ioctl less)
            cut = flags & _TRUNC
            if truncated or cut or len(data) < HEADER.size:
                for fd in fds:
                    os.close(fd)
                fds = []
            kind, arg = HEADER.unpack_from(data) if len(data) >= HEADER.size else (0, 0)
            if cut:
                raise TruncatedRecord(kind)
            for extra in fds[1:]:
                os.close(extra)
            yield Record(kind, arg, bytes(data[HEADER.size :]), fds[0] if fds else None, truncated)


def _fds_from(ancdata: list) -> List[int]:
    fds: List[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds
