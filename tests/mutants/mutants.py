"""Deliberately broken variants of the reference server, one bug each, for the mutation matrix.

``python tests/mutants/mutants.py VARIANT [server flags...]`` patches one
piece of ``fdcluster_server`` and runs it.  Each bug is one a real prefork
server has shipped with; the chaos suite must catch every one of them.

Patches go on the classes before the master forks, so workers inherit them.
``_replace`` refuses a method the server no longer has: after a rename a
mutant must fail loudly, not run the unbroken server under a broken name.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict

from fdcluster_server import __main__ as server_main
from fdcluster_server import protocol
from fdcluster_server.dispatch import Dispatcher
from fdcluster_server.master import Master
from fdcluster_server.worker import Worker

_kept = []  # references that keep "leaked" sockets from being closed by the garbage collector


def _replace(owner: type, name: str, replacement: Callable) -> None:
    """Make the server call ``replacement`` where it calls ``owner.name``."""
    if not callable(getattr(owner, name, None)):
        raise AttributeError(f"{owner.__qualname__}.{name} does not exist: this mutant would patch nothing")
    setattr(owner, name, replacement)


def master_keeps_fds() -> None:
    """The master never closes its copy of a handed-off socket."""

    def ack(self, index, conn_ids):
        worker_slot = self.workers.get(index)
        if worker_slot is None:
            return
        for conn_id in conn_ids:
            conn = worker_slot.unacked.pop(conn_id, None)
            if conn is not None:
                _kept.append(conn)  # the bug: acknowledged, but the master's copy stays open
                worker_slot.acked += 1
                worker_slot.active += 1
        self.distribute()

    _replace(Dispatcher, "ack", ack)


def close_wait() -> None:
    """A worker forgets a disconnected client without closing it: CLOSE_WAIT forever."""

    def close(self, conn):
        if self.connections.pop(conn.fd, None) is None:
            return
        self.selector.unregister(conn.sock)
        _kept.append(conn.sock)
        self.counters["closed"] += 1
        self.closed_unreported += 1

    _replace(Worker, "close", close)


def no_respawn() -> None:
    """A dead worker is reaped but never replaced."""
    _replace(Master, "schedule_respawn", lambda self, process: None)


def unfair_dispatch() -> None:
    """Round-robin only when idle: a busy worker keeps getting more (fine under light load)."""
    original = Dispatcher._pick

    def pick(self):
        current = self.workers.get(self._cursor - 1)
        if current is not None and 0 < len(current.unacked) < 64:
            return current  # sticky while it has handoffs in flight
        return original(self)

    _replace(Dispatcher, "_pick", pick)


def single_recv() -> None:
    """One recv() is taken as one whole frame: split and coalesced frames break."""

    def read(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)
            return
        conn.out += self.respond(data[4:])
        conn.requests += 1
        self.flush(conn)

    _replace(Worker, "read", read)


def synchronous_worker() -> None:
    """A worker serves one connection at a time, blocking until that client leaves."""
    original_adopt = Worker.adopt

    def adopt(self, sock):
        original_adopt(self, sock)
        self.report()  # acknowledge first, as the real worker does
        conn = self.connections[sock.fileno()]
        self.selector.unregister(sock)
        sock.setblocking(True)
        decoder = protocol.FrameDecoder(self.config.max_frame)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            for body in decoder.feed(data):
                try:
                    sock.sendall(self.respond(body))
                except OSError:
                    break
        self.connections.pop(conn.fd, None)
        sock.close()
        self.closed_unreported += 1

    _replace(Worker, "adopt", adopt)


def dies_on_bad_json() -> None:
    """A malformed request kills the worker instead of getting an error frame."""
    original = Worker.respond

    def respond(self, body):
        try:
            protocol.parse_request(body)
        except protocol.BadRequest:
            os._exit(1)
        return original(self, body)

    _replace(Worker, "respond", respond)


def lost_handoff() -> None:
    """Node's behaviour: sockets handed to a worker that dies before acknowledging are dropped."""

    def remove(self, index):
        worker_slot = self.workers.pop(index, None)
        if worker_slot is None:
            return []
        for conn in worker_slot.unacked.values():
            conn.close()
        worker_slot.unacked.clear()
        self.distribute()
        return []

    _replace(Dispatcher, "remove", remove)


def dup_fds() -> None:
    """A worker keeps a dup of every received descriptor."""
    original = Worker.adopt

    def adopt(self, sock):
        _kept.append(os.dup(sock.fileno()))
        original(self, sock)

    _replace(Worker, "adopt", adopt)


VARIANTS: Dict[str, Callable[[], None]] = {
    "master-keeps-fds": master_keeps_fds,
    "close-wait": close_wait,
    "no-respawn": no_respawn,
    "unfair-dispatch": unfair_dispatch,
    "single-recv": single_recv,
    "synchronous-worker": synchronous_worker,
    "dies-on-bad-json": dies_on_bad_json,
    "lost-handoff": lost_handoff,
    "dup-fds": dup_fds,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS and sys.argv[1] != "none":
        print(f"usage: mutants.py VARIANT [server flags]; variants: none, {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    variant = sys.argv[1]
    if variant != "none":
        VARIANTS[variant]()
    return server_main.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
