"""The master's listening socket: bind, accept in batches, pause while the queue is full.

Accepted clients go straight to the dispatcher's pending queue as bare
descriptors (``ClientSocket``); the dispatcher hands them out once per batch.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
from typing import Optional, Tuple

from .dispatch import Dispatcher

log = logging.getLogger("fdcluster.master")

ACCEPT_BATCH = 128  # accepts per wake-up, so a storm cannot starve the channels
_READ = selectors.EVENT_READ


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
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("master %d: cannot accept: %s; pausing accepts", self.master_pid, exc.strerror)
                        self.set_accepting(False)
                        return
                    raise
                dispatcher.queue(ClientSocket(fd))
        finally:
            dispatcher.distribute()  # once per batch, not once per client

    def set_accepting(self, accepting: bool) -> None:
        if accepting == self.accepting or self.sock is None:
            return  # no change, or closed
        if accepting:
            self.selector.register(self.sock, _READ, self.accept)
        else:
            self.selector.unregister(self.sock)
        self.accepting = accepting

    def close(self) -> None:
        if self.sock is not None:
            self.set_accepting(False)
            self.sock.close()
            self.sock = None
