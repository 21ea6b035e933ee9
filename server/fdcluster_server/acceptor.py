"""The master's listening socket: bind, accept in batches, pause while the queue is full.

Accepted clients go straight to the dispatcher's pending queue as bare
descriptors (``ClientSocket``); the dispatcher hands them out once per batch.

Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), accepting
stops for a pause that grows while the failures go on (``AcceptBackoff``),
instead of spinning on a listener that stays readable; the log says so at
most once a second, with a count.  The shared-accept worker uses the same.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import time
from typing import Callable, Optional, Tuple

from .dispatch import Dispatcher
from .ratelimit import RateLimit

log = logging.getLogger("fdcluster.master")

ACCEPT_BATCH = 128  # accepts per wake-up, so a storm cannot starve the channels
OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
PAUSE_MIN = 0.05  # the first pause after accept() ran out of resources; doubles while it keeps failing
PAUSE_MAX = 0.5
_READ = selectors.EVENT_READ


class AcceptBackoff:
    """How long to stop accepting after running out of resources, and its rate-limited log line."""

    def __init__(self, who: str, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.who = who
        self.log = logger
        self.clock = clock
        self.delay = PAUSE_MIN
        self.resume_at: Optional[float] = None  # set while paused
        self.log_limit = RateLimit()

    def failed(self, exc: OSError) -> None:
        """accept() failed for want of resources: pause, growing the next pause; log once a second."""
        now = self.clock()
        self.resume_at = now + self.delay
        skipped = self.log_limit.admit(now)
        if skipped is not None:
            self.log.error("%s: cannot accept: %s (%d times since the last report); pausing accepts %.2f s",
                           self.who, exc.strerror or exc, skipped + 1, self.delay)
        self.delay = min(PAUSE_MAX, self.delay * 2)

    def succeeded(self) -> None:
        """A client was accepted: the next failure pauses briefly again."""
        self.delay = PAUSE_MIN

    def paused(self) -> bool:
        """True while the pause lasts; clears it once over."""
        if self.resume_at is None:
            return False
        if self.clock() < self.resume_at:
            return True
        self.resume_at = None
        return False


class ClientSocket:
    """An accepted client as the master holds it: the bare descriptor, closed once.

    The master never reads or writes a client: it passes the descriptor to a
    worker and closes its own copy.  A ``socket.socket`` would cost a
    ``getsockname()`` and two enum conversions per connection for nothing.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class Acceptor:
    """The listening socket, registered with the master's selector while accepting."""

    def __init__(self, selector: selectors.BaseSelector, dispatcher: Dispatcher, master_pid: int) -> None:
        self.selector = selector
        self.dispatcher = dispatcher
        self.master_pid = master_pid
        self.sock: Optional[socket.socket] = None
        self.accepting = False
        self.backoff = AcceptBackoff(f"master {master_pid}", log)

    def bind(self, host: str, port: int, backlog: int) -> None:
        """Listen on ``host:port``; raises OSError (port in use...) with nothing left open."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock

    def address(self) -> Tuple[str, int]:
        """The bound host and port (the port the kernel chose for port 0)."""
        assert self.sock is not None, "address() of a closed listener"
        host, port = self.sock.getsockname()[:2]
        return host, port

    def accept(self, mask: int) -> None:
        """Queue a batch of new clients, then hand them out in one pass."""
        sock = self.sock
        assert sock is not None  # registered only while listening
        dispatcher = self.dispatcher
        accepted = 0
        try:
            for _ in range(ACCEPT_BATCH):
                if dispatcher.full:
                    return  # leave the rest in the kernel's backlog
                try:
                    # What socket.accept() wraps: accept4(SOCK_CLOEXEC), giving the bare descriptor.
                    fd, _ = sock._accept()  # type: ignore[attr-defined]
                except (BlockingIOError, InterruptedError):
                    return  # the backlog is empty
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue  # the client gave up in the backlog
                    if exc.errno in OUT_OF_RESOURCES:
                        self.backoff.failed(exc)
                        self.set_accepting(False)  # until the pause is over: manage_accepting resumes it
                        return
                    raise
                dispatcher.queue(ClientSocket(fd))
                accepted += 1
        finally:
            if accepted and self.backoff.resume_at is None:
                self.backoff.succeeded()
            dispatcher.distribute()  # once per batch, not once per client

    def set_accepting(self, accepting: bool) -> None:
        """Watch the listener or stop; resuming waits for the end of a pause (``resume_at``)."""
        if accepting == self.accepting or self.sock is None:
            return  # no change, or closed
        if accepting and self.backoff.paused():
            return  # out of descriptors a moment ago: the loop wakes at resume_at and asks again
        if accepting:
            self.selector.register(self.sock, _READ, self.accept)
        else:
            self.selector.unregister(self.sock)
        self.accepting = accepting

    def resume_at(self) -> Optional[float]:
        """When a pause for want of resources ends, if accepting is paused for one."""
        return self.backoff.resume_at if self.sock is not None else None

    def close(self) -> None:
        if self.sock is not None:
            self.set_accepting(False)
            self.sock.close()
            self.sock = None
