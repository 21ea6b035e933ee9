"""An external fdcluster target that makes teardown hard: ``python stubborn_target.py PORT WORKERS``.

A shared-accept prefork server speaking the protocol (``protocol_server``:
``ping`` echoes its params, ``pid`` answers the serving process's pid)
whose master and workers all ignore SIGTERM, so only SIGKILL stops them.
Options:

    --term-exit STATUS  the master answers SIGTERM after all: it kills its
                      workers and exits with STATUS (1: a stop that is not
                      graceful; 0: one that is, for tests of other faults).
    --drain SECONDS   a worker given SIGTERM keeps running SECONDS more, then
                      exits 0, as a worker finishing its requests would.
    --escape PIDFILE  before forking the workers, start a daemon outside the
                      target's session (setsid, double fork) that keeps the
                      listening socket open; its pid goes to PIDFILE.  It
                      exits by itself after ESCAPE_LIFETIME seconds.

Run by the plugin's tests (tests/plugin, tests/integration/test_cluster_api.py)
through ``--fdcluster-server`` or the marker's ``server=``; never imported.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import List

from protocol_server import accept_forever, listen

#: Upper bound on the escaped daemon's life, should the test that kills it fail first.
ESCAPE_LIFETIME = 30


def escape_with_listener(pidfile: str) -> None:
    """Leave a daemon holding the listening socket outside the session; write its pid."""
    intermediate = os.fork()
    if intermediate:
        os.waitpid(intermediate, 0)  # reaped: the daemon is nobody's descendant any more
        return
    # In the intermediate child: a new session, one more fork, then exit.
    os.setsid()
    daemon = os.fork()
    if daemon:
        with open(pidfile + ".tmp", "w") as out:
            out.write(str(daemon))
        os.replace(pidfile + ".tmp", pidfile)
        os._exit(0)
    # In the daemon: keep the listener; let go of the target's stdio so its readers see EOF.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.alarm(ESCAPE_LIFETIME)
    while True:
        signal.pause()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("workers", type=int)
    parser.add_argument("--escape", metavar="PIDFILE")
    parser.add_argument("--term-exit", metavar="STATUS", type=int)
    parser.add_argument("--drain", metavar="SECONDS", type=float)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by every fork below
    listener = listen(args.port)
    if args.escape:
        escape_with_listener(args.escape)
    workers = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            if args.drain is not None:
                signal.signal(signal.SIGTERM, lambda signum, frame: exit_after(args.drain))
            try:
                accept_forever(listener)  # in the forked worker
            finally:
                os._exit(0)
        workers.append(pid)
    if args.term_exit is not None:
        signal.signal(signal.SIGTERM, lambda signum, frame: exit_after_workers(workers, args.term_exit))
    while True:
        signal.pause()


def exit_after(seconds: float) -> None:
    """A worker's SIGTERM handler with ``--drain``: exit 0 after ``seconds`` (a timer: the handler returns)."""
    timer = threading.Timer(seconds, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def exit_after_workers(workers: List[int], status: int) -> None:
    """The master's SIGTERM handler with ``--term-exit``: kill and reap the workers, exit with ``status``."""
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for pid in workers:
        os.waitpid(pid, 0)
    os._exit(status)


if __name__ == "__main__":
    main()
