"""The serving half of the small protocol servers the tests run as targets: one thread per connection.

Imported by the target scripts beside it (``prefork_target.py``,
``stubborn_target.py``, ``late_announcer.py``), which run as
``python tests/support/SCRIPT.py ...``: a script's own folder comes first on
``sys.path``, so the import needs no path set-up, in pytester runs too.
Methods: ``ping`` echoes its params (out "pong"), ``pid`` answers the serving
process's pid; anything else gets an error frame.  A frame the decoder
rejects gets an error frame naming why, then the connection closes, as the
reference server does.
"""

from __future__ import annotations

import os
import socket
import threading

from fdcluster_server import protocol


def serve_connection(conn: socket.socket) -> None:
    """Answer framed requests on one connection until the client closes it or sends a bad frame."""
    decoder = protocol.FrameDecoder()
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            for body in decoder.feed(data):
                try:
                    method, params = protocol.parse_request(body)
                except protocol.ProtocolError as exc:
                    conn.sendall(protocol.error(str(exc)))
                    continue
                if method == "ping":
                    conn.sendall(protocol.response(protocol.OUT_PONG, params))
                elif method == "pid":
                    conn.sendall(protocol.response("ok", os.getpid()))
                else:
                    conn.sendall(protocol.error(f"unknown method {method!r}"))
            if decoder.failure is not None:
                conn.sendall(protocol.error(str(decoder.failure)))
                return


def accept_forever(listener: socket.socket) -> None:
    """Accept on ``listener`` until it is closed, serving each connection in its own thread."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


def listen(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:``port`` (0: any free port), reusable at once after a stop."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    return listener
