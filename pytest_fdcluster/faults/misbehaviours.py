"""Per-connection misbehaviours, for the share of a load run's clients that misbehave (``run_load(fault=...)``).

A misbehaviour is what one connection does wrong: a name from
``MISBEHAVIOURS`` or a callable given the connected socket.

- ``"rst"``: send half a ping frame, then reset (RST).
- ``"truncate"``: send half a ping frame, then close normally (FIN).
- ``"slowloris"``: send the header and one byte of a ping frame, then hold
  the connection until the run ends or the server closes it.
- ``"slow_reader"``: with a 4 KiB receive buffer, pipeline pings with
  64 KiB payloads and never read, until the sends stall; then hold.
- a callable ``fault(sock)``: a module-level function (so spawned load
  processes can import it) given a connected blocking socket with the run's
  timeout; it returns when done, and the socket is then closed.

Which clients misbehave is ``choose_misbehaving``: an exact share, chosen
by a seeded draw, so a run is replayable from its seed.  No pytest import.
"""

from __future__ import annotations

import errno
import random
import select
import socket
import threading
import time
from typing import Callable, List, Optional, Union

from fdcluster_server import protocol

from ..sockets import Address, error_kind
from ._connect import connect_result, peer_closed, start_connect
from .frames import reset_socket

__all__ = ["MISBEHAVIOURS", "Misbehaviour", "choose_misbehaving", "check_misbehaviour", "misbehave"]

Misbehaviour = Union[str, Callable[[socket.socket], None]]

MISBEHAVIOURS = ("rst", "truncate", "slowloris", "slow_reader")

#: How often a held connection looks at whether the run ended or the server closed it.
HOLD_POLL = 0.05

#: How long a slow reader's sends must stay blocked to count as stalled.
STALL = 0.25

_SLOW_READER_RCVBUF = 4096
_SLOW_READER_REQUESTS = 256
_PING = protocol.request("ping", "misbehaving")
_BIG_PING = protocol.request("ping", "r" * (64 * 1024))


def check_misbehaviour(fault: Misbehaviour, fraction: float) -> str:
    """The fault's name for reports, if ``fault`` and ``fraction`` are valid; else ValueError saying why."""
    if isinstance(fault, str):
        if fault not in MISBEHAVIOURS:
            raise ValueError(f"fault must be one of {', '.join(MISBEHAVIOURS)} or a callable, got {fault!r}")
        name = fault
    elif callable(fault):
        name = getattr(fault, "__qualname__", repr(fault))
    else:
        raise ValueError(f"fault must be one of {', '.join(MISBEHAVIOURS)} or a callable, got {fault!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be within (0, 1), got {fraction!r}")
    return name


def choose_misbehaving(clients: int, fraction: float, seed: int = 0) -> List[int]:
    """The numbers of the clients that misbehave, sorted: ``round(clients * fraction)`` of them, seeded.

    At least one (a fault asked for is a fault injected) and at most
    ``clients - 1`` (someone must be measured).  The same arguments always
    choose the same clients.
    """
    if clients < 2:
        raise ValueError(f"a fault needs at least 2 clients (one misbehaving, one measured), got {clients}")
    count = min(clients - 1, max(1, round(clients * fraction)))
    return sorted(random.Random(seed).sample(range(clients), count))


def misbehave(fault: Misbehaviour, address: Address, stop: threading.Event, timeout: float) -> Optional[str]:
    """Open one connection to ``address`` and misbehave on it; return how it ended.

    ``"closed"`` when the server ended a held connection first, an error
    kind (``refused``, ``reset``, ``timed_out``, ``other``) when a step
    failed, else None.  Held connections end when ``stop`` is set.
    """
    rcvbuf = _SLOW_READER_RCVBUF if fault == "slow_reader" else None
    try:
        sock = _connect(address, timeout, rcvbuf)
    except OSError as exc:
        return error_kind(exc)
    try:
        if fault == "rst":
            sock.sendall(_PING[: len(_PING) // 2])
        elif fault == "truncate":
            sock.sendall(_PING[: len(_PING) // 2])
            sock.close()
        elif fault == "slowloris":
            sock.sendall(_PING[: protocol.HEADER_SIZE + 1])
            return _hold(sock, stop)
        elif fault == "slow_reader":
            _fill(sock, stop, timeout)
            return _hold(sock, stop)
        elif callable(fault):
            fault(sock)
        return None
    except OSError as exc:
        return error_kind(exc)
    finally:
        if sock.fileno() >= 0:
            reset_socket(sock)  # RST for "rst"; for the rest, unread data would reset it anyway


def _connect(address: Address, timeout: float, rcvbuf: Optional[int]) -> socket.socket:
    sock, code = start_connect(address, rcvbuf=rcvbuf)
    try:
        if code:
            _, writable, _ = select.select([], [sock], [], timeout)
            code = connect_result(sock) if writable else errno.ETIMEDOUT
            if code:
                raise OSError(code, f"connect to {address} failed")
        sock.setblocking(True)
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _fill(sock: socket.socket, stop: threading.Event, timeout: float) -> None:
    """Pipeline big pings without reading until the sends stay blocked for ``STALL`` seconds."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    view, offset, sent_requests = memoryview(_BIG_PING), 0, 0
    while sent_requests < _SLOW_READER_REQUESTS and not stop.is_set() and time.monotonic() < deadline:
        try:
            offset += sock.send(view[offset:])
        except (BlockingIOError, InterruptedError):
            # Waiting for writability is the fault itself: a peer that stopped reading.
            _, writable, _ = select.select([], [sock], [], STALL)
            if not writable:
                return
            continue
        if offset == len(_BIG_PING):
            offset, sent_requests = 0, sent_requests + 1


def _hold(sock: socket.socket, stop: threading.Event) -> Optional[str]:
    """Keep ``sock`` open, reading nothing, until ``stop`` or the server closes it."""
    while not stop.wait(HOLD_POLL):
        if peer_closed(sock):
            return "closed"
    return None
