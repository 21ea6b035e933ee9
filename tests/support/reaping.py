"""A reaper of the processes a test starts or learns of: all SIGKILLed and reaped at teardown.

Shared by the plugin's end-to-end tests and the target integration tests,
which import it after putting this folder on ``sys.path`` (it is not a
package).  Processes are held as psutil handles, which refuse to signal a
recycled pid.  Not for tests/server: the server's tests stay independent of
the plugin, and this module waits with the plugin's ``wait_until``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, Iterable, List, Sequence, Tuple

import psutil

from pytest_fdcluster import wait_until

#: Bound on the wait for a killed process to die.
DEADLINE = 5.0

#: A process as an inner test records it: (pid, create time), so a recycled pid is never taken for it.
ProcessRecord = Tuple[int, float]


def is_live(proc: psutil.Process) -> bool:
    """Running and not a zombie (an unreaped corpse is dead for our purposes)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Reaper:
    """Processes a test started or learned of; all SIGKILLed and reaped by ``close`` (or leaving ``with``)."""

    def __init__(self) -> None:
        self.popens: List[subprocess.Popen] = []
        self.procs: List[psutil.Process] = []

    def __enter__(self) -> Reaper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen``, tracked; in a new session unless told otherwise (signals meant for us stay ours)."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(list(argv), **kwargs)
        self.popens.append(proc)
        self.track(proc.pid)
        return proc

    def track(self, *pids: int) -> List[psutil.Process]:
        """Also kill ``pids`` at teardown; return the handles of those still there."""
        found = []
        for pid in pids:
            try:
                found.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        self.procs.extend(found)
        return found

    def track_processes(self, procs: Iterable[psutil.Process]) -> None:
        """Also kill these at teardown."""
        self.procs.extend(procs)

    def track_records(self, records: Iterable[ProcessRecord]) -> None:
        """Also kill the recorded processes that still are the ones recorded."""
        for pid, created in records:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    self.procs.append(proc)
            except psutil.Error:
                continue

    def close(self) -> None:
        """Kill and reap every tracked process, close the pipes, and wait until none is alive."""
        for proc in self.popens:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its session's group, when it leads one
                except OSError:
                    proc.kill()
            proc.wait(DEADLINE)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for proc in self.procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        # Not all our children: whoever adopted them reaps them; dead (a zombie) is all we can wait for.
        wait_until(lambda: not [p for p in self.procs if is_live(p)], DEADLINE,
                   lambda: f"tracked processes to die: {[p.pid for p in self.procs if is_live(p)]}")
