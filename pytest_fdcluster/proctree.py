"""Which processes are a target's, and killing a target's session.

A target's master is started in a session of its own, so the target's
processes are the master, its descendants while it lives, and every process
still in its session -- which finds workers orphaned by a master that died,
even when they moved to another process group.  ``target_processes`` is the
one answer to "which processes are the target's"; ``RunningTarget``, the
observer and the orphan guard all ask it (or its session half).

The session half imports the standard library only: the orphan guard
(``guard.py``) runs as an isolated script that must start in milliseconds and
loads this file by path, without site-packages, so psutil is optional here:
only the tree half, used in pytest's process, needs it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import AbstractSet, Dict, Iterable, List, Optional, Sequence, Tuple, Union

try:
    import psutil
except ImportError:  # the orphan guard runs without site-packages and needs only the /proc half
    psutil = None

__all__ = ["KILL_DEADLINE", "is_live", "kill_session", "kill_sessions", "live_oldest_first", "session_pids",
           "target_processes"]

#: Upper bound on the guard's kill loop, for processes that fork while being killed.
KILL_DEADLINE = 5.0

_KILL_RESCAN_INTERVAL = 0.005


# -- sessions: standard library only -------------------------------------------


def _read_stat(pid: str) -> Optional[Tuple[str, int]]:
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


def _procfs_session_pids(wanted: AbstractSet[int]) -> List[int]:
    found: List[int] = []
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


def _psutil_session_pids(wanted: AbstractSet[int]) -> List[int]:
    if psutil is None:  # the guard, run without site-packages, has only /proc
        return []
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in wanted and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def session_pids(sids: Iterable[int]) -> List[int]:
    """Pids of live (non-zombie) processes whose session id is in ``sids``.

    Read from /proc where there is one (fast, and all the guard has); psutil elsewhere.
    """
    wanted = set(sids)
    if os.path.isdir("/proc/self"):
        return _procfs_session_pids(wanted)
    return _psutil_session_pids(wanted)


def _sigkill_each(pids: Iterable[int]) -> List[int]:
    """SIGKILL each of ``pids``; return those the signal was delivered to."""
    hit = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            hit.append(pid)
        except OSError:
            pass
    return hit


def _sigkill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def kill_session(sid: int, extra: Sequence[psutil.Process] = ()) -> List[int]:
    """One volley of SIGKILL: the process group ``sid``, every process of session ``sid``, and ``extra``.

    ``extra`` is for descendants seen earlier that may have left the session.
    Returns the pids alive just before, so the caller can tell which processes
    outlived the master; the caller decides whether to look again.
    """
    # Listed before killing: after the killpg most of them are already gone.
    alive = set(session_pids([sid]))
    live_extra = [proc for proc in extra if is_live(proc)]
    alive.update(proc.pid for proc in live_extra)
    _sigkill_group(sid)
    listed = session_pids([sid])
    _sigkill_each(listed)
    alive.update(listed)
    for proc in live_extra:
        _kill_process(proc)
    return sorted(alive)


def kill_sessions(sids: Iterable[int], deadline: float = KILL_DEADLINE) -> List[int]:
    """SIGKILL every process of the sessions ``sids`` until none is left; return the pids killed.

    Killing the process group catches the common case at once; the /proc scan
    catches processes that moved to another group but stayed in the session.
    Repeats until a scan finds nothing, since a process may fork mid-kill.
    """
    sids = set(sids)
    own = os.getpid()
    killed: List[int] = []
    for sid in sids:
        _sigkill_group(sid)
    end = time.monotonic() + deadline
    while True:
        pids = [pid for pid in session_pids(sids) if pid != own]
        if not pids or time.monotonic() > end:
            return killed
        killed.extend(_sigkill_each(pids))
        # The kernel delivers SIGKILL asynchronously; give it a moment before rescanning.
        time.sleep(_KILL_RESCAN_INTERVAL)


# -- the target's tree: psutil ---------------------------------------------------


def target_processes(
    master: Union[int, psutil.Process, None], session: Optional[int] = None
) -> List[psutil.Process]:
    """The master (while it exists), its descendants, and -- with ``session`` -- every process of that session.

    The one answer to "which processes are the target's".  Unsorted and
    unfiltered: zombies are included, since every caller reads each process's
    status anyway.  Pass the master as a ``psutil.Process`` kept from its start
    to be safe from pid reuse, or as a pid; ``None`` when it could not be
    looked up at all (then only the session is searched).
    """
    found: Dict[int, psutil.Process] = {}
    if master is not None:
        try:
            proc = master if isinstance(master, psutil.Process) else psutil.Process(master)
            children = proc.children(recursive=True)
        except psutil.Error:
            pass  # gone, or not ours to read: only its session, if any, is left to search
        else:
            found[proc.pid] = proc
            found.update((child.pid, child) for child in children)
    if session is not None:
        for pid in session_pids([session]):
            if pid not in found:
                try:
                    found[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
    return list(found.values())


def is_live(proc: psutil.Process) -> bool:
    """Running and not a zombie (psutil refuses to call a reused pid running)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_process(proc: psutil.Process) -> None:
    # psutil refuses to signal a reused pid, so a stale snapshot is harmless.
    try:
        proc.kill()
    except psutil.Error:
        pass


def live_oldest_first(procs: Iterable[psutil.Process]) -> List[psutil.Process]:
    """The non-zombie ones of ``procs``, by creation time then pid."""
    live = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                live.append((proc.create_time(), proc.pid, proc))
        except psutil.Error:
            continue
    live.sort(key=lambda item: (item[0], item[1]))
    return [proc for _, _, proc in live]
