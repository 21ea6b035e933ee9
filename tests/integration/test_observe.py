"""Integration tests of pytest_fdcluster.observe against real processes and sockets.

The target is a tiny prefork server run with ``python -c``: its master
listens on 127.0.0.1, forks workers that each hold one end of a Unix
socketpair, and hands accepted sockets to them over SCM_RIGHTS.  The test
drives it one command per stdin line and waits for its one-line reply, so
every observation is synchronised on what the target says it has done, or
on a bounded poll of what the kernel shows (for CLOSE_WAIT).  Every target
is stopped and reaped by a fixture, also when a test fails.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional, TypeVar

import psutil
import pytest

from pytest_fdcluster import descriptors, observe
from pytest_fdcluster.checks import (
    CLOSE_WAIT_FAILED,
    FD_LEAK_FAILED,
    MASTER_HOLDS_CLIENTS,
    FdHygieneError,
    FdLeakError,
    assert_master_holds_no_clients,
    assert_no_close_wait,
    assert_no_fd_leak,
)
from pytest_fdcluster.observe import FdInfo, ProcessView, Snapshot

needs_procfs = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs Linux: fd flags and socket tables come from /proc"
)
#: Bound on every wait for the target: generous, since CI machines stall.
TIMEOUT = 10.0
#: How long a target gets to obey ``quit`` before it is sent SIGTERM.
QUIT_TIMEOUT = 2.0

PREFORK = r'''
import os, select, signal, socket, sys

def serve_worker(chan):
    """Runs in the forked worker: hold every socket the master hands over."""
    held = []
    chan.send(b"k")  # inherited fds closed: the master may report us ready
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(chan, 16, 4)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)  # master gone or closed our channel
        if msg == b"hold":
            held.extend(fds)
        elif msg == b"release":
            for fd in held:
                os.close(fd)
            held.clear()
        chan.send(b"k")

def reply(*words):
    print(*words, flush=True)

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
workers = []  # [pid, channel], oldest first
kept = []     # objects the master holds open on purpose
zombies = []

def spawn():
    parent_end, child_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        listener.close()
        parent_end.close()
        for obj in kept + [chan for _, chan in workers]:
            obj.close()
        serve_worker(child_end)
    child_end.close()
    parent_end.recv(1)
    workers.append([pid, parent_end])
    return pid

def serve_commands():
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "accept":
            conn, peer = listener.accept()
            kept.append(conn)
            reply("accepted", conn.fileno())
        elif cmd == "handoff":
            conn, peer = listener.accept()
            chan = workers[int(args[0])][1]
            socket.send_fds(chan, [b"hold"], [conn.fileno()])
            chan.recv(1)
            conn.close()
            reply("handed", peer[1])
        elif cmd == "release":
            chan = workers[int(args[0])][1]
            chan.send(b"release")
            chan.recv(1)
            reply("released")
        elif cmd == "pipe":
            r, w = os.pipe()
            os.set_inheritable(r, True)
            reply("pipe", r, w)
        elif cmd == "epoll":
            kept.append(select.epoll())
            reply("epoll", kept[-1].fileno())
        elif cmd == "closeall":
            for obj in kept:
                obj.close()
            kept.clear()
            reply("closed")
        elif cmd == "spawn":
            reply("spawned", spawn())
        elif cmd == "kill":
            pid, chan = workers.pop(int(args[0]))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            chan.close()
            reply("reaped", pid)
        elif cmd == "zombie":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            zombies.append(pid)
            reply("zombie", pid)
        elif cmd == "quit":
            return

# SIGTERM unblocks a master stuck in a command and still reaps the workers.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
try:
    for _ in range(int(sys.argv[1])):
        spawn()
    reply("ready", listener.getsockname()[1], *[pid for pid, _ in workers])
    serve_commands()
finally:
    for pid, chan in workers:
        chan.close()  # the worker sees end of file and exits
    for pid in [pid for pid, _ in workers] + zombies:
        os.waitpid(pid, 0)
'''

# Forks short-lived children and opens and closes descriptors as fast as it
# can, until anything arrives on stdin: a tree that changes under the reader.
CHURN = r'''
import os, select, signal, socket, sys
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
print("ready", flush=True)
while not stop and not select.select([sys.stdin], [], [], 0)[0]:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDONLY)
    sock = socket.socket()
    os.close(fd)
    sock.close()
    os.waitpid(pid, 0)
'''


class Target:
    """A target script in its own session, driven by stdin lines, replying one line per command."""

    def __init__(self, script: str, *args: object) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._replies: queue.Queue[Optional[List[str]]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._replies.put(line.split())
        self._replies.put(None)

    def expect(self, word: str) -> List[str]:
        """The words after ``word`` on the target's next line."""
        try:
            words = self._replies.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"target said nothing within {TIMEOUT}s, expected {word!r}") from None
        if not words or words[0] != word:
            self._stderr.seek(0)
            raise AssertionError(f"target said {words!r}, expected {word!r}; stderr:\n{self._stderr.read()}")
        return words[1:]

    def command(self, line: str, reply: str) -> List[str]:
        self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.expect(reply)

    def close(self) -> None:
        """Stop the target so that it reaps its own children, or kill its whole session.

        Asks with ``quit``, then SIGTERM for a target stuck in a command; only
        then SIGKILL, which orphans the children to init.
        """
        try:
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass  # already dead
        try:
            try:
                self.proc.wait(timeout=QUIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            # Not yet reaped, so its pid is still its session's process group id.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        finally:
            self.proc.stdout.close()  # type: ignore[union-attr]
            self._stderr.close()


class Prefork(Target):
    """The PREFORK target with ``workers`` workers."""

    def __init__(self, workers: int) -> None:
        super().__init__(PREFORK, workers)
        port, *pids = self.expect("ready")
        self.port = int(port)
        self.worker_pids = [int(pid) for pid in pids]

    def snapshot(self) -> Snapshot:
        return observe.snapshot(self.pid)


@pytest.fixture
def targets():
    """Start targets with ``targets(Prefork, 2)``; all are stopped at teardown."""
    started: List[Target] = []

    def start(cls: Callable[..., Target], *args: object):
        target = cls(*args)
        started.append(target)
        return target

    yield start
    for target in started:
        target.close()


@pytest.fixture
def connect():
    """``connect(port)`` opens a client socket that is closed at teardown."""
    clients: List[socket.socket] = []

    def open_client(port: int) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


T = TypeVar("T")


def poll(fetch: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    """Fetch until ``done`` holds, for at most TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {TIMEOUT}s; last saw {value!r}")
        time.sleep(0.01)


def client_addr(client: socket.socket):
    return client.getsockname()[:2]


@needs_procfs
class TestTree:
    def test_master_and_workers_labelled_oldest_first(self, targets):
        target = targets(Prefork, 3)
        snap = target.snapshot()
        assert snap.master.pid == target.pid
        assert snap.master.label == observe.MASTER
        assert [w.pid for w in snap.workers] == target.worker_pids
        assert [w.label for w in snap.workers] == ["worker 0", "worker 1", "worker 2"]
        assert {w.ppid for w in snap.workers} == {target.pid}
        assert list(snap.processes) == [target.pid, *target.worker_pids]

    def test_cmdline_is_short(self, targets):
        snap = targets(Prefork, 1).snapshot()
        assert snap.master.cmdline.startswith(sys.executable)
        assert len(snap.master.cmdline) <= 80

    def test_labels_override(self, targets):
        target = targets(Prefork, 2)
        labels = {target.pid: "arbiter", target.worker_pids[1]: "second"}
        snap = observe.snapshot(target.pid, labels)
        assert [p.label for p in snap.processes.values()] == ["arbiter", "worker 0", "second"]

    def test_new_worker_is_youngest(self, targets):
        target = targets(Prefork, 2)
        (pid,) = target.command("spawn", "spawned")
        snap = target.snapshot()
        assert snap.workers[-1].pid == int(pid)
        assert snap.workers[-1].label == "worker 2"

    def test_zombie_is_left_out(self, targets):
        target = targets(Prefork, 1)
        zombie = int(target.command("zombie", "zombie")[0])
        poll(lambda: psutil.Process(zombie).status(), lambda s: s == psutil.STATUS_ZOMBIE, "zombie")
        snap = target.snapshot()
        assert zombie not in snap.processes
        assert [w.pid for w in snap.workers] == target.worker_pids

    def test_gone_master_gives_empty_snapshot(self):
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        snap = observe.snapshot(proc.pid)
        assert snap.processes == {}
        assert snap.master is None
        assert snap.workers == []
        assert snap.master_client_sockets == []

    def test_churning_tree_never_raises(self, targets):
        target = targets(Target, CHURN)
        target.expect("ready")
        for _ in range(300):
            snap = observe.snapshot(target.pid)
            assert snap.master is not None
            assert all(info.fd >= 0 for proc in snap.processes.values() for info in proc.fds.values())


@needs_procfs
class TestDescriptors:
    def test_listening_socket(self, targets):
        target = targets(Prefork, 2)
        snap = target.snapshot()
        (listening,) = snap.master.listening
        assert (listening.kind, listening.laddr, listening.raddr) == ("tcp", ("127.0.0.1", target.port), None)
        assert listening.status == psutil.CONN_LISTEN
        assert listening.target.startswith("socket:[")
        assert not listening.inheritable  # Python sockets are O_CLOEXEC
        assert all(w.listening == [] for w in snap.workers)

    def test_socketpairs_are_unix(self, targets):
        snap = targets(Prefork, 3).snapshot()
        assert snap.master.kinds["unix"] == 3
        assert [w.kinds["unix"] for w in snap.workers] == [1, 1, 1]

    def test_inheritable_pipe(self, targets):
        target = targets(Prefork, 1)
        read_end, write_end = map(int, target.command("pipe", "pipe"))
        master = target.snapshot().master
        assert master.fds[read_end].kind == master.fds[write_end].kind == "pipe"
        assert master.fds[read_end].target == master.fds[write_end].target
        assert master.fds[read_end].inheritable is True
        assert master.fds[write_end].inheritable is False
        assert read_end in [info.fd for info in master.inheritable_fds]
        assert all(info.fd > 2 for info in master.inheritable_fds)

    def test_epoll_is_anon(self, targets):
        target = targets(Prefork, 1)
        fd = int(target.command("epoll", "epoll")[0])
        info = target.snapshot().master.fds[fd]
        assert info.kind == "anon"
        assert str(info) == f"{fd} anon eventpoll"

    def test_fd_count_matches_psutil(self, targets):
        target = targets(Prefork, 2)
        snap = target.snapshot()
        for proc in snap.processes.values():
            assert proc.fd_count == psutil.Process(proc.pid).num_fds()
            assert sum(proc.kinds.values()) == proc.fd_count

    def test_psutil_fallback(self, targets, monkeypatch):
        monkeypatch.setattr(descriptors, "USE_PROCFS", False)
        target = targets(Prefork, 1)
        snap = target.snapshot()
        (listening,) = snap.master.listening
        assert (listening.kind, listening.laddr, listening.inheritable) == ("tcp", ("127.0.0.1", target.port), None)
        assert snap.workers[0].kinds["unix"] == 1


@needs_procfs
class TestOwnership:
    def test_master_holds_what_it_accepted(self, targets, connect):
        target = targets(Prefork, 2)
        client = connect(target.port)
        fd = int(target.command("accept", "accepted")[0])
        snap = target.snapshot()
        assert snap.owner_of(client_addr(client)) is snap.master
        (held,) = snap.master_client_sockets
        assert (held.fd, held.kind, held.status) == (fd, "tcp", psutil.CONN_ESTABLISHED)
        assert (held.laddr, held.raddr) == (("127.0.0.1", target.port), client_addr(client))
        with pytest.raises(FdHygieneError) as info:
            assert_master_holds_no_clients(snap)
        assert str(info.value).splitlines() == [
            f"{MASTER_HOLDS_CLIENTS}: master (pid {target.pid}) still holds 1 client socket",
            f"  master (pid {target.pid}) fd {held}",
        ]

    def test_handed_off_sockets_belong_to_workers(self, targets, connect):
        target = targets(Prefork, 3)
        clients = []
        for worker in (0, 1, 0):
            clients.append(connect(target.port))
            target.command(f"handoff {worker}", "handed")
        snap = target.snapshot()
        owners = [snap.owner_of(client_addr(c)) for c in clients]
        assert [o.pid for o in owners] == [target.worker_pids[i] for i in (0, 1, 0)]
        counts = snap.connections_per_process(client_addr(c) for c in clients)
        assert counts == {"worker 0": 2, "worker 1": 1, "worker 2": 0}
        assert snap.master_client_sockets == []
        assert_master_holds_no_clients(snap)
        assert len(snap.workers[0].tcp_connections) == 2

    def test_clients_of_someone_else_are_unowned(self, targets, connect):
        target = targets(Prefork, 2)
        mine = connect(target.port)
        target.command("handoff 1", "handed")
        with socket.create_server(("127.0.0.1", 0)) as elsewhere, socket.create_connection(
            elsewhere.getsockname()
        ) as stranger:
            snap = target.snapshot()
            assert snap.owner_of(client_addr(stranger)) is None
            counts = snap.connections_per_process([client_addr(mine), client_addr(stranger)])
        assert counts == {"worker 0": 0, "worker 1": 1, observe.UNOWNED: 1}

    def test_released_socket_has_no_owner(self, targets, connect):
        target = targets(Prefork, 1)
        client = connect(target.port)
        target.command("handoff 0", "handed")
        assert target.snapshot().owner_of(client_addr(client)).label == "worker 0"
        target.command("release 0", "released")
        assert target.snapshot().owner_of(client_addr(client)) is None


@needs_procfs
class TestCloseWait:
    def test_master_socket_left_in_close_wait(self, targets, connect):
        target = targets(Prefork, 1)
        client = connect(target.port)
        fd = int(target.command("accept", "accepted")[0])
        client.close()
        snap = poll(target.snapshot, lambda s: s.close_wait, "socket in CLOSE_WAIT")
        [(proc, info)] = snap.close_wait
        assert (proc.pid, info.fd, info.laddr) == (target.pid, fd, ("127.0.0.1", target.port))
        assert snap.master.close_wait == [info]
        with pytest.raises(FdHygieneError) as error:
            assert_no_close_wait(snap)
        assert str(error.value).splitlines()[1] == f"  master (pid {target.pid}) fd {info}"
        assert str(error.value).startswith(f"{CLOSE_WAIT_FAILED}: 1 socket in CLOSE_WAIT")

    def test_worker_socket_left_in_close_wait(self, targets, connect):
        target = targets(Prefork, 2)
        client = connect(target.port)
        target.command("handoff 1", "handed")
        local = client_addr(client)
        client.close()
        snap = poll(target.snapshot, lambda s: s.close_wait, "socket in CLOSE_WAIT")
        [(proc, info)] = snap.close_wait
        assert proc.label == "worker 1"
        assert info.raddr == local
        assert info.status == psutil.CONN_CLOSE_WAIT

    def test_no_close_wait_while_client_is_open(self, targets, connect):
        target = targets(Prefork, 1)
        connect(target.port)
        target.command("handoff 0", "handed")
        snap = target.snapshot()
        assert snap.close_wait == []
        assert_no_close_wait(snap)


@needs_procfs
class TestDiff:
    def test_idle_tree_has_empty_diff(self, targets):
        target = targets(Prefork, 2)
        diff = target.snapshot() - target.snapshot()
        assert diff.is_empty
        assert str(diff) == "no fd changes"

    def test_accepted_socket_appears_then_vanishes(self, targets, connect):
        target = targets(Prefork, 1)
        before = target.snapshot()
        client = connect(target.port)
        fd = int(target.command("accept", "accepted")[0])
        middle = target.snapshot()
        diff = middle - before
        [(pid, (info,))] = diff.appeared.items()
        assert pid == target.pid
        assert (info.fd, info.kind, info.raddr) == (fd, "tcp", client_addr(client))
        assert diff.vanished == {}
        assert str(diff) == (
            f"master (pid {target.pid}): +1 fd: {fd} tcp 127.0.0.1:{target.port}->"
            f"127.0.0.1:{client_addr(client)[1]} ESTABLISHED"
        )
        target.command("closeall", "closed")
        after = target.snapshot()
        assert (after - middle).vanished == {target.pid: (info,)}
        assert (after - before).is_empty

    def test_processes_that_vanish_and_appear(self, targets):
        target = targets(Prefork, 3)
        before = target.snapshot()
        killed = int(target.command("kill 1", "reaped")[0])
        spawned = int(target.command("spawn", "spawned")[0])
        diff = target.snapshot() - before
        assert [p.pid for p in diff.vanished_processes] == [killed]
        assert [p.pid for p in diff.appeared_processes] == [spawned]
        lines = str(diff).splitlines()
        assert f"worker 1 (pid {killed}): process vanished" in lines
        # The master closed its end of the killed worker's channel and opened a new one.
        master_line = next(line for line in lines if line.startswith("master"))
        assert "+1 fd:" in master_line and "-1 fd:" in master_line and "unix" in master_line

    def test_leak_check_on_real_tree(self, targets, connect):
        target = targets(Prefork, 2)
        before = target.snapshot()
        for _ in range(3):
            connect(target.port)
            target.command("handoff 0", "handed")
        with pytest.raises(FdLeakError) as info:
            assert_no_fd_leak(before, target.snapshot(), cycles=3)
        assert str(info.value).startswith(
            f"{FD_LEAK_FAILED} in worker 0 (pid {target.worker_pids[0]}): "
            "3 fds appeared over 3 cycles (1.0 per cycle): "
        )
        target.command("release 0", "released")
        assert_no_fd_leak(before, target.snapshot(), cycles=3)


class TestText:
    """How observations read in messages; no processes needed."""

    @pytest.mark.parametrize(
        "addr, text",
        [(("127.0.0.1", 80), "127.0.0.1:80"), (("::1", 80), "[::1]:80"), ("/tmp/s", "/tmp/s"), (None, "-")],
    )
    def test_format_address(self, addr, text):
        assert observe.format_address(addr) == text

    @pytest.mark.parametrize(
        "info, text",
        [
            (FdInfo(3, "tcp", "socket:[1]", False, ("0.0.0.0", 80), None, "LISTEN"), "3 tcp 0.0.0.0:80 LISTEN"),
            (FdInfo(4, "unix", "socket:[2]", False, "/run/s.sock"), "4 unix /run/s.sock"),
            (FdInfo(5, "unix", "socket:[3]", False), "5 unix"),
            (FdInfo(6, "pipe", "pipe:[4]", True), "6 pipe"),
            (FdInfo(7, "file", "/dev/null", True), "7 file /dev/null"),
            (FdInfo(8, "socket", "socket:[5]", False), "8 socket"),
        ],
    )
    def test_fd_description(self, info, text):
        assert str(info) == text

    def test_diff_text_lists_every_change(self):
        listener = FdInfo(3, "tcp", "socket:[1]", False, ("127.0.0.1", 5000), None, "LISTEN")
        client = FdInfo(7, "tcp", "socket:[9]", False, ("127.0.0.1", 5000), ("127.0.0.1", 43210), "ESTABLISHED")

        def proc(pid: int, label: str, *fds: FdInfo) -> ProcessView:
            return ProcessView(pid, 1, label, "srv", {f.fd: f for f in fds})

        def tree(*procs: ProcessView) -> Snapshot:
            return Snapshot(1234, {p.pid: p for p in procs})

        before = tree(proc(1234, "master", listener), proc(1240, "worker 1", client), proc(1241, "worker 2"))
        after = tree(
            proc(1234, "master", listener, client, FdInfo(9, "unix", "socket:[8]")),
            proc(1240, "worker 1"),
            proc(1250, "worker 3", listener),
        )
        assert str(after - before).splitlines() == [
            "master (pid 1234): +2 fds: 7 tcp 127.0.0.1:5000->127.0.0.1:43210 ESTABLISHED, 9 unix",
            "worker 1 (pid 1240): -1 fd: 7 tcp 127.0.0.1:5000->127.0.0.1:43210 ESTABLISHED",
            "worker 3 (pid 1250): process appeared with 1 fd",
            "worker 2 (pid 1241): process vanished",
        ]

    def test_ipv4_mapped_peer_matches_ipv4_client(self):
        mapped = FdInfo(8, "tcp6", "socket:[1]", False, ("::ffff:127.0.0.1", 80), ("::ffff:127.0.0.1", 5555))
        snap = Snapshot(1, {1: ProcessView(1, 0, "master", "srv", {8: mapped})})
        assert snap.owner_of(("127.0.0.1", 5555)).pid == 1
