"""Signals for master and worker: the parent-death signal (and, later, the wake-up queue).

Shared by both sides of the fork, and by the plugin, which starts targets the
same way: one prctl binding, resolved once before any fork.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable, Optional

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
