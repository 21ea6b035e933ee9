"""For the hardening tests: a server process seen from outside (CPU over a second, descriptor limits); clients."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from typing import Iterator, List

import psutil
from conftest import connect, recv_frame

from fdcluster_server import protocol

CPU_WINDOW = 1.0  # seconds over which an idle-but-blocked process's CPU is measured
IDLE_CPU = 0.1  # at most this many CPU seconds in CPU_WINDOW; a busy loop gets 0.2 s or more even on a shared machine


def cpu_seconds_over(pid: int, seconds: float = CPU_WINDOW) -> float:
    """User plus system CPU seconds process ``pid`` used during the next ``seconds``."""
    process = psutil.Process(pid)
    before = process.cpu_times()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # the measuring window itself, not a synchronisation
        time.sleep(deadline - time.monotonic())
    after = process.cpu_times()
    return (after.user - before.user) + (after.system - before.system)


def lowest_free_fd(pid: int) -> int:
    """The lowest descriptor number process ``pid`` has free: as a soft limit, it leaves none free below it."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


@contextlib.contextmanager
def descriptors_exhausted(pid: int) -> Iterator[int]:
    """Lower ``pid``'s soft RLIMIT_NOFILE to its lowest free fd number, from outside; restore it on exit."""
    process = psutil.Process(pid)
    original = process.rlimit(psutil.RLIMIT_NOFILE)
    limit = lowest_free_fd(pid)
    process.rlimit(psutil.RLIMIT_NOFILE, (limit, original[1]))
    try:
        yield limit
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.rlimit(psutil.RLIMIT_NOFILE, original)


def send_pings(address, count: int, first: int = 0) -> List[socket.socket]:
    """``count`` new connections, each with one ping sent (params: its number from ``first``), none read yet."""
    socks = []
    for i in range(first, first + count):
        sock = connect(address, timeout=15)
        sock.sendall(protocol.request("ping", i))
        socks.append(sock)
    return socks


def expect_pongs(socks: List[socket.socket], who: str) -> None:
    """Each of ``socks`` (from ``send_pings``) gets its pong; fails naming the client and ``who`` it waited on."""
    for i, sock in enumerate(socks):
        assert recv_frame(sock) == {"out": "pong", "result": i}, f"client {i} waiting on {who} was not served"


def answered(socks: List[socket.socket], timeout: float = 0.0) -> List[socket.socket]:
    """The sockets among ``socks`` with an answer to read (poll-based: their numbers may pass 1024)."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(timeout)]
