"""What one process's file descriptors are, read from outside with /proc or psutil.

``read_fds(proc)`` lists a process's descriptors as ``FdInfo`` records: the
kind (tcp, unix, pipe, file, ...), what /proc/PID/fd links to, whether a
child would inherit it across exec, and for sockets their addresses and TCP
state.  On Linux descriptors come from /proc/PID/fd and /proc/PID/fdinfo,
and sockets are named afterwards by ``resolve_sockets`` from the socket
tables of the process's network namespace (/proc/PID/net/*), read once per
namespace and only as far as needed.  Elsewhere psutil's ``open_files`` and
``net_connections`` stand in, and ``inheritable`` is None because no other
platform exposes it.

A process whose descriptors cannot be read (another user's, without root;
a hardened /proc) gets an ``UnreadableFds`` table instead of an empty one:
any look at it raises ``ObservationError`` (or, when the user opted into
skipping blind checks, ``ObservationSkipped``), so no check passes without
seeing what it judges.

``observe`` builds snapshots of a whole process tree from these.  No pytest import.
"""

from __future__ import annotations

import os
import socket
import sys
import unittest
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Set, Tuple, Union

import psutil

from .text import format_address

__all__ = ["KINDS", "TCP_KINDS", "USE_PROCFS", "Address", "FdInfo", "ObservationError", "ObservationSkipped",
           "UnreadableFds", "describe_fds", "read_fds", "resolve_sockets", "unreadable_reason"]

#: An inet socket address as (host, port), or a Unix socket path.
Address = Union[Tuple[str, int], str]

KINDS = ("tcp", "tcp6", "udp", "unix", "pipe", "file", "anon", "socket", "other")
TCP_KINDS = ("tcp", "tcp6")

# The kernel reports fdinfo flags in its own ABI, which is the running
# interpreter's on the same machine; the literal is x86/arm's value.
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)

# Fallback to psutil where /proc has no per-process fd directory (macOS, BSD).
USE_PROCFS = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")

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


class ObservationError(AssertionError):
    """A check or observation could not see what it judges: a process's descriptors were unreadable.

    An ``AssertionError``, so pytest reports a failure; ``pid``, ``label``,
    ``user`` and ``reason`` say whose descriptors and why.
    """

    def __init__(self, message: str, pid: int, label: str, user: str, reason: str) -> None:
        super().__init__(message)
        self.pid, self.label, self.user, self.reason = pid, label, user, reason


class ObservationSkipped(unittest.SkipTest):
    """The same blindness when the user chose to skip such checks.

    A ``unittest.SkipTest``, which pytest turns into a skip of the test
    wherever it is raised, with the message as the reason.
    """

    def __init__(self, message: str, pid: int, label: str, user: str, reason: str) -> None:
        super().__init__(message)
        self.pid, self.label, self.user, self.reason = pid, label, user, reason


class UnreadableFds(Mapping[int, FdInfo]):
    """The descriptor table of a process that could not be read: every look at it raises ``fail()``'s error.

    Empty would be a lie: a check iterating it would pass without seeing anything.
    """

    def __init__(self, fail: Callable[[], NoReturn], what: str) -> None:
        self._fail = fail
        self._what = what

    def __getitem__(self, fd: int) -> FdInfo:
        __tracebackhide__ = True
        self._fail()

    def __iter__(self) -> Iterator[int]:
        __tracebackhide__ = True
        self._fail()

    def __len__(self) -> int:
        __tracebackhide__ = True
        self._fail()

    def __contains__(self, fd: object) -> bool:
        __tracebackhide__ = True
        self._fail()

    def __eq__(self, other: object) -> bool:
        return other is self

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<unreadable fds of {self._what}>"


def unreadable_reason(pid: int, exc: BaseException) -> str:
    """``PermissionError reading /proc/4242/fd``: what was refused, for messages."""
    where = getattr(exc, "filename", None) or (f"/proc/{pid}/fd" if USE_PROCFS else "its open files")
    return f"{type(exc).__name__} reading {where}"


def describe_fds(fds: Sequence[FdInfo], limit: int = 10) -> str:
    """``7 tcp ..., 9 unix`` for the first ``limit`` fds, then ``... and N more``."""
    text = ", ".join(str(info) for info in fds[:limit])
    if len(fds) > limit:
        text += f", ... and {len(fds) - limit} more"
    return text


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


def resolve_sockets(fds_by_pid: Dict[int, List[FdInfo]]) -> Dict[int, List[FdInfo]]:
    """Fill in kind, addresses and TCP state of every socket, reading each netns's tables once.

    Needed after ``read_fds`` on /proc only; elsewhere psutil already named the sockets and
    ``fds_by_pid`` comes back as it is.
    """
    if not USE_PROCFS:
        return fds_by_pid
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


def read_fds(proc: psutil.Process) -> List[FdInfo]:
    """``proc``'s descriptors; on /proc their sockets still need ``resolve_sockets``.

    Raises psutil.NoSuchProcess, FileNotFoundError or ProcessLookupError if the
    process is gone, and PermissionError or psutil.AccessDenied if its
    descriptors are not ours to read.
    """
    return _fds_from_procfs(proc.pid) if USE_PROCFS else _fds_from_psutil(proc)
