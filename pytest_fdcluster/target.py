"""Start a target server from a command template, wait until it is ready, tear it down.

A target is any prefork server that speaks the fdcluster protocol: the
reference ``fdcluster_server`` or an external one (a Node.js cluster, ...).
``start_target`` runs it in a new session, waits until ``readiness`` says it
is ready (port accepting, ``ping`` echoed, enough worker processes), and
returns a ``RunningTarget`` whose ``stop`` leaves no process and no listening
port behind -- including workers that moved to another process group
(``proctree`` says which processes are the target's).

If pytest itself is SIGKILLed, two safety nets remain: the master gets
PR_SET_PDEATHSIG(SIGKILL) on Linux, and every target's session is registered
with the orphan guard (``guard_client``), a watchdog process that kills the
sessions it still watches once pytest's end of its pipe closes.

A stop is also judged: a master that had to be SIGKILLed after the grace
period, or that exited non-zero after our SIGTERM, did not stop gracefully
(``StopResult.graceful_failure``); that is logged as a warning on the
``fdcluster.target`` logger.  The stop procedure and ``StopResult`` live in
``stopping``; both are importable from here.

No pytest import: usable from scripts, fixtures and scenario workers alike.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import psutil

from fdcluster_server.signals import parent_death_preexec

from . import proctree
from .guard_client import link as guard_link
from .readiness import TargetStartupError, await_ready, parse_ready_line
from .stopping import GRACEFUL_SIGKILLED, GRACEFUL_SIGNAL, GRACEFUL_STATUS, StopResult, stop_session
from .text import shell_join

__all__ = [
    "GRACEFUL_SIGKILLED",
    "GRACEFUL_SIGNAL",
    "GRACEFUL_STATUS",
    "RunningTarget",
    "StopResult",
    "TargetSpec",
    "TargetStartupError",
    "start_target",
]

log = logging.getLogger("fdcluster.target")

PLACEHOLDERS = ("{port}", "{workers}", "{host}")

#: New ports tried when the chosen one was taken between picking and binding.
PORT_RETRIES = 3

#: After SIGKILL, how long to wait for the session to vanish and the port to close.
SETTLE_TIMEOUT = 5.0

#: Lines of stdout and stderr kept per target.
TAIL_LINES = 200


# PR_SET_PDEATHSIG is Linux's; elsewhere no preexec_fn at all, so the fork stays cheap.
_IS_LINUX = sys.platform.startswith("linux")

@dataclass(frozen=True)
class TargetSpec:
    """How to run a target.

    ``command`` is a template: a string is split with ``shlex.split`` (never
    run through a shell); ``{port}``, ``{workers}`` and ``{host}`` are replaced
    in every argument, and nothing else, so JSON braces survive.  Without
    ``{port}`` the port is read from the ``fdcluster-ready`` line.
    ``env`` entries are laid over the current environment.
    """

    command: Union[str, Sequence[str]]
    workers: int
    startup_timeout: float = 10.0
    grace: float = 5.0
    host: str = "127.0.0.1"
    env: Optional[Mapping[str, str]] = None
    cwd: Optional[Union[str, os.PathLike[str]]] = None
    #: Ready only once the ``fdcluster-ready`` line is seen (servers whose workers
    #: register after the port already accepts, such as Node's cluster).
    ready_line: bool = False

    def __post_init__(self) -> None:
        if not self.template():
            raise ValueError("TargetSpec.command is empty")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"TargetSpec.workers must be an int >= 0, got {self.workers!r}")
        if not self.startup_timeout > 0:
            raise ValueError(f"TargetSpec.startup_timeout must be > 0, got {self.startup_timeout!r}")
        if not self.grace >= 0:
            raise ValueError(f"TargetSpec.grace must be >= 0, got {self.grace!r}")

    def template(self) -> List[str]:
        """The command as an argument list, placeholders not yet substituted."""
        if isinstance(self.command, str):
            return shlex.split(self.command)
        return [str(arg) for arg in self.command]

    @property
    def uses_port(self) -> bool:
        """Whether the command takes its port from ``{port}``."""
        return any("{port}" in arg for arg in self.template())

    def render(self, port: Optional[int]) -> List[str]:
        """The argument list with placeholders substituted."""
        values = {"{workers}": str(self.workers), "{host}": self.host}
        if port is not None:
            values["{port}"] = str(port)
        argv = []
        for arg in self.template():
            for name, value in values.items():
                arg = arg.replace(name, value)
            argv.append(arg)
        return argv


# -- small helpers -------------------------------------------------------------


def _free_port(host: str) -> int:
    """A port that was free a moment ago; whoever binds it next may still lose a race."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _drain(
    pipe: IO[bytes], lines: Deque[str], lock: threading.Lock, on_line: Optional[Callable[[str], None]]
) -> None:
    """Reader thread body: keep the last lines of ``pipe``; the thread owns and closes it."""
    try:
        # A bounded readline, so a server that never prints a newline cannot grow memory.
        for raw in iter(lambda: pipe.readline(65536), b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with lock:
                lines.append(line)
            if on_line is not None:
                on_line(line)
    except (OSError, ValueError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


# -- the running target ----------------------------------------------------------


class RunningTarget:
    """A started target: its processes, address, output tails, and ``stop``."""

    def __init__(self, spec: TargetSpec, argv: List[str], process: subprocess.Popen, port: Optional[int]) -> None:
        self.spec = spec
        self.argv = argv
        self.process = process
        self.master_pid: int = process.pid
        #: The session (and process group) the master leads.
        self.sid: int = process.pid
        #: The port picked for ``{port}``; None when the target announces its own on the ready line.
        self.chosen_port = port
        #: The JSON object of the target's ``fdcluster-ready`` line, once it printed one.
        self.ready_info: Optional[Dict[str, Any]] = None
        #: ``time.monotonic()`` at launch: the start-up deadline counts from here.
        self.started_at = time.monotonic()
        self._tail_lock = threading.Lock()
        self._stdout: Deque[str] = deque(maxlen=TAIL_LINES)
        self._stderr: Deque[str] = deque(maxlen=TAIL_LINES)
        self._stop_lock = threading.Lock()
        self._stop_result: Optional[StopResult] = None
        #: Set once readiness was confirmed: only then is the port known to be ours to free.
        self._ready = False
        #: Signals the test sent the master (``Cluster.kill_master``): ``stop`` does not judge its exit then.
        self.signalled_by_test: List[str] = []
        try:
            self._master: Optional[psutil.Process] = psutil.Process(process.pid)
        except psutil.Error:
            self._master = None
        self._readers = [
            self._reader("stdout", process.stdout, self._stdout, self._on_stdout_line),
            self._reader("stderr", process.stderr, self._stderr, None),
        ]

    def _reader(
        self, name: str, pipe: Optional[IO[bytes]], lines: Deque[str], on_line: Optional[Callable[[str], None]]
    ) -> threading.Thread:
        thread = threading.Thread(
            target=_drain,
            args=(pipe, lines, self._tail_lock, on_line),
            name=f"fdcluster-target-{self.master_pid}-{name}",
            daemon=True,
        )
        thread.start()
        return thread

    def _on_stdout_line(self, line: str) -> None:
        # Only the first ready line counts; this reader thread is the only writer.
        if self.ready_info is None:
            self.ready_info = parse_ready_line(line)

    # -- introspection -----------------------------------------------------------

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited({self.process.returncode})"
        return f"<RunningTarget pid={self.master_pid} address={self.known_address()} {state}>"

    def __enter__(self) -> RunningTarget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _known_port(self) -> Optional[int]:
        if self.chosen_port is not None:
            return self.chosen_port
        info = self.ready_info
        if info is not None:
            port = info.get("port")
            if isinstance(port, int) and not isinstance(port, bool):
                return port
        return None

    def known_address(self) -> Optional[Tuple[str, int]]:
        """``(host, port)`` once the port is known (from ``{port}`` or the ready line), else None."""
        port = self._known_port()
        return None if port is None else (self.spec.host, port)

    @property
    def address(self) -> Tuple[str, int]:
        """``(host, port)`` clients connect to."""
        address = self.known_address()
        if address is None:
            raise RuntimeError("the target's port is not known (no {port} in the command, no readiness line yet)")
        return address

    @property
    def port(self) -> int:
        """The port clients connect to."""
        return self.address[1]

    @property
    def control(self) -> Optional[str]:
        """The control address from the readiness line, if the server announced one."""
        info = self.ready_info
        return None if info is None else info.get("control")

    def alive(self) -> bool:
        """Whether the master process is still running (not reaped)."""
        return self.process.poll() is None

    def descendants(self) -> List[psutil.Process]:
        """Live, non-zombie processes of the target other than the master, oldest first.

        The master's descendants while it lives, plus any process still in its
        session -- which finds workers orphaned by a master that died.
        """
        processes = proctree.target_processes(self._master, session=self.sid)
        return proctree.live_oldest_first(proc for proc in processes if proc.pid != self.master_pid)

    def processes(self) -> List[psutil.Process]:
        """The master (while psutil knows it), then its live descendants, oldest first."""
        master = [self._master] if self._master is not None else []
        return master + self.descendants()

    def worker_pids(self) -> List[int]:
        """Pids of the live worker processes (all non-zombie descendants), oldest first."""
        return [proc.pid for proc in self.descendants()]

    def stdout_tail(self) -> List[str]:
        """The last lines the target wrote to stdout."""
        with self._tail_lock:
            return list(self._stdout)

    def stderr_tail(self) -> List[str]:
        """The last lines the target wrote to stderr."""
        with self._tail_lock:
            return list(self._stderr)

    # -- teardown ------------------------------------------------------------------

    def stop(self, grace: Optional[float] = None) -> StopResult:
        """Stop the target and everything it started; idempotent.

        SIGTERM to the master and up to ``grace`` seconds (default
        ``spec.grace``) for it to exit; then SIGKILL for the whole session --
        the process group, every process whose session id is the target's,
        and every descendant seen at the start of ``stop`` -- and a bounded
        wait until none of them is alive and the port refuses connections.
        """
        with self._stop_lock:
            if self._stop_result is not None:
                return self._stop_result
            started = time.monotonic()
            # Taken now: once the master is gone its children are reparented and untraceable.
            snapshot = self.descendants()
            self._stop_result = stop_session(
                self.process,
                self.sid,
                self.spec.grace if grace is None else grace,
                snapshot=snapshot,
                # A target that never got ready may have lost its port to someone else.
                address=self.known_address() if self._ready else None,
                readers=self._readers,
                signalled_by_test=self.signalled_by_test,
                settle_timeout=SETTLE_TIMEOUT,  # read at each stop: a test may lower it
                started=started,
            )
            failure = self._stop_result.graceful_failure
            if failure:
                log.warning("%s (%s)", failure, shell_join(self.argv))
            return self._stop_result


# -- start -----------------------------------------------------------------------


def _launch(spec: TargetSpec, port: Optional[int]) -> RunningTarget:
    argv = spec.render(port)
    env = dict(os.environ)
    # A Python target's stdout is a pipe here; unbuffered, its readiness line arrives at once.
    env.setdefault("PYTHONUNBUFFERED", "1")
    if spec.env is not None:
        env.update(spec.env)
    # PR_SET_PDEATHSIG fires when the forking *thread* exits, so only the main
    # thread arms it; the orphan guard covers targets started elsewhere.
    preexec = None
    if _IS_LINUX and threading.current_thread() is threading.main_thread():
        preexec = parent_death_preexec(os.getpid())
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=spec.cwd,
            preexec_fn=preexec,
        )
    except OSError as exc:
        raise TargetStartupError(
            f"fdcluster target failed to start: cannot run it: {exc}\n"
            f"  command: {shell_join(argv)}",
            argv=argv,
        ) from None
    target = RunningTarget(spec, argv, process, port)
    try:
        guard_link.watch(target.sid)
    except BaseException:
        target.stop(grace=0)
        raise
    return target


def start_target(spec: TargetSpec) -> RunningTarget:
    """Start ``spec`` and return it once ready; raise ``TargetStartupError`` otherwise.

    Ready means: the port accepts connections (or the server printed its
    ``fdcluster-ready`` line), a ``ping`` comes back with its params echoed,
    and at least ``spec.workers`` live processes descend from the master.
    A port lost to another process between picking and binding is retried
    with a fresh port, up to ``PORT_RETRIES`` times.
    """
    attempts = 1 + PORT_RETRIES if spec.uses_port else 1
    tried: List[int] = []
    for attempt in range(attempts):
        port = _free_port(spec.host) if spec.uses_port else None
        if port is not None:
            tried.append(port)
        target = _launch(spec, port)
        try:
            await_ready(target)
            target._ready = True
        except TargetStartupError as exc:
            if exc.port_in_use and attempt + 1 < attempts:
                continue
            if exc.port_in_use and len(tried) > 1:
                raise exc.amended(f"ports tried, each reported in use: {', '.join(map(str, tried))}") from None
            raise
        except BaseException:
            # KeyboardInterrupt or a bug: never leave a half-started target behind.
            target.stop(grace=0)
            raise
        return target
    raise AssertionError("unreachable")  # pragma: no cover
