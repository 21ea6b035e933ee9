"""Stopping a target: SIGTERM, a grace period, SIGKILL for the whole session, and the judgement of it all.

``stop_session`` is the procedure behind ``RunningTarget.stop`` (which makes
it idempotent and logs its verdict): SIGTERM to the master and up to
``grace`` seconds for it to exit; then SIGKILL for the whole session -- the
process group, every process whose session id is the target's, and every
descendant seen when the stop began -- and a bounded wait until none of them
is alive and the port refuses connections.

``StopResult`` says what the stop found and did, and judges it: a master that
had to be SIGKILLed after the grace period, or that exited non-zero after our
SIGTERM, did not stop gracefully (``StopResult.graceful_failure``);
``describe_stop`` is its one line for the cluster's log.

No pytest import.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import psutil

from . import proctree
from .guard_client import link as guard_link
from .polling import POLL_INTERVAL
from .readiness import port_refuses

#: ``StopResult.graceful_failure`` texts; tests match them.
GRACEFUL_SIGKILLED = ("graceful stop: master pid {pid} did not exit within the {grace:g} s grace period "
                      "after SIGTERM and was SIGKILLed")
GRACEFUL_STATUS = "graceful stop: master pid {pid} exited with status {status} after SIGTERM"
GRACEFUL_SIGNAL = "graceful stop: master pid {pid} was killed by {signal} after SIGTERM"


@dataclass(frozen=True)
class StopResult:
    """What ``RunningTarget.stop`` found and did."""

    #: The master's exit status (negative: killed by that signal); None if it could not be reaped.
    returncode: Optional[int]
    #: The master had already exited when ``stop`` was called.
    exited_before_stop: bool
    #: The master ignored SIGTERM for the whole grace period and was SIGKILLed.
    master_killed: bool
    #: Other processes of the session still alive once the master was gone, SIGKILLed.
    survivors_killed: Tuple[int, ...]
    #: Processes still alive when the bounded wait ran out; empty unless something is badly stuck.
    remaining: Tuple[int, ...]
    #: A connect() to the target's port was refused (True if the target never became ready,
    #: since the port is then not known to be the target's).
    port_released: bool
    #: Wall-clock time ``stop`` took.
    seconds: float
    master_pid: Optional[int] = None
    #: The grace period the master had between SIGTERM and SIGKILL.
    grace: float = 0.0
    #: ``stop`` sent SIGTERM to a live master and gave it a grace period (> 0): its exit is judged.
    sigterm_sent: bool = False
    #: Signals the test itself sent to the master (``Cluster.kill_master``); its exit is then not judged.
    signalled_by_test: Tuple[str, ...] = ()

    @property
    def needed_sigkill(self) -> bool:
        """Whether anything had to be SIGKILLed."""
        return self.master_killed or bool(self.survivors_killed)

    @property
    def nothing_left(self) -> bool:
        """No process and no listener left behind."""
        return not self.remaining and self.port_released

    @property
    def graceful_failure(self) -> Optional[str]:
        """Why the master did not stop gracefully on our SIGTERM, or None when it did (or was not asked to).

        Not judged: a master that had exited before ``stop``, one the test
        signalled itself, a stop with no grace period.
        """
        if not self.sigterm_sent or self.signalled_by_test:
            return None
        if self.master_killed:
            return GRACEFUL_SIGKILLED.format(pid=self.master_pid, grace=self.grace)
        if self.returncode is None or self.returncode == 0:
            return None  # None: not reaped, reported as a process left behind
        if self.returncode < 0:
            return GRACEFUL_SIGNAL.format(pid=self.master_pid, signal=_signal_name(-self.returncode))
        return GRACEFUL_STATUS.format(pid=self.master_pid, status=self.returncode)

    @property
    def clean(self) -> bool:
        """Nothing left behind, and the master stopped gracefully (see ``graceful_failure``)."""
        return self.nothing_left and self.graceful_failure is None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_stop(result: StopResult) -> str:
    """One line for the log: how the master ended and what had to be killed."""
    if result.exited_before_stop:
        how = f"master had already exited ({result.returncode})"
    elif result.master_killed:
        how = f"master SIGKILLed after the {result.grace:g} s grace period"
    else:
        how = f"master exited {result.returncode} after SIGTERM"
    parts = [how]
    if result.signalled_by_test:
        parts.append(f"the test sent it {', '.join(result.signalled_by_test)}")
    if result.survivors_killed:
        parts.append(f"SIGKILLed survivors {list(result.survivors_killed)}")
    if result.remaining:
        parts.append(f"LEFT ALIVE {list(result.remaining)}")
    if not result.port_released:
        parts.append("port still accepting")
    return "; ".join(parts)


def stop_session(
    process: subprocess.Popen,
    sid: int,
    grace: float,
    *,
    snapshot: Sequence[psutil.Process],
    address: Optional[Tuple[str, int]],
    readers: Sequence[threading.Thread],
    signalled_by_test: Sequence[str],
    settle_timeout: float,
    started: float,
) -> StopResult:
    """Stop the target whose master is ``process``, leader of session ``sid``, and everything it started.

    ``snapshot``: its descendants when the stop began (once the master is gone
    they are reparented and untraceable); ``address``: its port, None if it
    never got ready (the port may then be someone else's); ``readers``: the
    threads reading its output, joined at the end; ``settle_timeout``: how long
    the master's reaping and the session's vanishing may each take after
    SIGKILL; ``started``: when the stop began, for ``StopResult.seconds``.
    """
    exited_before = process.poll() is not None
    master_killed = False
    sigterm_sent = not exited_before and grace > 0
    if not exited_before:
        try:
            process.send_signal(signal.SIGTERM)
        except OSError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            master_killed = True
    hit = proctree.kill_session(sid, snapshot)
    survivors = tuple(pid for pid in hit if pid != process.pid)
    try:
        returncode: Optional[int] = process.wait(settle_timeout)
    except subprocess.TimeoutExpired:
        returncode = None

    settle_deadline = time.monotonic() + settle_timeout
    while True:
        remaining = set(proctree.session_pids([sid]))
        remaining.update(proc.pid for proc in snapshot if proctree.is_live(proc))
        if process.poll() is None:
            remaining.add(process.pid)
        port_released = address is None or port_refuses(*address)
        if (not remaining and port_released) or time.monotonic() > settle_deadline:
            break
        # Something forked or lingered after the first volley: kill again.
        proctree.kill_session(sid, snapshot)
        time.sleep(POLL_INTERVAL)

    if not remaining:
        guard_link.forget(sid)
    for thread in readers:
        thread.join(1.0)
    return StopResult(
        returncode=returncode,
        exited_before_stop=exited_before,
        master_killed=master_killed,
        survivors_killed=survivors,
        remaining=tuple(sorted(remaining)),
        port_released=port_released,
        seconds=time.monotonic() - started,
        master_pid=process.pid,
        grace=grace,
        sigterm_sent=sigterm_sent,
        signalled_by_test=tuple(signalled_by_test),
    )
