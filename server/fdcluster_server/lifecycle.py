"""The master's records of its workers: one ``Process`` per forked worker, one ``Slot`` per worker index.

Also the policies those records feed: how long a slot waits before its next
respawn (``respawn_delay``), which workers the heartbeat watchdog gives up on
(``Watchdog``), and the descriptor limit raised at start.  Runs in
the master only; nothing here forks or signals.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional

from . import channel as ch

log = logging.getLogger("fdcluster.master")

# A worker that lived this long was healthy: its death starts a new count of deaths in a row.  Any shorter
# life, one second or one frame from a hostile client, counts, so a stream of deaths backs off.
STABLE_LIFETIME = 10.0
BACKOFF_BASE = 0.05  # the n-th death in a row (n >= 2) waits BACKOFF_BASE * 2**n, up to --respawn-backoff-max


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (workers inherit it); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft


def describe_status(status: int) -> str:
    """'killed by SIGKILL' or 'exited with code 3', for log lines and tests alike."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class Process:
    """The master's record of one worker process, from fork to reaping."""

    __slots__ = ("index", "pid", "channel", "started", "ready", "heard", "killed")

    def __init__(self, index: int, pid: int, channel: ch.Channel, started: float) -> None:
        self.index = index
        self.pid = pid
        self.channel: Optional[ch.Channel] = channel
        self.started = started
        self.ready = False
        self.heard = started  # when its channel last carried a record (the heartbeat watchdog's clock)
        self.killed = False  # SIGKILLed by the master (broken channel, silent too long), not yet reaped


@dataclass
class Slot:
    """One worker index, across the successive processes that fill it.

    Not ``dispatch.WorkerSlot``, which is a live worker's place in the handoff rotation.
    """

    index: int
    process: Optional[Process] = None  # None from its process's reaping to the next spawn
    respawn_at: Optional[float] = None  # when the next process is due, while one is scheduled
    deaths_in_row: int = 0  # deaths (and failed spawns) since a process of this slot last lived STABLE_LIFETIME
    respawns: int = 0



def respawn_delay(deaths_in_row: int, longest: float, shortest: float = 0.0) -> float:
    """Seconds before a slot's next process: the first death in a row at once, the n-th BACKOFF_BASE * 2**n.

    Never less than ``shortest`` (a failed spawn would fail the same way at once), never more than ``longest``.
    """
    delay = 0.0 if deaths_in_row <= 1 else BACKOFF_BASE * 2 ** deaths_in_row
    return min(longest, max(shortest, delay))


class Watchdog:
    """``--heartbeat-timeout``: a worker whose channel has been silent longer is taken for hung (0: never)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def deadline(self, processes: Iterable[Process]) -> Optional[float]:
        """When the longest-silent of ``processes`` overstays the timeout, if the watchdog is on."""
        if not self.timeout:
            return None
        heard = [p.heard for p in processes if p.channel is not None and not p.killed]
        return min(heard) + self.timeout if heard else None

    def overdue(self, processes: Iterable[Process]) -> List[Process]:
        """The processes silent for longer than the timeout, not yet killed."""
        if not self.timeout:
            return []
        now = time.monotonic()
        return [p for p in processes if p.channel is not None and not p.killed and now - p.heard > self.timeout]
