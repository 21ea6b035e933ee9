"""Snapshots of a target's process tree, taken from outside with psutil and /proc.

``snapshot(master_pid)`` records the master and its live descendants, and for
each one every open file descriptor: what it points to, whether a child would
inherit it, and for sockets their addresses and TCP state.  The target needs
no cooperation and may be written in any language.  Snapshots subtract into a
``SnapshotDiff`` that says which descriptors appeared and vanished.

On Linux descriptors come from /proc/PID/fd, /proc/PID/fdinfo and the socket
tables of the target's network namespace (/proc/PID/net/*), read once per
snapshot and only as far as needed.  Elsewhere psutil's ``open_files`` and
``net_connections`` stand in, and ``inheritable`` is None because no other
platform exposes it.

Processes and descriptors that disappear while being read are skipped: a
snapshot of a churning tree never raises.  No pytest import.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import psutil

__all__ = [
    "KINDS",
    "MASTER",
    "UNOWNED",
    "Address",
    "FdInfo",
    "ProcessDiff",
    "ProcessView",
    "Snapshot",
    "SnapshotDiff",
    "describe_fds",
    "format_address",
    "snapshot",
    "worker_label",
]

#: An inet socket address as (host, port), or a Unix socket path.
Address = Union[Tuple[str, int], str]

MASTER = "master"
UNOWNED = "unowned"
KINDS = ("tcp", "tcp6", "udp", "unix", "pipe", "file", "anon", "socket", "other")
TCP_KINDS = ("tcp", "tcp6")

# The kernel reports fdinfo flags in its own ABI, which is the running
# interpreter's on the same machine; the literal is x86/arm's value.
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)

# Fallback to psutil where /proc has no per-process fd directory (macOS, BSD).
_USE_PROCFS = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")

# Column "st" of /proc/net/tcp, named as psutil names them.
_TCP_STATES = {
    "01": psutil.CONN_ESTABLISHED,
    "02": psutil.CONN_SYN_SENT,
    "03": psutil.CONN_SYN_RECV,
    "04": psutil.CONN_FIN_WAIT1,
    "05": psutil.CONN_FIN_WAIT2,
    "06": psutil.CONN_TIME_WAIT,
    "07": psutil.CONN_CLOSE,
    "08": psutil.CONN_CLOSE_WAIT,
    "09": psutil.CONN_LAST_ACK,
    "0A": psutil.CONN_LISTEN,
    "0B": psutil.CONN_CLOSING,
}

_CMDLINE_MAX = 80


def worker_label(index: int) -> str:
    """The default label of the ``index``-th worker, oldest first."""
    return f"worker {index}"


def format_address(addr: Optional[Address]) -> str:
    """``127.0.0.1:5000``, ``[::1]:5000``, a Unix path, or ``-`` for none."""
    if addr is None:
        return "-"
    if isinstance(addr, str):
        return addr or "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class FdInfo:
    """One open file descriptor of one process."""

    fd: int
    #: One of ``KINDS``.
    kind: str
    #: What /proc/PID/fd/FD links to, e.g. ``socket:[4242]`` or ``/dev/null``.
    target: str
    #: True when a child would inherit it across exec (O_CLOEXEC not set);
    #: None where the platform cannot tell.
    inheritable: Optional[bool] = None
    laddr: Optional[Address] = None
    raddr: Optional[Address] = None
    #: TCP state as psutil names it (``ESTABLISHED``, ``CLOSE_WAIT``, ``LISTEN``).
    status: Optional[str] = None

    def __str__(self) -> str:
        parts = [str(self.fd), self.kind]
        if self.kind in TCP_KINDS or self.kind == "udp":
            if self.raddr is not None:
                parts.append(f"{format_address(self.laddr)}->{format_address(self.raddr)}")
            elif self.laddr is not None:
                parts.append(format_address(self.laddr))
            if self.status:
                parts.append(self.status)
        elif self.kind == "unix" and self.laddr:
            parts.append(format_address(self.laddr))
        elif self.kind in ("file", "other"):
            parts.append(self.target)
        elif self.kind == "anon":
            parts.append(self.target.split(":", 1)[-1].strip("[]"))
        return " ".join(parts)


def describe_fds(fds: Sequence[FdInfo], limit: int = 10) -> str:
    """``7 tcp ..., 9 unix`` for the first ``limit`` fds, then ``... and N more``."""
    text = ", ".join(str(info) for info in fds[:limit])
    if len(fds) > limit:
        text += f", ... and {len(fds) - limit} more"
    return text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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
    #: process, without root): ``fds`` is then empty, not known to be empty.
    fds_visible: bool = True

    def __str__(self) -> str:
        return f"{self.label} (pid {self.pid})"

    def __repr__(self) -> str:
        # Short, so that pytest's assertion rewriting stays readable.
        return f"<ProcessView {self} fds={self.fd_count}>"

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


@dataclass(frozen=True)
class ProcessDiff:
    """How one process's descriptors changed; ``before`` or ``after`` is None if it came or went."""

    before: Optional[ProcessView]
    after: Optional[ProcessView]
    appeared: Tuple[FdInfo, ...] = ()
    vanished: Tuple[FdInfo, ...] = ()

    @property
    def process(self) -> ProcessView:
        """The latest view of the process."""
        return self.after or self.before  # type: ignore[return-value]

    @property
    def process_appeared(self) -> bool:
        return self.before is None

    @property
    def process_vanished(self) -> bool:
        return self.after is None

    @property
    def is_empty(self) -> bool:
        return not (self.appeared or self.vanished or self.process_appeared or self.process_vanished)

    def __str__(self) -> str:
        head = str(self.process)
        if self.process_vanished:
            return f"{head}: process vanished"
        if self.process_appeared:
            return f"{head}: process appeared with {_plural(self.process.fd_count, 'fd')}"
        changes = []
        if self.appeared:
            changes.append(f"+{_plural(len(self.appeared), 'fd')}: {describe_fds(self.appeared)}")
        if self.vanished:
            changes.append(f"-{_plural(len(self.vanished), 'fd')}: {describe_fds(self.vanished)}")
        return f"{head}: " + "; ".join(changes) if changes else f"{head}: no change"


def _fd_identity(info: FdInfo) -> Tuple[int, str]:
    # fd numbers are reused at once: a closed socket and the next one accepted
    # on the same number are different descriptors, told apart by their inode.
    return (info.fd, info.target)


def _diff_fds(before: ProcessView, after: ProcessView) -> Tuple[Tuple[FdInfo, ...], Tuple[FdInfo, ...]]:
    old = {_fd_identity(i): i for i in before.fds.values()}
    new = {_fd_identity(i): i for i in after.fds.values()}
    appeared = tuple(i for key, i in new.items() if key not in old)
    vanished = tuple(i for key, i in old.items() if key not in new)
    return appeared, vanished


@dataclass(frozen=True, repr=False)
class SnapshotDiff:
    """What changed between two snapshots of one tree, process by process (matched by pid)."""

    before: Snapshot
    after: Snapshot
    #: Only the processes that changed: those of ``after`` in its order, then the vanished.
    changes: Tuple[ProcessDiff, ...]

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> SnapshotDiff:
        """Compare ``before`` with the later ``after``."""
        changes = []
        for pid, proc in after.processes.items():
            old = before.processes.get(pid)
            if old is None:
                changes.append(ProcessDiff(None, proc))
                continue
            appeared, vanished = _diff_fds(old, proc)
            if appeared or vanished:
                changes.append(ProcessDiff(old, proc, appeared, vanished))
        for pid, proc in before.processes.items():
            if pid not in after.processes:
                changes.append(ProcessDiff(proc, None))
        return cls(before, after, tuple(changes))

    @property
    def appeared(self) -> Dict[int, Tuple[FdInfo, ...]]:
        """New descriptors by pid, for processes present in both snapshots."""
        return {d.process.pid: d.appeared for d in self.changes if d.appeared}

    @property
    def vanished(self) -> Dict[int, Tuple[FdInfo, ...]]:
        """Closed descriptors by pid, for processes present in both snapshots."""
        return {d.process.pid: d.vanished for d in self.changes if d.vanished}

    @property
    def appeared_processes(self) -> List[ProcessView]:
        return [d.after for d in self.changes if d.process_appeared]  # type: ignore[misc]

    @property
    def vanished_processes(self) -> List[ProcessView]:
        return [d.before for d in self.changes if d.process_vanished]  # type: ignore[misc]

    @property
    def is_empty(self) -> bool:
        return not self.changes

    def __repr__(self) -> str:
        return f"<SnapshotDiff {len(self.changes)} processes changed>"

    def __str__(self) -> str:
        if not self.changes:
            return "no fd changes"
        return "\n".join(str(d) for d in self.changes)


# -- reading a process ------------------------------------------------------

_SockEntry = Tuple[str, Optional[Address], Optional[Address], Optional[str]]


def _kind_of(target: str) -> str:
    if target.startswith("socket:"):
        return "socket"  # refined from the socket tables later
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("anon_inode:"):
        return "anon"
    if target.startswith("/"):
        return "file"
    return "other"


def _inode(target: str) -> str:
    return target[target.find("[") + 1 : -1]


def _decode_inet(field: str, family: int) -> Optional[Tuple[str, int]]:
    """Decode ``0100007F:1388`` (address in host byte order per 32-bit word)."""
    host_hex, port_hex = field.split(":")
    port = int(port_hex, 16)
    if not port:
        return None
    raw = bytes.fromhex(host_hex)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return (socket.inet_ntop(family, raw), port)


def _parse_inet_row(cols: List[str], kind: str, family: int) -> _SockEntry:
    status = _TCP_STATES.get(cols[3]) if kind in TCP_KINDS else None
    return (kind, _decode_inet(cols[1], family), _decode_inet(cols[2], family), status)


def _parse_unix_row(cols: List[str]) -> _SockEntry:
    return ("unix", cols[7].strip() if len(cols) > 7 else None, None, None)


# Cheapest and most common in a prefork tree first: reading /proc/net/tcp
# walks the kernel's whole hash table, a millisecond or more on a busy host.
_SOCKET_TABLES = (
    ("unix", "unix", socket.AF_UNIX, 6),
    ("tcp", "tcp", socket.AF_INET, 9),
    ("tcp6", "tcp6", socket.AF_INET6, 9),
    ("udp", "udp", socket.AF_INET, 9),
    ("udp6", "udp", socket.AF_INET6, 9),
)


def _read_socket_tables(pids: List[int], wanted: Set[str]) -> Dict[str, _SockEntry]:
    """Entries for the ``wanted`` inodes from the socket tables of the netns of ``pids``.

    Stops reading tables once every inode is found.  Any of ``pids`` will do,
    as they share a namespace; the next is tried if one has exited.
    """
    found: Dict[str, _SockEntry] = {}
    for name, kind, family, inode_col in _SOCKET_TABLES:
        if not wanted:
            break
        lines: List[str] = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/net/{name}") as f:
                    lines = f.readlines()[1:]
                break
            except OSError:
                lines = []  # process gone, or protocol absent (no IPv6)
        for line in lines:
            cols = line.split(None, 7) if kind == "unix" else line.split()
            if len(cols) <= inode_col or cols[inode_col] not in wanted:
                continue
            inode = cols[inode_col]
            found[inode] = _parse_unix_row(cols) if kind == "unix" else _parse_inet_row(cols, kind, family)
            wanted.discard(inode)
    return found


def _netns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return f"pid {pid}"


def _resolve_sockets(fds_by_pid: Dict[int, List[FdInfo]]) -> Dict[int, List[FdInfo]]:
    """Fill in kind, addresses and TCP state of every socket, reading each netns's tables once."""
    pids_by_netns: Dict[str, List[int]] = {}
    wanted_by_netns: Dict[str, Set[str]] = {}
    for pid, fds in fds_by_pid.items():
        inodes = {_inode(info.target) for info in fds if info.kind == "socket"}
        if inodes:
            netns = _netns(pid)
            pids_by_netns.setdefault(netns, []).append(pid)
            wanted_by_netns.setdefault(netns, set()).update(inodes)
    # Socket inodes are unique across namespaces, so one map serves them all.
    entries: Dict[str, _SockEntry] = {}
    for netns, wanted in wanted_by_netns.items():
        entries.update(_read_socket_tables(pids_by_netns[netns], wanted))
    resolved = {}
    for pid, fds in fds_by_pid.items():
        resolved[pid] = [_with_socket(info, entries.get(_inode(info.target))) for info in fds]
    return resolved


def _with_socket(info: FdInfo, entry: Optional[_SockEntry]) -> FdInfo:
    if info.kind != "socket" or entry is None:
        return info  # not a socket, or one of a family we do not parse (netlink, raw)
    kind, laddr, raddr, status = entry
    return FdInfo(info.fd, kind, info.target, info.inheritable, laddr, raddr, status)


def _read_flags(pid: int, fd: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fds_from_procfs(pid: int) -> List[FdInfo]:
    """Descriptors from /proc, sockets unresolved.  Raises FileNotFoundError if the process is gone."""
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed since the listing
        flags = _read_flags(pid, fd)
        inheritable = None if flags is None else not flags & O_CLOEXEC
        fds.append(FdInfo(fd, _kind_of(target), target, inheritable))
    return fds


def _psutil_address(addr: object) -> Optional[Address]:
    if not addr:
        return None
    if isinstance(addr, str):
        return addr
    return (addr[0], addr[1])  # type: ignore[index]


def _fds_from_psutil(proc: psutil.Process) -> List[FdInfo]:
    """Descriptors psutil can name with a number: regular files and inet/Unix sockets."""
    fds: Dict[int, FdInfo] = {}
    for f in proc.open_files():
        if f.fd >= 0:
            fds[f.fd] = FdInfo(f.fd, "file", f.path)
    # net_connections is psutil >= 6; connections its older name.
    connections = getattr(proc, "net_connections", None) or proc.connections
    for c in connections(kind="all"):
        if c.fd < 0:
            continue
        if c.family == socket.AF_UNIX:
            kind = "unix"
        elif c.type == socket.SOCK_STREAM:
            kind = "tcp6" if c.family == socket.AF_INET6 else "tcp"
        else:
            kind = "udp"
        status = c.status if c.status != psutil.CONN_NONE else None
        fds[c.fd] = FdInfo(
            c.fd, kind, f"socket:{kind}", None, _psutil_address(c.laddr), _psutil_address(c.raddr), status
        )
    return [fds[fd] for fd in sorted(fds)]


def _short_cmdline(proc: psutil.Process) -> str:
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except psutil.AccessDenied:
        text = proc.name()
    return text if len(text) <= _CMDLINE_MAX else text[: _CMDLINE_MAX - 3] + "..."


def _tree(master_pid: int) -> List[psutil.Process]:
    try:
        master = psutil.Process(master_pid)
        return [master] + master.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def snapshot(master_pid: int, labels: Optional[Mapping[int, str]] = None) -> Snapshot:
    """Record ``master_pid`` and its live descendants with their open descriptors.

    Labels are ``master`` and ``worker 0``, ``worker 1``, ... by process
    creation time then pid, each overridden by ``labels[pid]`` where given.
    Zombies, and processes that exit while being read, are left out; a master
    that is gone yields an empty snapshot.
    """
    taken_at = time.monotonic()
    found: Dict[int, Tuple[int, float, str, bool]] = {}  # pid -> ppid, create_time, cmdline, visible
    fds_by_pid: Dict[int, List[FdInfo]] = {}
    for proc in _tree(master_pid):
        try:
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                ppid, create_time, cmdline = proc.ppid(), proc.create_time(), _short_cmdline(proc)
            visible = True
            try:
                fds = _fds_from_procfs(proc.pid) if _USE_PROCFS else _fds_from_psutil(proc)
            except (PermissionError, psutil.AccessDenied):
                fds, visible = [], False
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue  # exited while being read
        except psutil.AccessDenied:
            continue  # not even its status is ours to read (another user's, off Linux)
        found[proc.pid] = (ppid, create_time, cmdline, visible)
        fds_by_pid[proc.pid] = fds
    if _USE_PROCFS:
        # After every fd was listed, so the tables are at least as new as any socket seen.
        fds_by_pid = _resolve_sockets(fds_by_pid)

    processes: Dict[int, ProcessView] = {}
    workers = 0
    for pid in sorted(found, key=lambda pid: (pid != master_pid, found[pid][1], pid)):
        ppid, create_time, cmdline, visible = found[pid]
        if pid == master_pid:
            label = MASTER
        else:
            label, workers = worker_label(workers), workers + 1
        if labels and pid in labels:
            label = labels[pid]
        fd_map = {info.fd: info for info in sorted(fds_by_pid[pid], key=lambda i: i.fd)}
        processes[pid] = ProcessView(pid, ppid, label, cmdline, fd_map, create_time, visible)
    return Snapshot(master_pid, processes, taken_at)
