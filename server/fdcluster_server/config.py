"""Settings shared by the master and its workers, and the exit codes they use."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import List, Optional

from .dispatch import ROUND_ROBIN
from .protocol import DEFAULT_MAX_FRAME

# Exit codes: named so a log line and a test say the same thing.
EXIT_OK = 0
EXIT_STARTUP_FAILED = 1  # port in use, cannot bind, a worker could not start
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_MASTER_GONE = 3  # a worker whose master is gone, however it notices (channel EOF, a refused report, getppid)
EXIT_WORKER_CRASHED = 4  # an unexpected exception in a worker's loop

READY_TAG = "fdcluster-ready"
FD_RESERVE = 64  # descriptors a worker keeps for itself (channel, selector, pipes, a handler's files)


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def connection_cap(configured: int) -> int:
    """Connections a worker may hold: as configured, else what its descriptor limit leaves (runs in the worker)."""
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - FD_RESERVE)


@dataclass
class ServerConfig:
    """Everything the master and the workers need to know; built by ``__main__``."""

    host: str = "127.0.0.1"
    port: int = 0
    workers: int = field(default_factory=default_workers)
    strategy: str = ROUND_ROBIN
    max_frame: int = DEFAULT_MAX_FRAME
    idle_timeout: float = 10.0  # an incomplete frame older than this closes its connection
    keepalive_timeout: float = 60.0  # a connection with nothing in flight closes after this long; 0: never
    write_timeout: float = 30.0  # a connection whose pending output made no progress for this long closes; 0: never
    max_connections_per_worker: int = 0  # handoffs beyond it are rejected; 0: the descriptor limit less a reserve
    max_output_per_worker: int = 64 << 20  # buffered output across a worker's connections above which none is read
    graceful_timeout: float = 10.0
    handoff_window: int = 4
    max_pending: int = 1024
    backlog: int = 1024
    handlers: List[str] = field(default_factory=list)
    control: Optional[str] = None  # a Unix socket path, "@name" for the abstract namespace
    respawn_backoff_max: float = 5.0
    heartbeat_timeout: float = 0.0  # kill a worker silent for longer than this; 0: no watchdog
