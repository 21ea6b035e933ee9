"""Small pieces of text every failure message and report is built from.

One place for each, so a process, an address or a count reads the same in a
check's message, a snapshot diff and the terminal summary.
"""

from __future__ import annotations

import shlex
from typing import Iterable, Optional, Tuple, Union

Address = Union[Tuple[str, int], Tuple[str, int, int, int], str]

MASTER = "master"


def plural(count: int, noun: str) -> str:
    """``1 fd``, ``2 fds``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_address(addr: Optional[Address]) -> str:
    """``127.0.0.1:5000``, ``[::1]:5000``, a Unix path, or ``-`` for none."""
    if addr is None:
        return "-"
    if isinstance(addr, str):
        return addr or "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def shell_join(argv: Iterable[str]) -> str:
    """A command line a user can paste into a shell."""
    return " ".join(shlex.quote(str(arg)) for arg in argv)


def label_order(label: str) -> tuple:
    """Sort key for process labels: 'master' first, 'worker 2' before 'worker 10', then the rest."""
    name, _, number = label.rpartition(" ")
    if number.isdigit():
        return (1, name, int(number), label)
    return (0 if label == MASTER else 2, label, 0, label)
