"""An independent fdcluster target: asyncio workers on one SHARED-ACCEPT listening socket.

    python asyncio_server.py --port N --workers W [--host 127.0.0.1] [--max-frame BYTES]
                             [--idle-timeout S] [--write-timeout S] [--grace S]

Model: shared accept (the nginx / gunicorn design).  The master opens the
listening socket and forks the workers; each worker runs its own asyncio loop
and accepts on the inherited socket.  The master never accepts and never holds
a client socket; it keeps its copy of the listener so the port stays open (and
connections queue in the backlog) even while every worker is dead.

Declared capabilities:
- strategy: shared accept (no dispatch; the kernel picks the worker);
- respawns dead workers: yes, with a bounded back-off for crash loops;
- drains on SIGTERM (master or worker) and SIGINT: yes, within ``--grace`` (5 s);
- idle timeout: ``--idle-timeout`` (30 s; 0 = off): no complete frame for that long closes the connection;
- max frame: ``--max-frame`` (1 MiB): a larger length prefix gets an error frame, then a clean close;
- write timeout: a client that stops reading is no longer read past 1 MiB of pending output,
  and is closed after ``--write-timeout`` (10 s) without progress.

Replies use Python's default ``json.dumps`` (``", "`` and ``": "``), byte-different from the
reference server on purpose.  Independent of the project: standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import fcntl
import json
import math
import os
import signal
import socket
import struct
import sys
import termios
import time
from typing import Any, Dict, List, Optional, Set

HEADER = struct.Struct("<I")
READY_TAG = "fdcluster-ready"
SIG_READY = signal.SIGRTMIN  # real-time: queued per sender, and si_pid names the worker that is serving
MASTER_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, SIG_READY}
HIGH_WATER = 1 << 20
ACCEPT_BATCH = 64
ACCEPT_BACKOFF = (0.05, 1.0)  # first and longest pause after EMFILE / ENFILE
LINGER = 1.0  # after our FIN, how long we read and discard before closing
CRASH_WINDOW = 1.0  # a worker dying sooner than this after its start counts as a crash loop
RESPAWN_BACKOFF_MAX = 5.0
PR_SET_PDEATHSIG = 1
EXIT_USAGE = 2


class RequestError(ValueError):
    """A frame body that is not a servable request; its message goes back in an error frame."""


def _reject_constant(name: str) -> Any:
    raise RequestError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: List[Any]) -> Dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise RequestError("duplicate key in object")
    return result


_decoder = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def answer(body: bytes) -> bytes:
    """The complete response frame for one request body; never raises."""
    try:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"invalid UTF-8 at byte {exc.start}") from None
        try:
            request = _decoder.decode(text)
        except RequestError:
            raise
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"malformed JSON: {exc}") from None
        if "\\u" in text and "\\ud" in text.lower():
            # Only escapes can smuggle a lone surrogate in; encoding without ASCII escapes exposes it.
            try:
                json.dumps(request, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("lone surrogate in a string") from None
        if not isinstance(request, dict):
            raise RequestError(f"request must be a JSON object, got {type(request).__name__}")
        method = request.get("in")
        if not isinstance(method, str):
            raise RequestError('request needs a string "in" naming the method')
        if method != "ping":
            raise RequestError(f"unknown method {method!r}")
        reply = {"out": "pong", "result": request.get("params")}
        data = json.dumps(reply).encode("ascii")
    except RequestError as exc:
        data = json.dumps({"out": "error", "result": str(exc)}).encode("ascii")
    except (ValueError, RecursionError, MemoryError) as exc:  # a reply we cannot encode, e.g. nested too deep
        data = json.dumps({"out": "error", "result": f"cannot answer: {type(exc).__name__}"}).encode("ascii")
    return HEADER.pack(len(data)) + data


# ------------------------------------------------------------------------------------------- worker side ----

class Connection(asyncio.Protocol):
    """One client connection inside a worker: framing, replies in order, timers, back-pressure."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.closing = False
        self.peer_eof = False
        self.write_paused = False
        self.idle_timer: Optional[asyncio.TimerHandle] = None
        self.write_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.worker.connections.add(self)
        self._arm_idle()
        if self.worker.draining:
            self.worker.loop.call_soon(self.check_quiescent)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # after our FIN: read and discard, so the close never resets unread data
        self.buffer += data
        out = []
        max_frame = self.worker.options.max_frame
        offset = 0
        while len(self.buffer) - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(self.buffer, offset)
            if length > max_frame:
                out.append(answer_error(f"frame of {length} bytes exceeds the maximum of {max_frame} bytes"))
                self._send(out)
                self.close_gracefully()
                return
            end = offset + HEADER.size + length
            if end > len(self.buffer):
                break
            out.append(answer(bytes(self.buffer[offset + HEADER.size:end])))
            offset = end
        if offset:
            del self.buffer[:offset]
            self._arm_idle()
        self._send(out)
        if self.worker.draining:
            self.check_quiescent()

    def _send(self, frames: List[bytes]) -> None:
        if frames and self.transport is not None:
            self.transport.write(b"".join(frames))  # one write per batch: pipelined replies leave together

    def eof_received(self) -> bool:
        # Replies to everything before the EOF are already queued; close() flushes them first.
        self.peer_eof = True
        self.close_gracefully()
        return True

    def pause_writing(self) -> None:
        # The client is not reading: stop reading it too, and give it write_timeout to catch up.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        self.write_timer = self.worker.loop.call_later(self.worker.options.write_timeout, self.abort)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.write_timer is not None:
            self.write_timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        for timer in (self.idle_timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.worker.connections.discard(self)
        self.worker.maybe_finished()

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.worker.options.idle_timeout > 0:
            self.idle_timer = self.worker.loop.call_later(self.worker.options.idle_timeout, self._idle)

    def _idle(self) -> None:
        if self.write_paused:
            return  # the write timer owns a connection that is not reading
        self.close_gracefully()

    def pending_input(self) -> int:
        """Bytes the kernel holds for us, not yet read (FIONREAD)."""
        if self.transport is None:
            return 0
        sock = self.transport.get_extra_info("socket")
        try:
            buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return int.from_bytes(buf, sys.byteorder)

    def check_quiescent(self) -> None:
        """While draining: close once every request received, in our buffer or the kernel's, is answered."""
        if self.closing or self.buffer or self.write_paused or self.pending_input():
            return  # more input is coming (data_received calls back) or a frame is incomplete
        self.close_gracefully()

    def close_gracefully(self) -> None:
        """Flush, send FIN, read and discard briefly, then close: never an RST over unread data."""
        if self.transport is None:
            return
        if self.peer_eof:
            self.transport.close()  # the peer is done sending: nothing unread can be left to reset
            return
        if self.closing:
            return
        self.closing = True
        self.buffer.clear()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.worker.loop.call_later(LINGER, self._finish)

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def answer_error(message: str) -> bytes:
    data = json.dumps({"out": "error", "result": message}).encode("ascii")
    return HEADER.pack(len(data)) + data


class Worker:
    """A worker process: accepts on the shared listener, serves connections, drains on SIGTERM."""

    def __init__(self, listener: socket.socket, options: argparse.Namespace) -> None:
        self.listener: Optional[socket.socket] = listener
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.connections: Set[Connection] = set()
        self.starting: Set[asyncio.Task[Any]] = set()  # accepted, transport not made yet
        self.draining = False
        self.backoff = ACCEPT_BACKOFF[0]
        self.done = self.loop.create_future()

    def run(self) -> int:
        """Runs in the forked child: serve until drained (or the master is gone); the exit status."""
        loop = self.loop
        asyncio.set_event_loop(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        assert self.listener is not None
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self.accept_ready)
        loop.call_soon(self._watch_master, os.getppid())
        os.kill(os.getppid(), SIG_READY)
        loop.run_until_complete(self.done)
        return 0

    def accept_ready(self) -> bool:
        """Accept up to a batch; True if the backlog may hold more."""
        assert self.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting()
                return False  # ECONNABORTED and the like: the next readiness event tries again
            self.backoff = ACCEPT_BACKOFF[0]
            self.start(sock)
        return True

    def _pause_accepting(self) -> None:
        # Out of descriptors: a level-triggered listener would spin; stop watching it for a while.
        assert self.listener is not None
        self.loop.remove_reader(self.listener.fileno())
        delay, self.backoff = self.backoff, min(self.backoff * 2, ACCEPT_BACKOFF[1])
        self.loop.call_later(delay, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.listener is not None and not self.draining:
            self.loop.add_reader(self.listener.fileno(), self.accept_ready)

    def start(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: Connection(self), sock))
        self.starting.add(task)
        task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self.starting.discard(task)
        if task.cancelled() or task.exception() is not None:
            task.get_loop().call_soon(self.maybe_finished)

    def drain(self) -> None:
        """SIGTERM / SIGINT: accept what already waits in the backlog, stop accepting, finish every connection."""
        if self.draining:
            return
        if self.listener is not None:
            for _ in range(1024):  # bounded: what waits in the backlog now, not a stream of newcomers
                if not self.accept_ready():
                    break
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self.draining = True
        self.loop.call_later(self.options.grace, self._give_up)
        for conn in list(self.connections):
            conn.check_quiescent()
        self.loop.call_soon(self.maybe_finished)

    def maybe_finished(self) -> None:
        if self.draining and not self.connections and not self.starting and not self.done.done():
            self.done.set_result(None)

    def _give_up(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        if not self.done.done():
            self.done.set_result(None)

    def _watch_master(self, master: int) -> None:
        if os.getppid() != master:
            os._exit(0)  # the master is gone and PDEATHSIG did not fire (set after it died)
        self.loop.call_later(0.5, self._watch_master, master)


def die_with_parent() -> None:
    """In the child: the kernel SIGKILLs us when the master dies (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the getppid() watch still ends us


# ------------------------------------------------------------------------------------------- master side ----

class Master:
    """Owns the listener and the worker slots; signals are waited for synchronously (sigtimedwait)."""

    def __init__(self, listener: socket.socket, options: argparse.Namespace) -> None:
        self.listener = listener
        self.options = options
        self.slots: List[Optional[int]] = [None] * options.workers
        self.started: Dict[int, float] = {}
        self.crashes = [0] * options.workers
        self.respawn_at: Dict[int, float] = {}
        self.serving: Set[int] = set()
        self.announced = False
        self.stop_deadline: Optional[float] = None

    def run(self) -> int:
        for index in range(len(self.slots)):
            self.spawn_worker(index)
        while True:
            info = signal.sigtimedwait(MASTER_SIGNALS, self._wait_time())
            if info is not None:
                self.handle(info)
            self.reap_workers()
            if self.stop_deadline is None:
                self.respawn_due()
            elif not any(pid is not None for pid in self.slots):
                return 0
            elif time.monotonic() >= self.stop_deadline:
                self.kill_workers(signal.SIGKILL)
                self.stop_deadline = time.monotonic() + 1.0  # only reaping is left

    def _wait_time(self) -> float:
        deadlines = list(self.respawn_at.values()) + ([self.stop_deadline] if self.stop_deadline else [])
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - time.monotonic(), 1.0))

    def handle(self, info: Any) -> None:
        if info.si_signo == SIG_READY:
            self.serving.add(info.si_pid)
            self.announce()
        elif info.si_signo in (signal.SIGTERM, signal.SIGINT) and self.stop_deadline is None:
            # Stop: workers drain the backlog and their connections; the master's listener copy goes last
            # so that nothing queued while they drain is refused.
            self.stop_deadline = time.monotonic() + self.options.grace
            self.respawn_at.clear()
            self.kill_workers(signal.SIGTERM)

    def announce(self) -> None:
        pids = [pid for pid in self.slots if pid is not None]
        if self.announced or len(pids) < len(self.slots) or not set(pids) <= self.serving:
            return
        self.announced = True
        host, port = self.listener.getsockname()[:2]
        info = {"host": host, "port": port, "pid": os.getpid(), "workers": pids, "strategy": "shared-accept"}
        sys.stdout.write(f"{READY_TAG} {json.dumps(info)}\n")
        sys.stdout.flush()

    def spawn_worker(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            status = 4
            try:
                die_with_parent()
                status = Worker(self.listener, self.options).run()
            except BaseException as exc:  # the child must never return into the master's loop
                print(f"asyncio_server worker {os.getpid()}: {exc!r}", file=sys.stderr)
            finally:
                sys.stderr.flush()
                os._exit(status)
        self.slots[index] = pid
        self.started[pid] = time.monotonic()

    def reap_workers(self) -> None:
        while True:
            try:
                dead = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                return  # no children at all
            if dead is None or dead.si_pid == 0:
                return  # children, none of them dead
            pid = dead.si_pid
            self.serving.discard(pid)
            lived = time.monotonic() - self.started.pop(pid, 0.0)
            if pid not in self.slots:
                continue
            index = self.slots.index(pid)
            self.slots[index] = None
            print(f"asyncio_server: worker {pid} exited ({describe_death(dead)})", file=sys.stderr)
            self.crashes[index] = self.crashes[index] + 1 if lived < CRASH_WINDOW else 0
            delay = 0.0 if not self.crashes[index] else min(0.1 * 2 ** self.crashes[index], RESPAWN_BACKOFF_MAX)
            self.respawn_at[index] = time.monotonic() + delay

    def respawn_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.respawn_at.items()):
            if when <= now:
                del self.respawn_at[index]
                self.spawn_worker(index)

    def kill_workers(self, sig: int) -> None:
        for pid in self.slots:
            if pid is not None:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass  # already dead: reaped on the next turn


def describe_death(dead: Any) -> str:
    """A waitid result as a signal name or an exit code."""
    if dead.si_code == os.CLD_EXITED:
        return f"exit code {dead.si_status}"
    return signal.Signals(dead.si_status).name


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="asyncio_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-frame", type=int, default=1 << 20)
    parser.add_argument("--idle-timeout", type=float, default=30.0, help="seconds; 0 disables it")
    parser.add_argument("--write-timeout", type=float, default=10.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    for name in ("workers", "max_frame", "backlog"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("idle_timeout", "write_timeout", "grace"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be a non-negative number of seconds")
    return args


def main() -> int:
    options = parse_args()
    # Blocked before any fork, so no signal is lost between fork and the first sigtimedwait.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    listener = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((options.host, options.port))
        listener.listen(options.backlog)
    except OSError as exc:
        print(f"asyncio_server: cannot listen on {options.host}:{options.port}: {exc.strerror}", file=sys.stderr)
        return 1
    status = Master(listener, options).run()
    listener.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
