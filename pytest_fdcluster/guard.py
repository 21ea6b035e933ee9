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
starts in a few milliseconds; processes are found by reading /proc.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Iterable, List, Set

__all__ = ["CMD_FORGET", "CMD_WATCH", "kill_sessions", "main", "session_pids"]

CMD_WATCH = "watch"
CMD_FORGET = "forget"

#: How often the guard checks that its parent is still alive, in case something
#: else inherited its stdin's write end and keeps the pipe open.
PARENT_CHECK_INTERVAL = 0.25

#: Upper bound on the kill loop, for processes that fork while being killed.
KILL_DEADLINE = 5.0


def _read_stat(pid: str) -> "tuple[str, int] | None":
    """Return (state, sid) from /proc/PID/stat, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields follow the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode("ascii"), int(fields[3])
    except (IndexError, ValueError):
        return None


def session_pids(sids: Iterable[int]) -> List[int]:
    """Pids of live (non-zombie) processes whose session id is in ``sids``."""
    wanted = set(sids)
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        info = _read_stat(entry)
        if info is None:
            continue
        state, sid = info
        # A zombie is already dead; whether anyone reaps it is not ours to fix.
        if sid in wanted and state not in ("Z", "X", "x"):
            found.append(int(entry))
    return found


def kill_sessions(sids: Iterable[int], deadline: float = KILL_DEADLINE) -> List[int]:
    """SIGKILL every process of the sessions ``sids``; return the pids killed.

    Killing the process group catches the common case at once; the /proc scan
    catches processes that moved to another group but stayed in the session.
    Repeats until a scan finds nothing, since a process may fork mid-kill.
    """
    sids = set(sids)
    own = os.getpid()
    killed: List[int] = []
    for sid in sids:
        try:
            os.killpg(sid, signal.SIGKILL)
        except OSError:
            pass
    end = time.monotonic() + deadline
    while True:
        pids = [pid for pid in session_pids(sids) if pid != own]
        if not pids or time.monotonic() > end:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        # The kernel delivers SIGKILL asynchronously; give it a moment before rescanning.
        time.sleep(0.005)


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
