"""Start a target server from a command template, wait until it is ready, tear it down.

A target is any prefork server that speaks the fdcluster protocol: the
reference ``fdcluster_server`` or an external one (a Node.js cluster, ...).
``start_target`` runs it in a new session, decides when it is ready (port
accepting, ``ping`` echoed, enough worker processes), and returns a
``RunningTarget`` whose ``stop`` leaves no process and no listening port
behind -- including workers that moved to another process group.

If pytest itself is SIGKILLed, two safety nets remain: the master gets
PR_SET_PDEATHSIG(SIGKILL) on Linux, and every target's session is registered
with the orphan guard (``pytest_fdcluster.guard``), a watchdog process that
kills the sessions it still watches once pytest's end of its pipe closes.

No pytest import: usable from scripts, fixtures and scenario workers alike.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import psutil

from . import guard
from .client import Client, ClientError, RemoteError

__all__ = [
    "READY_TAG",
    "RunningTarget",
    "StopResult",
    "TargetSpec",
    "TargetStartupError",
    "start_target",
]

#: Prefix of the line a cooperating server prints on stdout once all workers are up.
READY_TAG = "fdcluster-ready "

PLACEHOLDERS = ("{port}", "{workers}", "{host}")

#: New ports tried when the chosen one was taken between picking and binding.
PORT_RETRIES = 3

#: Readiness poll interval: short, because start-up time adds up over a suite.
POLL_INTERVAL = 0.005

#: Upper bound on one readiness ping, so a half-started server cannot eat the deadline.
PING_TIMEOUT = 1.0

#: The ping made only to word a timeout message, when the workers never all came up.
FINAL_PING_TIMEOUT = 0.25

#: After SIGKILL, how long to wait for the session to vanish and the port to close.
SETTLE_TIMEOUT = 5.0

#: Lines of stdout and stderr kept per target.
TAIL_LINES = 200

#: Lines of stderr quoted in a start-up error.
MESSAGE_LINES = 20

_PORT_IN_USE = re.compile(r"in use|EADDRINUSE", re.IGNORECASE)

_IS_LINUX = sys.platform.startswith("linux")
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)


def _load_prctl() -> Optional[Callable[..., int]]:
    # Resolved once, before any fork, so the child only has to make the call.
    if not _IS_LINUX:
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


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
    cwd: Optional[Union[str, "os.PathLike[str]"]] = None
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

    @property
    def needed_sigkill(self) -> bool:
        """Whether anything had to be SIGKILLed."""
        return self.master_killed or bool(self.survivors_killed)

    @property
    def clean(self) -> bool:
        """No process and no listener left behind."""
        return not self.remaining and self.port_released


# -- small helpers -------------------------------------------------------------


def _socket_family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str) -> int:
    """A port that was free a moment ago; whoever binds it next may still lose a race."""
    with socket.socket(_socket_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_refuses(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if nothing listens on host:port any more."""
    with socket.socket(_socket_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return True
        except OSError:
            # Timeouts and other errors are not proof that the port is free.
            return False
        return False


def _session_pids(sid: int) -> List[int]:
    """Live, non-zombie pids whose session id is ``sid``."""
    if os.path.isdir("/proc/self"):
        return guard.session_pids([sid])
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def _is_live(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _child_preexec(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn that sets PR_SET_PDEATHSIG(SIGKILL); it runs in the child after fork.

    Fork-safe on purpose: one prctl call through a function pointer resolved
    before the fork, and a getppid() check for a parent that died before the
    prctl took effect.
    """
    prctl = _prctl

    def set_death_signal_in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), _SIGKILL)

    return set_death_signal_in_child


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


# -- the orphan guard, client side ----------------------------------------------


class _GuardLink:
    """pytest's end of the orphan guard: one watchdog per process, started lazily."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._owner = 0
        self._watched: Set[int] = set()

    def _start(self) -> None:
        path = getattr(guard, "__file__", None)
        if path and os.path.exists(path):
            # By path and isolated: no package __init__, no site, a fast start.
            argv = [sys.executable, "-I", "-S", path]
        else:
            argv = [sys.executable, "-m", "pytest_fdcluster.guard"]
        # Its own session, so a signal to pytest's process group does not reach it.
        # Its stdin's write end is created close-on-exec and targets are spawned
        # with close_fds=True, so no target holds the pipe open.
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._owner = os.getpid()

    def _usable(self) -> bool:
        # After a fork the child must not share its parent's guard: its death would go unseen.
        return self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None

    def _send(self, line: str) -> None:
        for _ in range(2):
            if not self._usable():
                self._start()
                replay = "".join(f"{guard.CMD_WATCH} {sid}\n" for sid in sorted(self._watched))
            else:
                replay = ""
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((replay + line).encode("ascii"))
                self._proc.stdin.flush()
                return
            except (BrokenPipeError, OSError, ValueError):
                # The guard died; start another and replay the watch list.
                self._proc = None
        raise RuntimeError("cannot talk to the fdcluster orphan guard process")

    def watch(self, sid: int) -> None:
        """Have the guard kill session ``sid`` if this process dies."""
        if os.name != "posix":
            return
        with self._lock:
            self._watched.add(sid)
            self._send(f"{guard.CMD_WATCH} {sid}\n")

    def forget(self, sid: int) -> None:
        """Session ``sid`` is gone; the guard need not kill it."""
        with self._lock:
            if sid not in self._watched:
                return
            self._watched.discard(sid)
            if self._usable():
                self._send(f"{guard.CMD_FORGET} {sid}\n")

    @property
    def pid(self) -> Optional[int]:
        """The guard process's pid, if one is running for this process."""
        with self._lock:
            return self._proc.pid if self._usable() and self._proc is not None else None

    @property
    def write_fd(self) -> Optional[int]:
        """The descriptor of the guard pipe's write end in this process."""
        with self._lock:
            if not self._usable() or self._proc is None or self._proc.stdin is None:
                return None
            return self._proc.stdin.fileno()

    def close(self) -> None:
        """Close the pipe: the guard kills whatever is still watched and exits."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or self._owner != os.getpid():
                return
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(guard.KILL_DEADLINE + 1.0)
            except subprocess.TimeoutExpired:
                pass


_guard_link = _GuardLink()
atexit.register(_guard_link.close)


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
        self._port = port
        self.ready_info: Optional[Dict[str, Any]] = None
        self._ready_event = threading.Event()
        self._started_at = time.monotonic()
        self._tail_lock = threading.Lock()
        self._stdout: Deque[str] = deque(maxlen=TAIL_LINES)
        self._stderr: Deque[str] = deque(maxlen=TAIL_LINES)
        self._stop_lock = threading.Lock()
        self._stop_result: Optional[StopResult] = None
        #: Set once readiness was confirmed: only then is the port known to be ours to free.
        self._ready = False
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
        if self._ready_event.is_set() or not line.startswith(READY_TAG):
            return
        try:
            info = json.loads(line[len(READY_TAG) :])
        except ValueError:
            return
        if isinstance(info, dict):
            self.ready_info = info
            self._ready_event.set()

    # -- introspection -----------------------------------------------------------

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited({self.process.returncode})"
        return f"<RunningTarget pid={self.master_pid} address={self._address_or_none()} {state}>"

    def __enter__(self) -> "RunningTarget":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _known_port(self) -> Optional[int]:
        if self._port is not None:
            return self._port
        info = self.ready_info
        if info is not None:
            port = info.get("port")
            if isinstance(port, int) and not isinstance(port, bool):
                return port
        return None

    def _address_or_none(self) -> Optional[Tuple[str, int]]:
        port = self._known_port()
        return None if port is None else (self.spec.host, port)

    @property
    def address(self) -> Tuple[str, int]:
        """``(host, port)`` clients connect to."""
        address = self._address_or_none()
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
        found: Dict[int, psutil.Process] = {}
        master = self._master
        if master is not None:
            try:
                for child in master.children(recursive=True):
                    found[child.pid] = child
            except psutil.Error:
                pass
        for pid in _session_pids(self.sid):
            if pid != self.master_pid and pid not in found:
                try:
                    found[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
        live = []
        for proc in found.values():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    live.append((proc.create_time(), proc.pid, proc))
            except psutil.Error:
                continue
        live.sort(key=lambda item: (item[0], item[1]))
        return [proc for _, _, proc in live]

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

    # -- readiness -----------------------------------------------------------------

    def _waiting_for(self) -> str:
        if self.spec.uses_port:
            listening = f"port {self._port} accepting"
        else:
            listening = f"an {READY_TAG.strip()} line on stdout giving the port"
        workers = self.spec.workers
        return f"readiness ({listening}, ping answered, {workers} worker{'s' if workers != 1 else ''})"

    def _ping(self, address: Tuple[str, int], timeout: float, nonce: Dict[str, str]) -> Tuple[Optional[bool], str]:
        """One readiness ping: (accepting, outcome) where outcome is "ok" or what went wrong."""
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
        return True, "ok"

    def _owns_listener(self, port: int) -> Optional[bool]:
        """Whether a process of the target listens on ``port``; None if it cannot be told.

        Without this, a port lost to another xdist worker's server between
        picking and binding could answer our pings while our server fails.
        """
        candidates = [self._master] + self.descendants() if self._master is not None else self.descendants()
        undecided = False
        for proc in candidates:
            if proc is None:
                continue
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

    def _await_ready(self) -> None:
        """Poll until ready; on exit or timeout kill everything and raise ``TargetStartupError``."""
        spec = self.spec
        deadline = self._started_at + spec.startup_timeout
        nonce = {"fdcluster-readiness": f"{os.getpid()}-{self.master_pid}-{time.monotonic_ns()}"}
        accepting: Optional[bool] = None
        ping_outcome = "ping not tried"
        ping_ok = False
        workers_seen = 0
        while True:
            returncode = self.process.poll()
            if returncode is not None:
                elapsed = time.monotonic() - self._started_at
                self._fail(f"{_describe_status(returncode)} after {elapsed:.2f} s", returncode)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            address = self._address_or_none()
            if address is not None:
                workers_seen = len(self.descendants())
                # Pinging before the workers exist could park our connection in a
                # master with nobody to hand it to; it would cost a ping timeout.
                if workers_seen >= spec.workers:
                    if not ping_ok:
                        accepting, ping_outcome = self._ping(address, min(remaining, PING_TIMEOUT), nonce)
                        ping_ok = ping_outcome == "ok"
                    if ping_ok and spec.ready_line and self.ready_info is None:
                        pass  # the target said it will announce readiness: wait for the line
                    elif ping_ok:
                        owned = True if self.ready_info is not None else self._owns_listener(address[1])
                        if owned is not False:
                            self._ready = True
                            return
                        # Someone else's server answered; ours should fail to bind and exit.
                        ping_ok = False
                        ping_outcome = "ping answered by a process outside the target"
            time.sleep(POLL_INTERVAL)

        # Timed out: say which condition was missing, probing the port once if never tried.
        address = self._address_or_none()
        parts = []
        if address is None:
            parts.append(f"no {READY_TAG.strip()} line on stdout")
        else:
            if accepting is None:
                accepting = not _port_refuses(*address)
                if accepting and self.process.poll() is None:
                    # One last short ping, so the message tells whether the server answers at all.
                    accepting, ping_outcome = self._ping(address, FINAL_PING_TIMEOUT, nonce)
                    ping_ok = ping_outcome == "ok"
            if not accepting:
                parts.append(f"port {address[1]} not accepting")
            else:
                parts.append("port accepting")
                parts.append("ping answered" if ping_ok else ping_outcome)
        parts.append(f"{workers_seen} of {spec.workers} workers present")
        if spec.ready_line and self.ready_info is None and address is not None:
            parts.append(f"no {READY_TAG.strip()} line on stdout")
        self._fail(f"did not become ready within {spec.startup_timeout} s: {', '.join(parts)}", None)

    def _fail(self, reason: str, returncode: Optional[int]) -> None:
        """Kill everything, then raise the start-up error with the output tails."""
        result = self.stop(grace=0)
        for thread in self._readers:
            thread.join(1.0)
        if returncode is None:
            returncode = result.returncode
        stdout, stderr = self.stdout_tail(), self.stderr_tail()
        port_in_use = (
            self.spec.uses_port
            and result.exited_before_stop
            and any(_PORT_IN_USE.search(line) for line in stdout + stderr)
        )
        lines = [
            f"fdcluster target failed to start: {reason}",
            f"  command: {shlex.join(self.argv)}",
            f"  waiting for: {self._waiting_for()}",
        ]
        if stderr:
            lines.append("  last stderr lines:")
            lines.extend(f"    {line}" for line in stderr[-MESSAGE_LINES:])
        else:
            lines.append("  stderr: (nothing)")
        if stdout:
            lines.append("  last stdout lines:")
            lines.extend(f"    {line}" for line in stdout[-MESSAGE_LINES:])
        if not result.clean:
            lines.append(
                f"  left behind despite SIGKILL: pids {list(result.remaining)}, "
                f"port released: {result.port_released}"
            )
        raise TargetStartupError(
            "\n".join(lines),
            argv=self.argv,
            returncode=returncode,
            stdout_tail=stdout,
            stderr_tail=stderr,
            port_in_use=port_in_use,
            master_pid=self.master_pid,
        )

    # -- teardown ------------------------------------------------------------------

    def _kill_session(self, extra: Sequence[psutil.Process]) -> List[int]:
        """SIGKILL the process group, every process of the session, and ``extra``.

        Returns the pids that were alive just before, so the caller can tell
        which processes outlived the master.
        """
        # Listed before killing: after the killpg most of them are already gone.
        alive = set(_session_pids(self.sid))
        live_extra = [proc for proc in extra if _is_live(proc)]
        alive.update(proc.pid for proc in live_extra)
        try:
            os.killpg(self.sid, signal.SIGKILL)
        except OSError:
            pass
        for pid in _session_pids(self.sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            alive.add(pid)
        for proc in live_extra:
            # psutil refuses to signal a reused pid, so a stale snapshot is harmless.
            try:
                proc.kill()
            except psutil.Error:
                pass
        return sorted(alive)

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
            grace = self.spec.grace if grace is None else grace
            # Taken now: once the master is gone its children are reparented and untraceable.
            snapshot = self.descendants()
            exited_before = self.process.poll() is not None
            master_killed = False
            if not exited_before:
                try:
                    self.process.send_signal(signal.SIGTERM)
                except OSError:
                    pass
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    master_killed = True
            hit = self._kill_session(snapshot)
            survivors = tuple(pid for pid in hit if pid != self.master_pid)
            try:
                returncode: Optional[int] = self.process.wait(SETTLE_TIMEOUT)
            except subprocess.TimeoutExpired:
                returncode = None

            # A target that never got ready may have lost its port to someone else.
            address = self._address_or_none() if self._ready else None
            settle_deadline = time.monotonic() + SETTLE_TIMEOUT
            while True:
                remaining = set(_session_pids(self.sid))
                remaining.update(proc.pid for proc in snapshot if _is_live(proc))
                if self.process.poll() is None:
                    remaining.add(self.master_pid)
                port_released = address is None or _port_refuses(*address)
                if (not remaining and port_released) or time.monotonic() > settle_deadline:
                    break
                # Something forked or lingered after the first volley: kill again.
                self._kill_session(snapshot)
                time.sleep(POLL_INTERVAL)

            if not remaining:
                _guard_link.forget(self.sid)
            for thread in self._readers:
                thread.join(1.0)
            self._stop_result = StopResult(
                returncode=returncode,
                exited_before_stop=exited_before,
                master_killed=master_killed,
                survivors_killed=survivors,
                remaining=tuple(sorted(remaining)),
                port_released=port_released,
                seconds=time.monotonic() - started,
            )
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
    if _prctl is not None and threading.current_thread() is threading.main_thread():
        preexec = _child_preexec(os.getpid())
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
            f"  command: {shlex.join(argv)}",
            argv=argv,
        ) from None
    target = RunningTarget(spec, argv, process, port)
    try:
        _guard_link.watch(target.sid)
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
            target._await_ready()
        except TargetStartupError as exc:
            if exc.port_in_use and attempt + 1 < attempts:
                continue
            if exc.port_in_use and len(tried) > 1:
                raise TargetStartupError(
                    f"{exc}\n  ports tried, each reported in use: {', '.join(map(str, tried))}",
                    argv=exc.argv,
                    returncode=exc.returncode,
                    stdout_tail=exc.stdout_tail,
                    stderr_tail=exc.stderr_tail,
                    port_in_use=True,
                    master_pid=exc.master_pid,
                ) from None
            raise
        except BaseException:
            # KeyboardInterrupt or a bug: never leave a half-started target behind.
            target.stop(grace=0)
            raise
        return target
    raise AssertionError("unreachable")  # pragma: no cover
