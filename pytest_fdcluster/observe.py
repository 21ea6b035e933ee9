"""Snapshots of a target's process tree, taken from outside with psutil and /proc.

``snapshot(master_pid)`` records the master and its live descendants, and for
each one every open file descriptor: what it points to, whether a child would
inherit it, and for sockets their addresses and TCP state.  The target needs
no cooperation and may be written in any language.  Snapshots subtract into a
``SnapshotDiff`` (``snapshot_diff``, re-exported here) that says which
descriptors appeared and vanished.

Which processes are the target's comes from ``proctree``; what each
descriptor is, from ``descriptors`` (whose names are re-exported here).

Processes and descriptors that disappear while being read are skipped: a
snapshot of a churning tree never raises.  A process whose descriptors cannot
be read is kept, marked ``fds_visible=False``: taking the snapshot still
works, but everything that judges its descriptors (``fds``, ``fd_count``,
``tcp_connections``, ``owner_of``, diffs, the ``checks``) raises
``ObservationError`` naming the pid, the user and the reason -- or
``ObservationSkipped`` when ``BLIND`` (or the snapshot's ``blind``) is
``"skip"``.  Never a pass.  Snapshots are logged at DEBUG on
``fdcluster.observe``.  No pytest import.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Iterable, List, Mapping, NoReturn, Optional, Tuple

import psutil

from . import proctree
from .descriptors import (
    KINDS,
    TCP_KINDS,
    Address,
    FdInfo,
    ObservationError,
    ObservationSkipped,
    UnreadableFds,
    describe_fds,
    read_fds,
    resolve_sockets,
    unreadable_reason,
)
from .snapshot_diff import ProcessDiff, SnapshotDiff
from .text import MASTER, format_address

__all__ = [
    "BLIND",
    "BLIND_MODES",
    "KINDS",
    "MASTER",
    "UNOWNED",
    "Address",
    "FdInfo",
    "ObservationError",
    "ObservationSkipped",
    "ProcessDiff",
    "ProcessView",
    "Snapshot",
    "SnapshotDiff",
    "describe_fds",
    "format_address",
    "snapshot",
    "worker_label",
]

UNOWNED = "unowned"

#: What judging an unreadable process does: ``"fail"`` raises ``ObservationError`` (a test failure),
#: ``"skip"`` raises ``ObservationSkipped`` (a skip under pytest).  A snapshot's ``blind`` overrides it.
BLIND = "fail"
BLIND_MODES = ("fail", "skip")
#: The setting a user flips to skip instead; named in the error.
BLIND_OPTION = "--fdcluster-blind-checks"
BLIND_FAILED = ("cannot see the descriptors of {process} (pid {pid}, user {user}): {reason}; "
                "run the tests as that user or as root, or opt out with {option} skip")
BLIND_SKIPPED = ("cannot see the descriptors of {process} (pid {pid}, user {user}): {reason}; "
                 "skipped, as {option} is skip")

log = logging.getLogger("fdcluster.observe")

_CMDLINE_MAX = 80


def worker_label(index: int) -> str:
    """The default label of the ``index``-th worker, oldest first."""
    return f"worker {index}"


@dataclass(frozen=True, repr=False)
class ProcessView:
    """One process of the tree as it was when the snapshot was taken."""

    pid: int
    ppid: int
    label: str
    cmdline: str
    #: Open descriptors by number, in ascending order.
    fds: Dict[int, FdInfo]
    create_time: float = 0.0
    #: False when the process's descriptors could not be read (another user's
    #: process, without root): ``fds`` is then an ``UnreadableFds`` that raises when looked at.
    fds_visible: bool = True
    #: The user the process runs as.
    user: str = ""
    #: Why its descriptors could not be read (``PermissionError reading /proc/4242/fd``).
    fds_error: str = ""
    #: ``BLIND_MODES`` entry for this process; None: the module's ``BLIND`` at the time of judging.
    blind: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.fds_visible and not isinstance(self.fds, UnreadableFds):
            object.__setattr__(self, "fds", UnreadableFds(self.raise_blind, str(self)))

    def __str__(self) -> str:
        return f"{self.label} (pid {self.pid})"

    def __repr__(self) -> str:
        # Short, so that pytest's assertion rewriting stays readable.
        return f"<ProcessView {self} fds={self.fd_count if self.fds_visible else 'unreadable'}>"

    def raise_blind(self) -> NoReturn:
        """Raise what judging this unreadable process raises: ``ObservationError`` or ``ObservationSkipped``."""
        __tracebackhide__ = True
        mode = self.blind or BLIND
        if mode not in BLIND_MODES:
            raise ValueError(f"blind checks must be one of {BLIND_MODES}, not {mode!r}")
        template, error = (BLIND_SKIPPED, ObservationSkipped) if mode == "skip" else (BLIND_FAILED, ObservationError)
        reason = self.fds_error or "its descriptors were not readable"
        user = self.user or "unknown"
        message = template.format(process=self.label, pid=self.pid, user=user, reason=reason, option=BLIND_OPTION)
        raise error(message, self.pid, self.label, user, reason)

    @property
    def fd_count(self) -> int:
        """Number of open descriptors."""
        return len(self.fds)

    @property
    def kinds(self) -> Counter:
        """How many descriptors of each kind."""
        return Counter(info.kind for info in self.fds.values())

    @property
    def tcp_connections(self) -> List[FdInfo]:
        """Connected TCP sockets (those with a peer address)."""
        return [i for i in self.fds.values() if i.kind in TCP_KINDS and i.raddr is not None]

    @property
    def listening(self) -> List[FdInfo]:
        """TCP sockets in LISTEN."""
        return [i for i in self.fds.values() if i.status == psutil.CONN_LISTEN]

    @property
    def close_wait(self) -> List[FdInfo]:
        """TCP sockets whose peer has closed while this process still holds them."""
        return [i for i in self.fds.values() if i.status == psutil.CONN_CLOSE_WAIT]

    @property
    def inheritable_fds(self) -> List[FdInfo]:
        """Descriptors beyond stdin, stdout and stderr that survive exec."""
        return [i for i in self.fds.values() if i.fd > 2 and i.inheritable]


def _normalize(addr: Address) -> Address:
    """Compare addresses by host and port; an IPv4-mapped IPv6 host is its IPv4 host."""
    if isinstance(addr, str):
        return addr
    host = addr[0]
    if host.lower().startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, int(addr[1]))


@dataclass(frozen=True, repr=False)
class Snapshot:
    """The master and its live descendants, each with its open descriptors."""

    master_pid: int
    #: Master first, then workers oldest first.  Empty if the master was gone.
    processes: Dict[int, ProcessView]
    #: ``time.monotonic()`` when the snapshot started.
    taken_at: float = 0.0

    def __repr__(self) -> str:
        return f"<Snapshot of {self.master_pid}: {', '.join(map(str, self.processes.values())) or 'gone'}>"

    @property
    def unreadable(self) -> List[ProcessView]:
        """The processes whose descriptors could not be read; judging any of them raises."""
        return [p for p in self.processes.values() if not p.fds_visible]

    @property
    def master(self) -> Optional[ProcessView]:
        """The master, or None if it had exited (or was a zombie)."""
        return self.processes.get(self.master_pid)

    @property
    def workers(self) -> List[ProcessView]:
        """Every process of the tree except the master."""
        return [p for pid, p in self.processes.items() if pid != self.master_pid]

    @cached_property
    def _holders(self) -> Dict[Address, List[ProcessView]]:
        """Processes holding a connected TCP socket, by normalized peer address."""
        index: Dict[Address, List[ProcessView]] = {}
        for proc in self.processes.values():
            for info in proc.tcp_connections:
                holders = index.setdefault(_normalize(info.raddr), [])  # type: ignore[arg-type]
                if not holders or holders[-1] is not proc:
                    holders.append(proc)
        return index

    def owner_of(self, client_local_addr: Tuple[str, int]) -> Optional[ProcessView]:
        """The process serving the client whose socket is bound to ``client_local_addr``.

        That is the process holding a TCP socket whose peer address is the
        client's local address (``client.getsockname()``).  During a handoff
        both the master and a worker hold it; the worker is the owner then.
        """
        holders = self._holders.get(_normalize(tuple(client_local_addr[:2])), [])  # type: ignore[arg-type]
        for proc in holders:
            if proc.pid != self.master_pid:
                return proc
        return holders[0] if holders else None

    def connections_per_process(self, client_addrs: Iterable[Tuple[str, int]]) -> Dict[str, int]:
        """How many of these clients each process serves, by label.

        Every worker appears, with 0 if it serves none; ``master`` and
        ``unowned`` (no process of the tree holds it) appear only when counted.
        """
        counts = {w.label: 0 for w in self.workers}
        for addr in client_addrs:
            owner = self.owner_of(addr)
            label = owner.label if owner is not None else UNOWNED
            counts[label] = counts.get(label, 0) + 1
        return counts

    @property
    def master_client_sockets(self) -> List[FdInfo]:
        """Connected TCP sockets the master still holds."""
        master = self.master
        return master.tcp_connections if master is not None else []

    @property
    def client_sockets(self) -> List[Tuple[ProcessView, FdInfo]]:
        """Every connected TCP socket of every process, with the process holding it."""
        return [(p, info) for p in self.processes.values() for info in p.tcp_connections]

    @property
    def close_wait(self) -> List[Tuple[ProcessView, FdInfo]]:
        """Every socket in CLOSE_WAIT, with the process holding it."""
        return [(p, info) for p in self.processes.values() for info in p.close_wait]

    def __sub__(self, before: object) -> SnapshotDiff:
        if not isinstance(before, Snapshot):
            return NotImplemented
        return SnapshotDiff.between(before, self)


def _short_cmdline(proc: psutil.Process) -> str:
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except psutil.AccessDenied:
        text = proc.name()
    return text if len(text) <= _CMDLINE_MAX else text[: _CMDLINE_MAX - 3] + "..."


def _user(proc: psutil.Process) -> str:
    try:
        return proc.username()
    except (psutil.Error, KeyError):
        try:
            return f"uid {proc.uids().real}"
        except psutil.Error:
            return "unknown"


#: What ``_read_process`` learns: ppid, create time, command line, user, descriptors, why they are unreadable.
_Seen = Tuple[int, float, str, str, List[FdInfo], str]


def _read_process(proc: psutil.Process) -> Optional[_Seen]:
    """One process of the tree, or None for a zombie.  Raises psutil.NoSuchProcess (or OSError) if it is gone."""
    try:
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            ppid, create_time, cmdline = proc.ppid(), proc.create_time(), _short_cmdline(proc)
    except psutil.AccessDenied as exc:
        # Not even its status is ours to read (off Linux): still the target's, and not to be judged blind.
        return 0, 0.0, "?", _user(proc), [], unreadable_reason(proc.pid, exc)
    try:
        return ppid, create_time, cmdline, _user(proc), read_fds(proc), ""
    except (PermissionError, psutil.AccessDenied) as exc:
        return ppid, create_time, cmdline, _user(proc), [], unreadable_reason(proc.pid, exc)


def snapshot(master_pid: int, labels: Optional[Mapping[int, str]] = None, blind: Optional[str] = None) -> Snapshot:
    """Record ``master_pid`` and its live descendants with their open descriptors.

    Labels are ``master`` and ``worker 0``, ``worker 1``, ... by process
    creation time then pid, each overridden by ``labels[pid]`` where given.
    Zombies, and processes that exit while being read, are left out; a master
    that is gone yields an empty snapshot.  A process whose descriptors cannot
    be read is kept and raises when judged, as ``blind`` says (default: ``BLIND``).
    """
    if blind is not None and blind not in BLIND_MODES:
        raise ValueError(f"blind must be one of {BLIND_MODES}, not {blind!r}")
    taken_at = time.monotonic()
    found: Dict[int, _Seen] = {}
    for proc in proctree.target_processes(master_pid):
        try:
            seen = _read_process(proc)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue  # exited while being read
        if seen is not None:
            found[proc.pid] = seen
    # After every fd was listed, so the socket tables are at least as new as any socket seen.
    fds_by_pid = resolve_sockets({pid: seen[4] for pid, seen in found.items()})

    processes: Dict[int, ProcessView] = {}
    workers = 0
    for pid in sorted(found, key=lambda pid: (pid != master_pid, found[pid][1], pid)):
        ppid, create_time, cmdline, user, _, error = found[pid]
        if pid == master_pid:
            label = MASTER
        else:
            label, workers = worker_label(workers), workers + 1
        if labels and pid in labels:
            label = labels[pid]
        fd_map = {info.fd: info for info in sorted(fds_by_pid[pid], key=lambda i: i.fd)}
        processes[pid] = ProcessView(pid, ppid, label, cmdline, fd_map, create_time, not error, user, error, blind)
    snap = Snapshot(master_pid, processes, taken_at)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("snapshot of master pid %d in %.1f ms: %s", master_pid, (time.monotonic() - taken_at) * 1e3,
                  ", ".join(f"{p} {p.fd_count if p.fds_visible else 'unreadable'} fds" for p in processes.values())
                  or "gone")
    return snap
