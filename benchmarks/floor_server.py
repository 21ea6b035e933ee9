"""The floor of the handoff benchmark: accept a connection and close it, in a loop, nothing else.

Its CPU time per connection is what the kernel (and the smallest Python loop)
costs to accept and close a TCP connection; the master's handoff is compared
with it.  Run as ``python -m benchmarks.floor_server``; prints ``port N``.
"""

from __future__ import annotations

import argparse
import socket


def serve(host: str, port: int, backlog: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    print(f"port {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=1024)  # the reference server's default
    args = parser.parse_args()
    try:
        serve(args.host, args.port, args.backlog)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
