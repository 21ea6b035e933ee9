"""Mutants of the worker's side: its event loop, its connections, and the protocol decoding it relies on.

Each function patches one small piece of ``fdcluster_server`` (before the
master forks, so every worker inherits it) so that it carries one bug: on the
paths where the reference worker was hardened (backed-up output, a drain, a
handoff it cannot take, hostile frames) or on plain ones (framing, closing).
``mutant_expectations.EXPECTED`` says which scenario module must catch each.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat

from mutant_patching import kept, replace, replace_global

from fdcluster_server import master as master_module
from fdcluster_server import protocol
from fdcluster_server.worker import Worker


def close_wait() -> None:
    """A worker forgets a disconnected client without closing it: CLOSE_WAIT forever."""

    def close(self, conn):
        if self.connections.pop(conn.fd, None) is None:
            return
        if conn.events:
            self.selector.unregister(conn.sock)
        kept.append(conn.sock)  # the bug: ``conn.sock.close()`` forgotten
        self.buffered -= len(conn.out)
        self.counters["closed"] += 1
        self.closed_unreported += 1

    replace(Worker, "close", close)


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

    replace(Worker, "read", read)


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

    replace(Worker, "adopt", adopt)


def dies_on_bad_json() -> None:
    """A malformed request kills the worker instead of getting an error frame."""
    original = Worker.respond

    def respond(self, body):
        try:
            protocol.parse_request(body)
        except protocol.BadRequest:
            os._exit(1)
        return original(self, body)

    replace(Worker, "respond", respond)


def dup_fds() -> None:
    """A worker keeps a dup of every received descriptor."""
    original = Worker.adopt

    def adopt(self, sock):
        kept.append(os.dup(sock.fileno()))
        original(self, sock)

    replace(Worker, "adopt", adopt)


def reads_past_high_water() -> None:
    """A connection whose answers back up is still read: a client that never reads fills the worker's memory."""
    original = Worker.update_interest

    def update_interest(self, conn):
        original(self, conn)
        # the bug: ``len(conn.out) < HIGH_WATER and not conn.decoder.complete`` left out of the read condition
        if (conn.linger_until is None and not (conn.eof or conn.closing) and not conn.events & selectors.EVENT_READ
                and self.buffered < self.config.max_output_per_worker):
            if conn.events:
                self.selector.modify(conn.sock, conn.events | selectors.EVENT_READ, conn)
            else:
                self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.events |= selectors.EVENT_READ

    replace(Worker, "update_interest", update_interest)


def truncated_handoff_dropped() -> None:
    """A handoff whose descriptor the kernel discarded (the worker out of descriptors) is ignored, not rejected.

    The master waits forever for an acknowledgement that never comes: the client hangs.
    """
    original = Worker.take_handoff

    def take_handoff(self, conn_id, fd):
        if fd is None:
            return  # the bug: ``self.rejects.append(conn_id)`` forgotten
        original(self, conn_id, fd)

    replace(Worker, "take_handoff", take_handoff)


def drain_skips_queued() -> None:
    """A draining worker closes a connection that looks idle without reading what is queued: RST, requests lost."""

    def close_idle(self, conn):
        self.close(conn)  # the bug: no last recv() before the close, so unread requests turn the close into an RST
        return True

    replace(Worker, "close_idle", close_idle)


def worker_term_is_fast() -> None:
    """A worker treats SIGTERM like SIGINT: it closes every connection at once, requests in flight or not."""

    def handle_signals(self):
        for signum in self.signals.pending():
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self.stop_now = True  # the bug: SIGTERM should ``begin_drain()``

    replace(Worker, "handle_signals", handle_signals)


def sweep_spares_channels() -> None:
    """A new worker's descriptor sweep spares every SEQPACKET socket: the master's ends of the other channels.

    A first-generation worker inherits the channels of the workers started before it, a respawned one those
    of every other worker, so a replacement holds more than the worker it replaced.
    """
    original = master_module.close_inherited_fds

    def close_inherited_fds(keep):
        spared = set(keep)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                probe = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                if probe.type == socket.SOCK_SEQPACKET:
                    spared.add(fd)  # the bug: meant to spare its own channel, which ``keep`` holds already
            finally:
                probe.detach()
        original(spared)

    replace_global(master_module, "close_inherited_fds", close_inherited_fds)


def recursion_escapes() -> None:
    """Deeply nested JSON: the parser's RecursionError is not turned into a BadRequest, and kills the worker."""

    def decode_body(body):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise protocol.BadRequest(f"invalid UTF-8 at byte {exc.start}") from None
        try:
            return protocol._bounded_decoder.decode(text)
        except protocol.BadRequest:
            raise
        except ValueError as exc:
            raise protocol.BadRequest(f"malformed JSON: {exc}") from None
        # the bug: ``except RecursionError`` missing

    replace_global(protocol, "decode_body", decode_body)
