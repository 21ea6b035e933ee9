"""Signals for master and worker: the queue their handlers fill, and the parent-death signal.

Shared by both sides of the fork.  ``SignalQueue``: handlers only enqueue, a
wake-up pipe breaks the loop's ``select()``, the loop reads the queue.  The
plugin starts targets the same way as the master starts workers: one prctl
binding, resolved once before any fork.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, Callable, Iterable, Iterator, List, Optional

PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)


def _load_prctl() -> Optional[Callable[..., int]]:
    # Resolved once, at import, so a child after fork only has to make the call.
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def set_parent_death_signal(signum: int = _SIGKILL) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; runs in the child.

    Fork-safe: one call through a function pointer resolved before the fork.
    Returns False where the platform has no such call (the caller then relies on
    a getppid() check).
    """
    if _prctl is None:
        return False
    return _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def parent_death_preexec(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` for subprocess: parent-death SIGKILL, and suicide if the parent is already gone."""

    def set_death_signal_in_child() -> None:
        set_parent_death_signal(_SIGKILL)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), _SIGKILL)

    return set_death_signal_in_child


def handler_name(signum: int) -> str:
    """The method that handles ``signum``: 'handle_term' for SIGTERM, 'handle_chld' for SIGCHLD."""
    return "handle_" + signal.Signals(signum).name[3:].lower()


class SignalQueue:
    """Signals received, in order, for the event loop to handle; installed in the process that uses it.

    A handler only appends to the queue: Python runs it between bytecodes, and
    whatever it did beyond that could interrupt the loop half-way through a
    change.  The wake-up fd (register ``fd`` with the selector) makes
    ``select()`` return at once; ``drain()`` empties it, ``pending()`` yields
    the signals.
    """

    def __init__(self) -> None:
        self.fd = -1  # the wake-up pipe's read end, once installed
        self._queue: List[int] = []

    def install(self, queued: Iterable[int], default: Iterable[int] = (), ignored: Iterable[int] = ()) -> int:
        """Queue ``queued``, reset ``default`` to SIG_DFL, ignore ``ignored``, then unblock them all.

        Returns the wake-up fd.  The master blocks its signals across ``fork()``; a new worker
        unblocks them here, once its own handlers are in place, and only then receives any sent
        to it meanwhile.
        """
        queued, default, ignored = list(queued), list(default), list(ignored)
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self.fd = read_end
        signal.set_wakeup_fd(write_end)
        for signum in queued:
            signal.signal(signum, self._enqueue)
        for signum in default:
            signal.signal(signum, signal.SIG_DFL)
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, queued + default + ignored)
        return read_end

    def _enqueue(self, signum: int, frame: Any) -> None:
        self._queue.append(signum)

    def drain(self) -> None:
        """Empty the wake-up pipe (the signals themselves are in the queue)."""
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass

    def pending(self) -> Iterator[int]:
        """Yield the queued signals oldest first, including any that arrive meanwhile."""
        while self._queue:
            yield self._queue.pop(0)
