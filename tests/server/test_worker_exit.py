"""A worker whose master is gone exits with ``EXIT_MASTER_GONE``, however it notices.

The worker runs in a child forked by the test, which plays the master on the
other end of the channel: the test closes the channel at the moment it chooses
and reads the worker's exit status itself (a real master would respawn it).
The child runs what the master runs after fork: ``Worker(...).run()``, any exception
being a crash.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Tuple

import pytest

from fdcluster_server import channel as ch
from fdcluster_server.config import EXIT_MASTER_GONE, EXIT_WORKER_CRASHED, ServerConfig
from fdcluster_server.handlers import BUILTINS
from fdcluster_server.worker import Worker


def fork_worker() -> Tuple[int, ch.Channel, int]:
    """A worker process waiting for a byte on the returned pipe before it starts: (pid, master's end, pipe)."""
    master_end, worker_end = ch.socketpair()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = EXIT_WORKER_CRASHED
        try:
            master_end.close()
            os.close(go_write)
            os.read(go_read, 1)
            code = Worker(0, worker_end, ServerConfig(workers=1), BUILTINS, os.getppid()).run()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    worker_end.close()
    os.close(go_read)
    master_end.setblocking(True)
    master_end.settimeout(10)
    return pid, ch.Channel(master_end), go_write


def exit_code(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status), f"worker {pid} was killed by signal {os.WTERMSIG(status)}"
            return os.WEXITSTATUS(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"worker {pid} did not exit within {timeout} s of losing its master")


@pytest.fixture
def worker():
    pid, channel, go = fork_worker()
    yield pid, channel, go
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    os.close(go)
    channel.close()


def test_channel_closed_before_the_worker_starts(worker):
    pid, channel, go = worker
    channel.close()
    os.write(go, b"x")
    assert exit_code(pid) == EXIT_MASTER_GONE, "its READY refused: the master is gone"


def test_channel_closed_while_a_stats_query_waits(worker):
    pid, channel, go = worker
    os.write(go, b"x")
    assert next(channel.receive()).kind == ch.READY
    os.kill(pid, signal.SIGSTOP)  # so the query and the close both wait for it
    try:
        channel.send(ch.STATS, 1)
        channel.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert exit_code(pid) == EXIT_MASTER_GONE, "its answer to the query refused: the master is gone"


def test_channel_eof(worker):
    pid, channel, go = worker
    os.write(go, b"x")
    assert next(channel.receive()).kind == ch.READY
    channel.close()
    assert exit_code(pid) == EXIT_MASTER_GONE
