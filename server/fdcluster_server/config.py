"""Settings shared by the master and its workers, and the exit codes they use."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from .dispatch import ROUND_ROBIN
from .protocol import DEFAULT_MAX_FRAME

# Exit codes: named so a log line and a test say the same thing.
EXIT_OK = 0
EXIT_STARTUP_FAILED = 1  # port in use, cannot bind, a worker could not start
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_MASTER_GONE = 3  # a worker whose master died
EXIT_WORKER_CRASHED = 4  # an unexpected exception in a worker's loop

READY_TAG = "fdcluster-ready"


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ServerConfig:
    """Everything the master and the workers need to know; built by ``__main__``."""

    host: str = "127.0.0.1"
    port: int = 0
    workers: int = field(default_factory=default_workers)
    strategy: str = ROUND_ROBIN
    max_frame: int = DEFAULT_MAX_FRAME
    idle_timeout: float = 10.0
    graceful_timeout: float = 10.0
    handoff_window: int = 4
    max_pending: int = 1024
    backlog: int = 1024
    handlers: List[str] = field(default_factory=list)
    control: Optional[str] = None  # a Unix socket path, "@name" for the abstract namespace
    respawn_backoff_max: float = 5.0
    heartbeat_timeout: float = 0.0  # kill a worker silent for longer than this; 0: no watchdog
