"""Is a starting target ready yet?  A probe that names the first condition still missing.

Ready means, in the order the probe checks it: the port is known (from
``{port}`` in the command, or from the ``fdcluster-ready`` line), at least the
expected number of worker processes exist, the port accepts and a ``ping``
comes back with its params echoed, the ``fdcluster-ready`` line arrived if the
target promised one, and the listener that answered is the target's own.
``ReadinessProbe.check`` returns the first missing condition as a
``Readiness`` state; ``await_ready`` polls it, and when the target exits or
start-up times out, stops the target and raises ``TargetStartupError`` worded
from what the probe saw last.

The ready line is the server's ``READY_TAG``, a space, and a JSON object;
``parse_ready_line`` is the one place that knows the separator.  No pytest import.
"""

from __future__ import annotations

import enum
import json
import os
import re
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, NoReturn, Optional, Sequence, Tuple

import psutil

from fdcluster_server.config import READY_TAG

from .client import Client, ClientError, RemoteError
from .polling import POLL_INTERVAL
from .text import plural, shell_join

if TYPE_CHECKING:
    from .target import RunningTarget, TargetSpec

__all__ = [
    "FINAL_PING_TIMEOUT",
    "PING_TIMEOUT",
    "READY_TAG",
    "Readiness",
    "ReadinessProbe",
    "TargetStartupError",
    "await_ready",
    "describe_status",
    "fail_startup",
    "owns_listener",
    "parse_ready_line",
    "ping",
    "port_refuses",
    "waiting_for",
]

#: Upper bound on one readiness ping, so a half-started server cannot eat the deadline.
PING_TIMEOUT = 1.0

#: The ping made only to word a timeout message, when the workers never all came up.
FINAL_PING_TIMEOUT = 0.25

#: How a ping that came back with its params echoed is reported.
PING_OK = "ok"

#: Lines of stderr (and of stdout) quoted in a start-up error.
MESSAGE_LINES = 20

_NO_READY_LINE = f"no {READY_TAG} line on stdout"
_PORT_IN_USE = re.compile(r"in use|EADDRINUSE", re.IGNORECASE)


class TargetStartupError(RuntimeError):
    """The target exited or did not become ready in time; the message says why.

    Everything the target started has been killed by the time this is raised.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: Optional[int] = None,
        stdout_tail: Sequence[str] = (),
        stderr_tail: Sequence[str] = (),
        port_in_use: bool = False,
        master_pid: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.argv = list(argv)
        #: The pid the master had (long dead by now), None if it never ran.
        self.master_pid = master_pid
        self.returncode = returncode
        self.stdout_tail = list(stdout_tail)
        self.stderr_tail = list(stderr_tail)
        #: The target exited early complaining that its port was taken.
        self.port_in_use = port_in_use

    def amended(self, line: str) -> TargetStartupError:
        """The same error with ``line`` added to its message."""
        return TargetStartupError(
            f"{self}\n  {line}",
            argv=self.argv,
            returncode=self.returncode,
            stdout_tail=self.stdout_tail,
            stderr_tail=self.stderr_tail,
            port_in_use=self.port_in_use,
            master_pid=self.master_pid,
        )


class Readiness(enum.Enum):
    """The first condition a starting target does not meet yet, or ``READY``."""

    #: No ready line: the port is not known yet (no ``{port}`` in the command), or the target promised one.
    NO_READY_LINE = "no ready line"
    #: Fewer live worker processes than expected.
    TOO_FEW_WORKERS = "too few workers"
    #: The port refuses connections.
    NOT_LISTENING = "not listening"
    #: The port accepts, but ``ping`` was not answered with its params echoed.
    NO_PING = "no ping"
    #: ``ping`` was answered by a listener outside the target (a port lost between picking and binding).
    FOREIGN_LISTENER = "foreign listener"
    READY = "ready"


def parse_ready_line(line: str) -> Optional[Dict[str, Any]]:
    """The JSON object of a ``fdcluster-ready {json}`` line; None for any other line."""
    tag, separator, payload = line.partition(" ")
    if tag != READY_TAG or not separator:
        return None
    try:
        info = json.loads(payload)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def port_refuses(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if nothing listens on host:port any more."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return True
        except OSError:
            # Timeouts and other errors are not proof that the port is free.
            return False
        return False


def ping(address: Tuple[str, int], timeout: float, nonce: Dict[str, str]) -> Tuple[Optional[bool], str]:
    """One readiness ping: (accepting, outcome) where outcome is ``PING_OK`` or what went wrong."""
    try:
        with Client(address, timeout=timeout) as client:
            result = client.call("ping", nonce, timeout=timeout)
    except ConnectionRefusedError:
        return False, "not accepting"
    except RemoteError as exc:
        return True, f"ping answered with an error: {exc.message!r:.100}"
    except (ClientError, OSError):
        return True, "ping not answered"
    if result != nonce:
        return True, f"ping answered with the wrong echo: {result!r:.100}"
    return True, PING_OK


def owns_listener(processes: Iterable[psutil.Process], port: int) -> Optional[bool]:
    """Whether one of ``processes`` listens on TCP ``port``; None if it cannot be told.

    Without this, a port lost to another xdist worker's server between
    picking and binding could answer our pings while our server fails.
    """
    undecided = False
    for proc in processes:
        connections = getattr(proc, "net_connections", None) or proc.connections
        try:
            for conn in connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr[1] == port:
                    return True
        except psutil.AccessDenied:
            undecided = True
        except psutil.Error:
            continue
    return None if undecided else False


def waiting_for(spec: TargetSpec, port: Optional[int]) -> str:
    """What readiness means for ``spec``, for the start-up error message."""
    if spec.uses_port:
        listening = f"port {port} accepting"
    else:
        listening = f"an {READY_TAG} line on stdout giving the port"
    return f"readiness ({listening}, ping answered, {plural(spec.workers, 'worker')})"


class ReadinessProbe:
    """Checks one starting target, remembering what it saw for the timeout message.

    A ping that succeeded is not repeated (unless the listener turned out not
    to be the target's); the worker count is read on every check.
    """

    def __init__(self, target: RunningTarget) -> None:
        self.target = target
        self.state: Optional[Readiness] = None
        #: Whether the port accepted at the last ping; None until one was made.
        self.accepting: Optional[bool] = None
        self.ping_outcome = "ping not tried"
        self.workers_seen = 0
        self._nonce = {"fdcluster-readiness": f"{os.getpid()}-{target.master_pid}-{time.monotonic_ns()}"}

    @property
    def ping_ok(self) -> bool:
        """The last ping came back with its params echoed."""
        return self.ping_outcome == PING_OK

    def check(self, remaining: float) -> Readiness:
        """Probe once (a ping waits at most ``remaining`` seconds) and return the target's state."""
        self.state = self._check(remaining)
        return self.state

    def _check(self, remaining: float) -> Readiness:
        target, spec = self.target, self.target.spec
        address = target.known_address()
        if address is None:
            return Readiness.NO_READY_LINE  # it will give the port on its ready line
        self.workers_seen = len(target.descendants())
        if self.workers_seen < spec.workers:
            # Pinging before the workers exist could park our connection in a
            # master with nobody to hand it to; it would cost a ping timeout.
            return Readiness.TOO_FEW_WORKERS
        if not self.ping_ok:
            self.accepting, self.ping_outcome = ping(address, min(remaining, PING_TIMEOUT), self._nonce)
            if not self.ping_ok:
                return Readiness.NO_PING if self.accepting else Readiness.NOT_LISTENING
        if spec.ready_line and target.ready_info is None:
            return Readiness.NO_READY_LINE  # the target said it will announce readiness: wait for the line
        # A ready line is the target's own word; without one, ask who listens.
        if target.ready_info is None and owns_listener(target.processes(), address[1]) is False:
            # Someone else's server answered; ours should fail to bind and exit.
            self.ping_outcome = "ping answered by a process outside the target"
            return Readiness.FOREIGN_LISTENER
        return Readiness.READY

    def timeout_reason(self) -> str:
        """What was missing when start-up timed out, probing the port once if it was never tried."""
        target, spec = self.target, self.target.spec
        address = target.known_address()
        parts = []
        if address is None:
            parts.append(_NO_READY_LINE)
        else:
            if self.accepting is None:
                self.accepting = not port_refuses(*address)
                if self.accepting and target.alive():
                    # One last short ping, so the message tells whether the server answers at all.
                    self.accepting, self.ping_outcome = ping(address, FINAL_PING_TIMEOUT, self._nonce)
            if not self.accepting:
                parts.append(f"port {address[1]} not accepting")
            else:
                parts.append("port accepting")
                parts.append("ping answered" if self.ping_ok else self.ping_outcome)
        parts.append(f"{self.workers_seen} of {spec.workers} workers present")
        if spec.ready_line and target.ready_info is None and address is not None:
            parts.append(_NO_READY_LINE)
        return ", ".join(parts)


def describe_status(returncode: int) -> str:
    """``exited with status 1``, ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def await_ready(target: RunningTarget) -> None:
    """Probe ``target`` until it is ready; if it exits or times out first, stop it and raise ``TargetStartupError``."""
    timeout = target.spec.startup_timeout
    deadline = target.started_at + timeout
    probe = ReadinessProbe(target)
    while True:
        returncode = target.process.poll()
        if returncode is not None:
            elapsed = time.monotonic() - target.started_at
            fail_startup(target, f"{describe_status(returncode)} after {elapsed:.2f} s", returncode)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if probe.check(remaining) is Readiness.READY:
            return
        time.sleep(POLL_INTERVAL)
    fail_startup(target, f"did not become ready within {timeout} s: {probe.timeout_reason()}", None)


def fail_startup(target: RunningTarget, reason: str, returncode: Optional[int]) -> NoReturn:
    """Stop everything ``target`` started, then raise the start-up error: why, the command, the output tails."""
    # stop() also joins the output readers, so the tails below are complete.
    result = target.stop(grace=0)
    if returncode is None:
        returncode = result.returncode
    stdout, stderr = target.stdout_tail(), target.stderr_tail()
    port_in_use = (
        target.spec.uses_port
        and result.exited_before_stop
        and any(_PORT_IN_USE.search(line) for line in stdout + stderr)
    )
    lines = [
        f"fdcluster target failed to start: {reason}",
        f"  command: {shell_join(target.argv)}",
        f"  waiting for: {waiting_for(target.spec, target.chosen_port)}",
    ]
    if stderr:
        lines.append("  last stderr lines:")
        lines.extend(f"    {line}" for line in stderr[-MESSAGE_LINES:])
    else:
        lines.append("  stderr: (nothing)")
    if stdout:
        lines.append("  last stdout lines:")
        lines.extend(f"    {line}" for line in stdout[-MESSAGE_LINES:])
    if not result.nothing_left:
        lines.append(
            f"  left behind despite SIGKILL: pids {list(result.remaining)}, "
            f"port released: {result.port_released}"
        )
    raise TargetStartupError(
        "\n".join(lines),
        argv=target.argv,
        returncode=returncode,
        stdout_tail=stdout,
        stderr_tail=stderr,
        port_in_use=port_in_use,
        master_pid=target.master_pid,
    )
