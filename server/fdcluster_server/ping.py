"""Start the reference server, ping it once, stop it: the newcomer's first command.

``python -m fdcluster_server.ping [--workers N]`` prints the readiness line,
the request and the response, then stops the server with SIGTERM and reports
its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import List

from . import protocol
from .config import READY_TAG

READY_TIMEOUT = 15.0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fdcluster_server.ping", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    command = [sys.executable, "-m", "fdcluster_server", "--workers", str(args.workers), "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    assert server.stdout is not None  # stdout=PIPE
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(server.stdout, selectors.EVENT_READ)
            if not selector.select(READY_TIMEOUT):
                print(f"server did not print '{READY_TAG}' within {READY_TIMEOUT:g} s", file=sys.stderr)
                return 1
        line = server.stdout.readline()
        if not line.startswith(READY_TAG):
            print(f"server exited before it was ready (status {server.wait()})", file=sys.stderr)
            return 1
        print(line.rstrip())
        info = json.loads(line.split(" ", 1)[1])
        params = {"hello": "world", "sent_at": time.time()}
        with socket.create_connection((info["host"], info["port"]), timeout=5) as sock:
            sock.sendall(protocol.request("ping", params))
            decoder = protocol.FrameDecoder()
            bodies: List[bytes] = []
            while not bodies:
                data = sock.recv(65536)
                if not data:
                    print("server closed the connection without answering", file=sys.stderr)
                    return 1
                bodies = decoder.feed(data)
        print("->", json.dumps({"in": "ping", "params": params}))
        print("<-", bodies[0].decode())
        server.send_signal(signal.SIGTERM)
        status = server.wait(15)
        print(f"server stopped with SIGTERM, exit status {status}")
        return 0 if status == 0 and protocol.decode_body(bodies[0]) == {"out": "pong", "result": params} else 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
