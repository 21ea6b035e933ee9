"""Socket pieces the fault injectors and the load generator share: which errors mean a reset, and their names.

One table, so a storm's counts and a load run's error kinds call the same
errno the same thing.  Client side only; no pytest import.
"""

from __future__ import annotations

import errno
import socket
from typing import Optional, Tuple

Address = Tuple[str, int]

#: What one ``recv`` asks for.
RECV_SIZE = 65536

#: Errors that mean the peer reset or went away, whatever the exact timing.
RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


def errno_name(code: Optional[int]) -> str:
    """``ECONNREFUSED`` for 111; the number itself for a code without a name."""
    return errno.errorcode.get(code or 0, str(code))


def errno_kind(code: Optional[int]) -> Optional[str]:
    """The counter a failed connect or exchange goes to: ``refused``, ``reset`` or ``timed_out``; else None."""
    if code == errno.ECONNREFUSED:
        return "refused"
    if code in RESET_ERRNOS:
        return "reset"
    if code == errno.ETIMEDOUT:
        return "timed_out"
    return None


def error_kind(exc: BaseException) -> str:
    """The counter a failed socket operation goes to: ``errno_kind``'s, ``timed_out`` for a timeout, else ``other``."""
    if isinstance(exc, socket.timeout):
        return "timed_out"
    if isinstance(exc, OSError):
        return errno_kind(exc.errno) or "other"
    return "other"
