"""pytest's end of the orphan guard: starts the watchdog and tells it which sessions to kill.

The watchdog itself is ``guard.py``, a separate process run as an isolated
script; this half runs in pytest (or whichever process starts targets) and
speaks its line protocol (``watch SID`` / ``forget SID``) over the
watchdog's stdin.  One watchdog per process, started lazily, restarted (with
the watch list replayed) if it died, and never shared with a forked child.
Closing the pipe -- at exit, or by the kernel when this process dies -- makes
the watchdog kill whatever is still watched.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from typing import Any, Optional, Sequence, Set

from . import guard

__all__ = ["GuardLink", "link", "spawn_detached"]


def spawn_detached(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` of a child detached from pytest: its own session and none of our descriptors.

    Its own session, so a signal to pytest's process group (Ctrl-C) does not
    reach it; ``close_fds``, so it holds none of pytest's pipes open -- the
    guard's above all, whose EOF is the watchdog's only news of our death.
    Used for the watchdog and for every target.
    """
    return subprocess.Popen(argv, start_new_session=True, close_fds=True, **kwargs)


class GuardLink:
    """pytest's end of the orphan guard: one watchdog per process, started lazily."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._owner = 0
        self._watched: Set[int] = set()

    def _start(self) -> None:
        path = getattr(guard, "__file__", None)
        if path and os.path.exists(path):
            # By path and isolated: no package __init__, no site, a fast start.
            argv = [sys.executable, "-I", "-S", path]
        else:
            argv = [sys.executable, "-m", "pytest_fdcluster.guard"]
        # Its stdin's write end is created close-on-exec and targets are spawned
        # detached too, so no target holds the pipe open.
        self._proc = spawn_detached(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._owner = os.getpid()

    def _usable(self) -> bool:
        # After a fork the child must not share its parent's guard: its death would go unseen.
        return self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None

    def _send(self, line: str) -> None:
        for _ in range(2):
            if not self._usable():
                self._start()
                replay = "".join(f"{guard.CMD_WATCH} {sid}\n" for sid in sorted(self._watched))
            else:
                replay = ""
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((replay + line).encode("ascii"))
                self._proc.stdin.flush()
                return
            except (BrokenPipeError, OSError, ValueError):
                # The guard died; start another and replay the watch list.
                self._proc = None
        raise RuntimeError("cannot talk to the fdcluster orphan guard process")

    def watch(self, sid: int) -> None:
        """Have the guard kill session ``sid`` if this process dies."""
        if os.name != "posix":
            return
        with self._lock:
            self._watched.add(sid)
            self._send(f"{guard.CMD_WATCH} {sid}\n")

    def forget(self, sid: int) -> None:
        """Session ``sid`` is gone; the guard need not kill it."""
        with self._lock:
            if sid not in self._watched:
                return
            self._watched.discard(sid)
            if self._usable():
                self._send(f"{guard.CMD_FORGET} {sid}\n")

    @property
    def pid(self) -> Optional[int]:
        """The guard process's pid, if one is running for this process."""
        with self._lock:
            return self._proc.pid if self._usable() and self._proc is not None else None

    @property
    def write_fd(self) -> Optional[int]:
        """The descriptor of the guard pipe's write end in this process."""
        with self._lock:
            if not self._usable() or self._proc is None or self._proc.stdin is None:
                return None
            return self._proc.stdin.fileno()

    def close(self) -> None:
        """Close the pipe: the guard kills whatever is still watched and exits."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or self._owner != os.getpid():
                return
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(guard.KILL_DEADLINE + 1.0)
            except subprocess.TimeoutExpired:
                pass


#: This process's link to its guard; closed at interpreter exit, which lets the guard finish.
link = GuardLink()
atexit.register(link.close)

