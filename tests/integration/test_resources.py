"""Integration tests of pytest_fdcluster.resources against real processes and sockets.

Each test starts a small ``python -c`` child that says on stdout when it is
in the state under test (busy, asleep, listening, forked), so every
measurement is synchronised on what the child reports; the children are
killed and reaped by a fixture, also when a test fails.
"""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
from typing import Callable, List

import psutil
import pytest

from pytest_fdcluster import observe, resources

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux: /proc and prlimit")

#: Bound on every read of a child's report line.
TIMEOUT = 10.0

BUSY_THREAD = r'''
import threading, time
def spin():
    while True:
        pass
threading.Thread(target=spin, daemon=True).start()
print("busy", flush=True)
time.sleep(60)  # the main thread sleeps: only the second task burns CPU
'''

SLEEPER = r'''
import time
print("asleep", flush=True)
time.sleep(60)
'''

SOCKET_OPENER = r'''
import errno, socket, sys
print("ready", flush=True)
for line in sys.stdin:
    try:
        socket.socket().close()
        print("ok", flush=True)
    except OSError as exc:
        print(errno.errorcode.get(exc.errno, exc.errno), flush=True)
'''

FORKED_HOLDER = r'''
import os, socket, sys, time
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
'''


@pytest.fixture
def spawn() -> Callable[[str], subprocess.Popen]:
    """Start ``python -c CODE`` children with pipes; kill and reap them (and their forks) at the end."""
    children: List[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        children.append(child)
        return child

    yield start
    for child in children:
        try:
            forks = psutil.Process(child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            forks = []
        for proc in forks:
            proc.kill()
        child.kill()
        child.wait(TIMEOUT)
        psutil.wait_procs(forks, timeout=TIMEOUT)


def report(child: subprocess.Popen) -> str:
    """The child's next stdout line; fails the test if it does not come within ``TIMEOUT``."""
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        assert selector.select(TIMEOUT), f"child pid {child.pid} reported nothing within {TIMEOUT:g} s"
    line = child.stdout.readline().strip()  # type: ignore[union-attr]
    assert line, f"child pid {child.pid} closed its stdout (exit code {child.poll()})"
    return line


class TestCpu:
    def test_busy_thread_is_counted(self, spawn):
        busy = spawn(BUSY_THREAD)
        assert report(busy) == "busy"
        before = psutil.Process(busy.pid).cpu_times()
        share = resources.cpu_window([busy.pid], 1.0)[busy.pid]
        after = psutil.Process(busy.pid).cpu_times()
        # The kernel's own tick-based figure for the same window: on a loaded machine a spinning
        # thread gets less than a core, but both measures must agree on what it did get.
        ticks = (after.user + after.system) - (before.user + before.system)
        assert share > 0.05, f"a spinning thread of pid {busy.pid} measured at {share:.1%} of a core"
        assert abs(share - ticks) < 0.15, f"schedstat says {share:.1%} of a core, /proc/PID/stat {ticks:.1%}"

    def test_sleeping_process_is_idle(self, spawn):
        sleeper = spawn(SLEEPER)
        assert report(sleeper) == "asleep"
        share = resources.cpu_window([sleeper.pid], 0.5)[sleeper.pid]
        assert share < 0.01, f"a sleeping pid {sleeper.pid} measured at {share:.1%} of a core"

    def test_gone_process_fails_the_check(self, spawn):
        child = spawn(SLEEPER)
        assert report(child) == "asleep"
        child.kill()
        child.wait(TIMEOUT)
        with pytest.raises(resources.ProcessGone, match=f"pid {child.pid}"):
            resources.cpu_seconds(child.pid)
        assert issubclass(resources.Unobservable, AssertionError), "an unobservable check must fail, not error"


    def test_cpu_over_holds_each_process_to_its_own_bound(self):
        shares = {1: 0.04, 2: 0.20, 3: 0.20, 4: 0.06}
        baseline = {1: 0.0, 2: 0.10, 3: 0.01}  # pid 4 is new: held to the floor
        assert resources.cpu_over(shares, baseline, floor=0.05, factor=3.0) == {3: (0.20, 0.05), 4: (0.06, 0.05)}


class TestMemory:
    def test_rss_of_a_live_process(self, spawn):
        child = spawn(SLEEPER)
        assert report(child) == "asleep"
        assert 1 << 20 < resources.rss(child.pid) < 1 << 30


class TestDescriptors:
    def test_lowered_limit_makes_socket_fail_and_is_restored(self, spawn):
        child = spawn(SOCKET_OPENER)
        assert report(child) == "ready"
        proc = psutil.Process(child.pid)
        original = proc.rlimit(psutil.RLIMIT_NOFILE)
        lowest = resources.lowest_free_fd(child.pid)
        assert lowest not in resources.open_fds(child.pid)
        with resources.nofile_limit(child.pid, lowest) as previous:
            assert previous == tuple(original)
            assert proc.rlimit(psutil.RLIMIT_NOFILE) == (lowest, original[1])
            child.stdin.write("socket\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            assert report(child) == "EMFILE", f"socket() in pid {child.pid} with RLIMIT_NOFILE {lowest}"
        assert proc.rlimit(psutil.RLIMIT_NOFILE) == tuple(original)
        child.stdin.write("socket\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        assert report(child) == "ok", f"socket() in pid {child.pid} after the limit was restored"

    def test_limit_is_restored_when_the_block_raises(self, spawn):
        child = spawn(SLEEPER)
        assert report(child) == "asleep"
        original = psutil.Process(child.pid).rlimit(psutil.RLIMIT_NOFILE)
        with pytest.raises(RuntimeError), resources.nofile_limit(child.pid, 3):
            raise RuntimeError("the test body failed")
        assert psutil.Process(child.pid).rlimit(psutil.RLIMIT_NOFILE) == tuple(original)


class TestHolders:
    def test_socket_shared_after_fork_has_two_holders(self, spawn):
        parent = spawn(FORKED_HOLDER)
        port = int(report(parent))
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            forked = int(report(parent))
            snap = observe.snapshot(parent.pid)
            found = resources.holders(snap, client.getsockname())
            assert [view.pid for view in found] == [parent.pid, forked]
            assert resources.describe_holders(found) == f"master pid {parent.pid} and worker 0 pid {forked}"
            assert resources.holders(snap, ("127.0.0.1", 1)) == []
            assert resources.describe_holders([]) == "nobody"
            address = client.getsockname()[:2]
            wrong = resources.not_held_by_one_worker(snap, [address])
            assert [view.pid for view in wrong[address]] == [parent.pid, forked]

    def test_one_worker_alone_is_the_only_right_holding(self):
        peer = ("127.0.0.1", 40000)
        conn = observe.FdInfo(7, "tcp", "socket:[1]", False, ("127.0.0.1", 5000), peer, "ESTABLISHED")
        mapped = observe.FdInfo(8, "tcp6", "socket:[2]", False, ("::ffff:127.0.0.1", 5000),
                                ("::ffff:127.0.0.1", 40001), "ESTABLISHED")
        master = observe.ProcessView(100, 1, "master", "server", {})
        worker = observe.ProcessView(101, 100, "worker 0", "server", {7: conn, 8: mapped})
        snap = observe.Snapshot(100, {100: master, 101: worker})
        assert resources.not_held_by_one_worker(snap, [peer, ("127.0.0.1", 40001)]) == {}
        held_by_master = observe.Snapshot(100, {100: observe.ProcessView(100, 1, "master", "server", {7: conn}),
                                                101: observe.ProcessView(101, 100, "worker 0", "server", {})})
        assert [v.label for v in resources.not_held_by_one_worker(held_by_master, [peer])[peer]] == ["master"]
        assert [v.label for v in resources.not_held_by_one_worker(snap, [("127.0.0.1", 1)])[("127.0.0.1", 1)]] == []

    def test_unreadable_descriptors_fail_the_check(self):
        hidden = observe.ProcessView(4242, 1, "worker 0", "server", {}, fds_visible=False)
        snap = observe.Snapshot(100, {4242: hidden})
        with pytest.raises(resources.Unobservable, match=r"worker 0 \(pid 4242\)"):
            resources.holders(snap, ("127.0.0.1", 5000))
