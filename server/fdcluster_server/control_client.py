"""One client of the master's control socket, as the master holds it: its decoder and its ordered replies.

Replies leave in request order: a ``stats`` query waits for the workers, so
every reply queued after it waits too (``behind``), and moves to the output
buffer (``out``) only once the replies before it are ready (``take_ready``).
``held`` counts the bytes waiting behind, so ``control.ControlServer`` can
bound what one client that does not read may cost.  Runs in the master.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Any, Deque, Dict, Optional, Set, Union

from . import protocol


class ControlClient:
    """One connection to the control socket."""

    __slots__ = ("sock", "peer", "decoder", "out", "behind", "held", "queries", "reading", "closing", "closed",
                 "events", "active")

    def __init__(self, sock: socket.socket, peer: str, max_request: int) -> None:
        self.sock = sock
        self.peer = peer  # "pid N uid N", for log lines
        self.decoder = protocol.FrameDecoder(max_request)
        self.out = bytearray()  # replies its socket has not taken yet
        self.behind: Deque[Union[bytes, StatsQuery]] = deque()  # replies waiting behind a stats query, in order
        self.held = 0  # bytes of the frames in ``behind``
        self.queries = 0  # stats queries still waiting for workers
        self.reading = True  # False after its EOF
        self.closing = False  # close once ``out`` is sent (after a fatal frame)
        self.closed = False
        self.events = 0  # what it is registered for with the selector
        self.active = time.monotonic()  # when it last sent or took a byte

    def queue(self, frame: bytes) -> None:
        """Queue a reply behind every earlier one."""
        self.behind.append(frame)
        self.held += len(frame)

    def take_ready(self) -> None:
        """Move the replies that are ready, in request order, to the output buffer."""
        behind = self.behind
        while behind:
            head = behind[0]
            frame = head.reply if isinstance(head, StatsQuery) else head
            if frame is None:
                break  # a stats query still waits: the replies after it wait too
            behind.popleft()
            if not isinstance(head, StatsQuery):
                self.held -= len(frame)
            self.out += frame


class StatsQuery:
    """A control client's stats request, waiting for every live worker's counters."""

    def __init__(self, client: ControlClient, waiting: Set[int], deadline: float) -> None:
        self.client = client
        self.waiting = waiting
        self.deadline = deadline
        self.counters: Dict[int, Dict[str, Any]] = {}
        self.reply: Optional[bytes] = None  # once answered, until the replies before it are sent


def last_words(sock: socket.socket, data: Union[bytes, bytearray]) -> None:
    """One non-blocking try to send ``data`` before ``sock`` is closed; what does not fit is lost."""
    try:
        sock.send(data)
    except OSError:
        pass  # it will see the close instead
