"""What a target's processes consume, read and constrained from outside: CPU, memory, descriptors, connections.

Pure functions on pids and snapshots, for the resource invariants of the
chaos suite (quiescence, bounded memory, descriptor exhaustion, exactly one
holder).  The target needs no cooperation and may be written in any language:

- CPU time comes from per-task schedstat (``/proc/PID/task/*/schedstat``,
  first field: nanoseconds on a CPU), summed over the process's threads.
  It counts only what the process itself ran, so it does not grow when the
  machine is loaded by others: a waiting process accrues nothing.
- Resident memory comes from psutil.
- ``nofile_limit`` lowers a process's RLIMIT_NOFILE from outside (prlimit)
  and restores it; ``lowest_free_fd`` says where to put the limit so that no
  free descriptor number stays below it.
- ``holders`` names every process of a snapshot holding a client's connection.

Whatever cannot be read or changed raises ``Unobservable``, an
``AssertionError``: a check that cannot see fails and says why, it never
passes.  No pytest import.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Tuple

import psutil

from .observe import ProcessView, Snapshot
from .text import format_address

__all__ = [
    "ProcessGone",
    "Unobservable",
    "cpu_over",
    "cpu_seconds",
    "cpu_window",
    "describe_holders",
    "holders",
    "lowest_free_fd",
    "nofile_limit",
    "not_held_by_one_worker",
    "open_fds",
    "rss",
]


class Unobservable(AssertionError):
    """A process's resource could not be read or changed from outside; the check that needed it fails."""


class ProcessGone(Unobservable):
    """The process exited (or became a zombie) before it could be measured."""


# -- CPU ----------------------------------------------------------------------------------


def _gone(pid: int, what: str) -> ProcessGone:
    return ProcessGone(f"cannot measure {what} of pid {pid}: the process is gone")


def cpu_seconds(pid: int) -> float:
    """Seconds ``pid`` has spent on a CPU: the sum of its live threads' schedstat run time.

    A thread that exits drops out of the sum; prefork servers keep their
    threads, so a measured window is not shortened by that in practice.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise _gone(pid, "the CPU time") from None
    except OSError as exc:
        raise Unobservable(f"cannot list the threads of pid {pid} (/proc/{pid}/task): {exc.strerror}") from None
    total = 0
    read = 0
    for tid in tids:
        path = f"/proc/{pid}/task/{tid}/schedstat"
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
            read += 1
        except FileNotFoundError:
            continue  # the thread exited since the listing
        except (OSError, ValueError, IndexError) as exc:
            raise Unobservable(f"cannot read the CPU time of pid {pid} from {path}: {exc}") from None
    if not read:
        raise _gone(pid, "the CPU time")
    return total / 1e9


def cpu_window(pids: Iterable[int], seconds: float = 1.0) -> Dict[int, float]:
    """Each process's share of one core over a window of ``seconds``: 1.0 is a core kept busy throughout.

    The window is the measurement itself (CPU time at its start and end,
    divided by the wall time between), not a wait for some state.  Raises
    ``ProcessGone`` if a process exits before the end, ``Unobservable`` if
    one cannot be read.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    pids = list(pids)
    started = time.monotonic()
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(seconds)
    after = {pid: cpu_seconds(pid) for pid in pids}
    elapsed = time.monotonic() - started
    for pid in pids:
        if not _alive(pid):
            raise ProcessGone(f"pid {pid} exited during the {seconds:g} s CPU window")
    return {pid: max(0.0, after[pid] - before[pid]) / elapsed for pid in pids}


def cpu_over(
    shares: Dict[int, float], baseline: Dict[int, float], floor: float = 0.05, factor: float = 3.0
) -> Dict[int, Tuple[float, float]]:
    """The processes of ``shares`` above ``max(floor, factor x baseline share)``, each with (share, bound).

    A process missing from ``baseline`` (a worker started since) is held to ``floor``.
    """
    over = {}
    for pid, share in shares.items():
        bound = max(floor, factor * baseline.get(pid, 0.0))
        if share > bound:
            over[pid] = (share, bound)
    return over


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- memory -------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        raise _gone(pid, "the resident memory") from None
    except psutil.AccessDenied:
        raise Unobservable(f"cannot read the resident memory of pid {pid}: access denied") from None


# -- descriptors --------------------------------------------------------------------------


def open_fds(pid: int) -> List[int]:
    """The descriptor numbers ``pid`` has open, ascending, from /proc/PID/fd."""
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        raise _gone(pid, "the descriptors") from None
    except OSError as exc:
        raise Unobservable(f"cannot list the descriptors of pid {pid} (/proc/{pid}/fd): {exc.strerror}") from None


def lowest_free_fd(pid: int) -> int:
    """The lowest descriptor number ``pid`` does not use: the number its next open would get.

    RLIMIT_NOFILE caps descriptor numbers, not their count: a soft limit set
    to this number leaves no free number below it, so the next ``accept``,
    ``socket`` or ``socketpair`` fails with EMFILE.
    """
    used = set(open_fds(pid))
    number = 0
    while number in used:
        number += 1
    return number


def _nofile(proc: psutil.Process) -> Tuple[int, int]:
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    return int(soft), int(hard)


@contextmanager
def nofile_limit(pid: int, soft: int) -> Iterator[Tuple[int, int]]:
    """Set ``pid``'s soft RLIMIT_NOFILE to ``soft`` for the block, then restore it; yields the old (soft, hard).

    Restores even when the block raises; a process that exited meanwhile
    has nothing to restore.  Raises ``Unobservable`` when the limit cannot be
    changed (another user's process without CAP_SYS_RESOURCE).
    """
    try:
        proc = psutil.Process(pid)
        previous = _nofile(proc)
        proc.rlimit(psutil.RLIMIT_NOFILE, (min(soft, previous[1]), previous[1]))
    except psutil.NoSuchProcess:
        raise _gone(pid, "RLIMIT_NOFILE") from None
    except (psutil.AccessDenied, OSError) as exc:
        raise Unobservable(f"cannot set RLIMIT_NOFILE of pid {pid} to {soft} from outside "
                           f"(needs the same user or CAP_SYS_RESOURCE): {exc}") from None
    try:
        yield previous
    finally:
        try:
            proc.rlimit(psutil.RLIMIT_NOFILE, previous)
        except psutil.NoSuchProcess:
            pass  # it exited while limited: nothing left to restore


# -- connections --------------------------------------------------------------------------


def _host_port(addr: object) -> Tuple[str, int]:
    """(host, port) with an IPv4-mapped IPv6 host as its IPv4 host, so both spellings compare equal."""
    host, port = addr[0], int(addr[1])  # type: ignore[index]
    if host.lower().startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


def holders(snap: Snapshot, client_address: Tuple[str, int]) -> List[ProcessView]:
    """Every process of ``snap`` holding a TCP socket whose peer is ``client_address``, master first.

    ``client_address`` is the client's own end (``client.getsockname()``).
    Raises ``Unobservable`` if a process's descriptors could not be read:
    an unseen holder would make "nobody" or "exactly one" a guess.
    """
    hidden = [str(p) for p in snap.processes.values() if not p.fds_visible]
    if hidden:
        raise Unobservable(f"cannot read the descriptors of {', '.join(hidden)} (/proc/PID/fd): "
                           f"who holds {format_address(client_address)} cannot be told")
    wanted = _host_port(client_address)
    found: List[ProcessView] = []
    for proc, info in snap.client_sockets:
        if _host_port(info.raddr) == wanted and (not found or found[-1] is not proc):
            found.append(proc)
    return found


def describe_holders(views: List[ProcessView]) -> str:
    """``master pid 100 and worker 1 pid 102``, or ``nobody``."""
    if not views:
        return "nobody"
    names = [f"{view.label} pid {view.pid}" for view in views]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def not_held_by_one_worker(
    snap: Snapshot, client_addresses: Iterable[Tuple[str, int]]
) -> Dict[Tuple[str, int], List[ProcessView]]:
    """The connections among ``client_addresses`` not held by exactly one worker, each with its holders.

    A worker is any process of the tree but the master; an empty result
    means every connection is held by one worker and by nobody else.
    """
    wrong = {}
    for address in client_addresses:
        found = holders(snap, address)
        if len(found) != 1 or found[0].pid == snap.master_pid:
            wrong[tuple(address[:2])] = found
    return wrong  # type: ignore[return-value]
