"""Opening many client sockets at once, for the injectors that need hundreds of connections.

Non-blocking connects in one thread, so a storm or a slowloris costs no
threads; and the error every injector raises when a fault cannot be set up.
"""

from __future__ import annotations

import errno
import select
import selectors
import socket
import time
from collections import Counter
from typing import List, Optional, Tuple

from ..sockets import Address, errno_name
from ..text import format_address, plural

#: Upper bound, so a typo in a test cannot exhaust descriptors or ports.
MAX_CONNECTIONS = 5000

#: What a non-blocking connect answers while it is still under way.
IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)


class FaultError(RuntimeError):
    """A fault could not be set up as asked (connects failed, state never reached); the message says why."""


def check_count(count: int, name: str = "count") -> int:
    """``count`` itself, if it is an int in 1..``MAX_CONNECTIONS``; else ValueError naming ``name``."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_CONNECTIONS:
        raise ValueError(f"{name} must be an int in 1..{MAX_CONNECTIONS}, got {count!r}")
    return count


def start_connect(address: Address, rcvbuf: Optional[int] = None) -> Tuple[socket.socket, int]:
    """A non-blocking socket with its connect under way; returns it and connect_ex's errno."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            # Before connect: the window scale is fixed by the SYN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        code = sock.connect_ex(address)
    except BaseException:
        sock.close()
        raise
    return sock, code


def connect_result(sock: socket.socket) -> int:
    """0 once a non-blocking connect succeeded, else its errno."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def connect_all(address: Address, count: int, timeout: float) -> List[socket.socket]:
    """Open ``count`` connections at once (non-blocking, one thread); all or FaultError."""
    deadline = time.monotonic() + timeout
    sockets: List[socket.socket] = []
    failures: Counter = Counter()
    selector = selectors.DefaultSelector()
    try:
        for _ in range(count):
            sock, code = start_connect(address)
            sockets.append(sock)
            if code in (0, errno.EISCONN):
                continue
            if code not in IN_PROGRESS:
                failures[errno_name(code)] += 1
                continue
            selector.register(sock, selectors.EVENT_WRITE)
        while selector.get_map() and not failures:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures["timed out"] += len(selector.get_map())
                break
            for key, _ in selector.select(remaining):
                selector.unregister(key.fileobj)
                code = connect_result(key.fileobj)  # type: ignore[arg-type]
                if code:
                    failures[errno_name(code)] += 1
        if failures:
            detail = ", ".join(f"{n} {kind}" for kind, n in failures.items())
            raise FaultError(f"could not open {plural(count, 'connection')} to {format_address(address)} "
                             f"within {timeout:g} s: {detail}")
        return sockets
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    finally:
        selector.close()


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer ended the connection (FIN or RST), without consuming or blocking."""
    poll_in = getattr(select, "POLLRDHUP", 0)
    if hasattr(select, "poll") and poll_in:
        poller = select.poll()
        poller.register(sock, poll_in | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
