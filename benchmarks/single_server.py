"""The no-handoff baseline: one process accepts and serves the protocol itself, with selectors.

Per request it does what a reference worker does (frame decoding, request
parsing, the built-in handlers, one write per batch of responses, TCP_NODELAY)
and nothing else: no master, no socketpair, no acknowledgement.  The cluster's
connections and requests per second are given as ratios of this server's.
Run as ``python -m benchmarks.single_server``; prints ``port N``.
"""

from __future__ import annotations

import argparse
import selectors
import socket
from typing import Dict

from fdcluster_server import handlers, protocol

RECV_SIZE = 65536


class Connection:
    __slots__ = ("sock", "decoder", "out", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = protocol.FrameDecoder()
        self.out = bytearray()
        self.events = selectors.EVENT_READ


def respond(table: Dict[str, handlers.Handler], body: bytes) -> bytes:
    """The response frame for one request body, as the worker builds it."""
    try:
        method, params = protocol.parse_request(body)
    except protocol.BadRequest as exc:
        return protocol.error(str(exc))
    handler = table.get(method)
    if handler is None:
        return protocol.error(f"unknown method {method!r}")
    try:
        result = handler(params)
    except Exception as exc:  # a handler's bug is an error frame, as in the worker
        return protocol.error(f"handler {method!r} raised {type(exc).__name__}: {exc}")
    if result.__class__ is handlers.Reply:
        return protocol.response(result.out, result.result)
    return protocol.response(handlers.OUT_OK, result)


def serve(host: str, port: int, backlog: int) -> None:
    table = handlers.build([])
    selector = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    print(f"port {listener.getsockname()[1]}", flush=True)

    def close(conn: Connection) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()

    while True:
        for key, mask in selector.select():
            conn = key.data
            if conn is None:
                for _ in range(128):
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # ECONNABORTED and friends: the client gave up
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    selector.register(sock, selectors.EVENT_READ, Connection(sock))
                continue
            if mask & selectors.EVENT_READ:
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(conn)
                    continue
                if not data:
                    close(conn)
                    continue
                for body in conn.decoder.feed(data):
                    conn.out += respond(table, body)
                if conn.decoder.failure is not None:  # an oversized frame: say why, then close
                    try:
                        conn.sock.send(conn.out + protocol.error(str(conn.decoder.failure)))
                    except OSError:
                        pass
                    close(conn)
                    continue
            if conn.out:
                try:
                    sent = conn.sock.send(conn.out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    close(conn)
                    continue
                del conn.out[:sent]
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
            if events != conn.events:  # one epoll_ctl only when the interest changes, as in the worker
                conn.events = events
                selector.modify(conn.sock, events, conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args()
    try:
        serve(args.host, args.port, args.backlog)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
