"""What changed between two snapshots of one process tree: descriptors and processes that came and went.

``later - earlier`` on two ``observe.Snapshot`` objects gives a ``SnapshotDiff``:
process by process (matched by pid), the descriptors that appeared and
vanished, and the processes that appeared or vanished whole.  A descriptor is
told apart by its number and what it points to, so a socket closed and another
accepted on the same number count as one vanished and one appeared.  Judging a
process whose descriptors were unreadable raises ``ObservationError`` (its
``fds`` do).  No pytest import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .descriptors import FdInfo, describe_fds
from .text import plural

if TYPE_CHECKING:  # only annotations: observe imports this module
    from .observe import ProcessView, Snapshot

__all__ = ["ProcessDiff", "SnapshotDiff"]


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
            if not self.process.fds_visible:
                return f"{head}: process appeared (descriptors unreadable)"
            return f"{head}: process appeared with {plural(self.process.fd_count, 'fd')}"
        changes = []
        if self.appeared:
            changes.append(f"+{plural(len(self.appeared), 'fd')}: {describe_fds(self.appeared)}")
        if self.vanished:
            changes.append(f"-{plural(len(self.vanished), 'fd')}: {describe_fds(self.vanished)}")
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
