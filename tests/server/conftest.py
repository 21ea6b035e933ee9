"""Fixtures for the reference server's own tests: real processes, real sockets.

Every server a test starts runs in its own session and is SIGKILLed as a
group at teardown, whatever the test did, so nothing outlives the test.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import psutil
import pytest

from fdcluster_server import protocol

HERE = Path(__file__).parent
STARTUP_TIMEOUT = 15.0


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Poll ``predicate`` until truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Server:
    """One running reference server and the means to poke it."""

    def __init__(self, args: List[str], env: Optional[dict] = None) -> None:
        self.stderr_file = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fdcluster_server", "--log-level", "info", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr_file,
            start_new_session=True, env=env,
        )
        self.info = None

    def wait_ready(self) -> Server:
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if selector.select(0.05):
                line = self.proc.stdout.readline().decode()
                if not line:
                    break
                if line.startswith("fdcluster-ready "):
                    self.info = json.loads(line.split(" ", 1)[1])
                    selector.close()
                    return self
        selector.close()
        raise AssertionError(f"server did not become ready; exit={self.proc.poll()}\n{self.stderr()}")

    @property
    def address(self):
        return (self.info["host"], self.info["port"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")

    def workers(self) -> List[int]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(c.pid for c in children if status(c) not in (None, psutil.STATUS_ZOMBIE))

    def zombies(self) -> List[int]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if status(c) == psutil.STATUS_ZOMBIE]

    def owner(self, client: socket.socket) -> Optional[int]:
        """The pid of the process holding the server side of ``client``, seen from outside.

        Workers first: until the master reads the acknowledgement both hold the socket.
        """
        local = client.getsockname()
        for pid in self.workers() + [self.pid]:
            try:
                for conn in psutil.Process(pid).net_connections("tcp"):
                    if conn.raddr and tuple(conn.raddr) == local:
                        return pid
            except psutil.NoSuchProcess:
                continue
        return None

    def control(self, *frames: bytes) -> List[dict]:
        """Send ``frames`` on one control connection, half-close it, and return every reply until EOF."""
        address = self.info["control"]
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect("\0" + address[1:])
            sock.sendall(b"".join(frames))
            sock.shutdown(socket.SHUT_WR)  # the master closes its end on EOF: nothing lingers in it
            received = b"".join(iter(lambda: sock.recv(65536), b""))
        return [json.loads(body) for body in protocol.FrameDecoder().feed(received)]

    def stats(self) -> dict:
        (reply,) = self.control(protocol.request("stats"))
        return reply["result"]

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc.stdout.close()
        self.stderr_file.close()


def status(process: psutil.Process) -> Optional[str]:
    """A process's status, None once it is gone (it may die between listing and asking)."""
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return None


def recv_frame(sock: socket.socket, decoder: Optional[protocol.FrameDecoder] = None) -> dict:
    decoder = decoder or protocol.FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        bodies = decoder.feed(data)
        if bodies:
            assert len(bodies) == 1, "expected exactly one frame"
            return json.loads(bodies[0])


def call(sock: socket.socket, method: str, params=None) -> dict:
    sock.sendall(protocol.request(method, params))
    return recv_frame(sock)


def connect(address, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_peer(sock: socket.socket) -> str:
    """'eof' or 'reset': how the server ended this connection (fails if it sends data or hangs)."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return "reset"
    assert data == b"", f"expected the server to close, got {data[:60]!r}"
    return "eof"


@pytest.fixture
def start_server():
    """Start reference servers with the given flags; all are killed at teardown."""
    servers: List[Server] = []

    def start(*args: str, ready: bool = True, env: Optional[dict] = None) -> Server:
        environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        environ.update(env or {})
        server = Server(list(args), env=environ)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.kill()
