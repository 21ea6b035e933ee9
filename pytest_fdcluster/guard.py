"""Orphan guard: a watchdog process that kills target sessions once pytest is gone.

Runs as ``python -m pytest_fdcluster.guard`` (or by file path), in its own
session so that it outlives a SIGKILLed pytest.  It reads commands from its
stdin, one per line::

    watch SID      start guarding the session SID (a target master's pid)
    forget SID     the target was stopped cleanly; leave that session alone

When stdin reaches end of file -- pytest closed it at exit, or pytest died and
the kernel closed it -- or when the guard's parent process is gone, it
SIGKILLs every process of every watched session and exits.

Imports the standard library only, and not psutil or pytest, so that it
starts in a few milliseconds; processes are found by reading /proc, with
``proctree``'s session half (loaded by path when the package is not on the path).
pytest's end of the pipe is ``guard_client``.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Set

__all__ = ["CMD_FORGET", "CMD_WATCH", "kill_sessions", "main", "session_pids"]

CMD_WATCH = "watch"
CMD_FORGET = "forget"

#: How often the guard checks that its parent is still alive, in case something
#: else inherited its stdin's write end and keeps the pipe open.
PARENT_CHECK_INTERVAL = 0.25


def _load_proctree() -> ModuleType:
    """``proctree``, which knows the target's sessions: imported, or by path when run as an isolated script."""
    if __package__:
        from . import proctree

        return proctree
    # Run by path with -I -S: the package is not importable, its sibling file is.
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proctree.py")
    spec = importlib.util.spec_from_file_location("fdcluster_guard_proctree", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from .proctree import KILL_DEADLINE, kill_sessions, session_pids
else:
    _proctree = _load_proctree()
    KILL_DEADLINE = _proctree.KILL_DEADLINE
    kill_sessions = _proctree.kill_sessions
    session_pids = _proctree.session_pids


def _apply(line: str, watched: Set[int]) -> None:
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return
    verb, sid = parts[0], int(parts[1])
    if verb == CMD_WATCH:
        watched.add(sid)
    elif verb == CMD_FORGET:
        watched.discard(sid)


def main() -> int:
    """Serve commands from stdin until it closes or the parent dies, then kill."""
    # pytest's Ctrl-C must not kill the guard before it has done its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parent = os.getppid()
    fd = sys.stdin.fileno()
    watched: Set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], PARENT_CHECK_INTERVAL)
        if not ready:
            if os.getppid() != parent:
                break
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _apply(line.decode("ascii", "replace"), watched)
    if watched:
        kill_sessions(watched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
