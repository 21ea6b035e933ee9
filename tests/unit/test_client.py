"""Tests of the blocking protocol client against a scripted in-test server on loopback.

The server is a thread that accepts connections and answers each request by
its method: ``ping`` echoes, and a few test-only methods misbehave on purpose
(split the response byte by byte, send garbage, close, reset, stay silent).
It listens on TCP, or on an abstract Unix address as the reference server's
control socket does.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from typing import Iterator, List, Optional, Tuple, Union

import pytest

from fdcluster_server import protocol
from pytest_fdcluster.client import (
    Client,
    ClientTimeout,
    ConnectionClosed,
    ProtocolMismatch,
    RemoteError,
    UnexpectedData,
)

SHORT = 0.3  # a timeout the tests expect to expire

needs_abstract_unix = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="abstract Unix socket addresses are Linux-only (the reference server's control socket uses one)",
)


class ScriptedServer:
    """A loopback server thread whose behaviour is chosen per request by the method name."""

    def __init__(self, unix_name: Optional[str] = None) -> None:
        self.address: Union[Tuple[str, int], str]
        if unix_name is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address = self.listener.getsockname()[:2]
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind("\0" + unix_name)
            self.listener.listen()
            self.address = "@" + unix_name  # the server's spelling, as in its fdcluster-ready line
        self.peers: List[tuple] = []
        self.events: List[str] = []
        self.errors: List[BaseException] = []
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.peers.append(peer)
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _record(self, event: str) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for_event(self, event: str, timeout: float = 5.0) -> None:
        """Block until the server recorded ``event``; fail after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: event in self.events, timeout):
                pytest.fail(f"server never recorded {event!r}; it recorded {self.events}")

    def _serve(self, conn: socket.socket) -> None:
        decoder = protocol.FrameDecoder()
        try:
            while True:
                try:
                    data = conn.recv(65536)
                except ConnectionResetError:
                    self._record("reset")
                    return
                if not data:
                    self._record("eof")
                    return
                for body in decoder.feed(data):
                    if not self._answer(conn, body):
                        return
        except OSError:
            return
        except BaseException as exc:  # re-raised by the fixture
            self.errors.append(exc)
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, body: bytes) -> bool:
        """Answer one request; False once the connection is to end."""
        method, params = protocol.parse_request(body)
        if method == "ping":
            conn.sendall(protocol.response(protocol.OUT_PONG, params))
        elif method == "split":
            for byte in protocol.response(protocol.OUT_PONG, params):
                conn.sendall(bytes([byte]))
        elif method == "twice":
            conn.sendall(protocol.response("first", params) + protocol.response("second", params))
        elif method == "not-object":
            conn.sendall(protocol.encode([1, 2, 3]))
        elif method == "no-out":
            conn.sendall(protocol.encode({"result": 1}))
        elif method == "not-json":
            conn.sendall(protocol.encode_body(b"{nope"))
        elif method == "huge-header":
            conn.sendall(struct.pack("<I", 1 << 30))
        elif method == "half-frame":
            conn.sendall(protocol.response(protocol.OUT_PONG, params)[:5])
        elif method == "close":
            return False
        elif method == "close-after-half":
            conn.sendall(protocol.response(protocol.OUT_PONG, params)[:5])
            return False
        elif method == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        elif method == "silent":
            pass
        else:
            conn.sendall(protocol.error(f"unknown method {method!r}"))
        return True

    def close(self) -> None:
        """Stop accepting, close every connection, join the threads."""
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)
        stuck = [t.name for t in [self._accepter, *self._threads] if t.is_alive()]
        if stuck:
            self.errors.append(AssertionError(f"server threads did not stop: {stuck}"))


def serving(srv: ScriptedServer) -> Iterator[ScriptedServer]:
    """Yield ``srv``, close it, then re-raise the first error of its threads."""
    try:
        yield srv
    finally:
        srv.close()
    if srv.errors:
        raise srv.errors[0]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A scripted server on loopback TCP."""
    yield from serving(ScriptedServer())


@pytest.fixture
def unix_server(request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    """A scripted server on an abstract Unix address unique to this test."""
    yield from serving(ScriptedServer(unix_name=f"fdcluster-test-client-{os.getpid()}-{id(request)}"))


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[Client]:
    """A client connected to ``server``."""
    with Client(server.address, timeout=5.0) as c:
        yield c


class TestCalls:
    def test_call_returns_the_echoed_result(self, client: Client) -> None:
        assert client.call("ping", {"nested": [1, "two", None]}) == {"nested": [1, "two", None]}

    def test_call_without_params_sends_null(self, client: Client) -> None:
        assert client.call("ping") is None

    def test_request_returns_the_whole_response(self, client: Client) -> None:
        assert client.request("ping", "x") == {"out": "pong", "result": "x"}

    def test_error_response_raises_remote_error_with_the_message(self, client: Client) -> None:
        with pytest.raises(RemoteError) as info:
            client.call("frobnicate")
        assert info.value.message == "unknown method 'frobnicate'"

    def test_request_returns_error_responses_without_raising(self, client: Client) -> None:
        assert client.request("frobnicate")["out"] == "error"

    def test_response_split_at_every_byte(self, client: Client) -> None:
        assert client.call("split", "é" * 10) == "é" * 10

    def test_non_object_response_is_a_protocol_mismatch(self, client: Client) -> None:
        with pytest.raises(ProtocolMismatch, match="not an object"):
            client.call("not-object")

    def test_response_without_out_is_a_protocol_mismatch(self, client: Client) -> None:
        with pytest.raises(ProtocolMismatch, match='"out"'):
            client.call("no-out")

    def test_malformed_json_response_is_a_protocol_mismatch(self, client: Client) -> None:
        with pytest.raises(ProtocolMismatch, match="malformed JSON"):
            client.call("not-json")

    def test_oversized_frame_header_is_a_protocol_mismatch(self, server: ScriptedServer) -> None:
        with Client(server.address, max_frame=1024) as c:
            with pytest.raises(ProtocolMismatch, match="exceeds the maximum"):
                c.call("huge-header")


class TestFrames:
    def test_frames_arriving_together_are_returned_one_per_call(self, client: Client) -> None:
        client.send_frame({"in": "twice", "params": 7})
        assert client.recv_frame() == {"out": "first", "result": 7}
        assert client.recv_frame() == {"out": "second", "result": 7}

    def test_pipelined_requests_in_one_write(self, client: Client) -> None:
        client.send_raw(b"".join(protocol.request("ping", i) for i in range(50)))
        assert [client.recv_frame()["result"] for _ in range(50)] == list(range(50))

    def test_request_split_at_every_byte(self, client: Client) -> None:
        for byte in protocol.request("ping", [1, 2]):
            client.send_raw(bytes([byte]))
        assert client.recv_frame() == {"out": "pong", "result": [1, 2]}

    def test_recv_raw_frame_returns_the_body(self, client: Client) -> None:
        client.send_frame({"in": "ping", "params": 1})
        assert client.recv_raw_frame() == b'{"out":"pong","result":1}'


class TestTimeouts:
    def test_silence_raises_client_timeout_naming_address(self, server: ScriptedServer, client: Client) -> None:
        client.send_frame({"in": "silent"})
        with pytest.raises(ClientTimeout) as info:
            client.recv_frame(timeout=SHORT)
        host, port = server.address
        assert f"{host}:{port}" in str(info.value)
        assert "frame" in str(info.value)

    def test_partial_frame_is_reported_in_the_timeout(self, client: Client) -> None:
        client.send_frame({"in": "half-frame", "params": 1})
        with pytest.raises(ClientTimeout, match="5 bytes of a partial frame"):
            client.recv_frame(timeout=SHORT)

    def test_call_timeout(self, client: Client) -> None:
        with pytest.raises(ClientTimeout):
            client.call("silent", timeout=SHORT)

    def test_client_timeout_is_a_timeout_error(self) -> None:
        assert issubclass(ClientTimeout, TimeoutError)


class TestConnectionEnd:
    def test_server_close_mid_wait_raises_connection_closed(self, client: Client) -> None:
        with pytest.raises(ConnectionClosed):
            client.call("close")

    def test_server_close_mid_frame_mentions_the_partial_frame(self, client: Client) -> None:
        with pytest.raises(ConnectionClosed, match="after 5 bytes"):
            client.call("close-after-half")

    def test_expect_eof_on_close(self, client: Client) -> None:
        client.send_frame({"in": "close"})
        assert client.expect_eof(5.0) == "eof"

    def test_expect_eof_on_reset(self, client: Client) -> None:
        client.send_frame({"in": "reset"})
        assert client.expect_eof(5.0) == "reset"

    def test_expect_eof_raises_on_data(self, client: Client) -> None:
        client.send_frame({"in": "ping"})
        with pytest.raises(UnexpectedData):
            client.expect_eof(5.0)

    def test_expect_eof_raises_on_buffered_frames(self, client: Client) -> None:
        client.send_frame({"in": "twice"})
        client.recv_frame()
        with pytest.raises(UnexpectedData):
            client.expect_eof(5.0)

    def test_expect_eof_times_out_while_open(self, client: Client) -> None:
        with pytest.raises(ClientTimeout, match="end of stream"):
            client.expect_eof(SHORT)

    def test_shutdown_write_sends_eof_and_keeps_reading(self, server: ScriptedServer, client: Client) -> None:
        client.send_frame({"in": "ping", "params": "last"})
        client.shutdown_write()
        assert client.recv_frame() == {"out": "pong", "result": "last"}
        assert client.expect_eof(5.0) == "eof"
        server.wait_for_event("eof")

    def test_abort_sends_a_reset(self, server: ScriptedServer, client: Client) -> None:
        assert client.call("ping") is None  # the server thread is now in recv
        client.abort()
        server.wait_for_event("reset")
        assert client.closed

    def test_close_sends_eof(self, server: ScriptedServer, client: Client) -> None:
        assert client.call("ping") is None
        client.close()
        client.close()  # idempotent
        server.wait_for_event("eof")


class TestConnection:
    def test_nodelay_is_set(self, client: Client) -> None:
        sock = socket.socket(fileno=client.fileno())
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            sock.detach()

    def test_local_address_is_what_the_server_sees(self, server: ScriptedServer, client: Client) -> None:
        client.call("ping")
        assert tuple(client.local_address) in [tuple(peer[:2]) for peer in server.peers]

    def test_local_address_survives_close(self, client: Client) -> None:
        address = client.local_address
        client.close()
        assert client.local_address == address

    def test_context_manager_closes(self, server: ScriptedServer) -> None:
        with Client(server.address) as c:
            c.call("ping")
        assert c.closed
        server.wait_for_event("eof")

    def test_refused_connection_raises_connection_refused(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            address: Optional[tuple] = sock.getsockname()
        assert address is not None
        with pytest.raises(ConnectionRefusedError):
            Client(address)


@needs_abstract_unix
class TestUnixSocket:
    def test_call_over_an_abstract_address(self, unix_server: ScriptedServer) -> None:
        with Client(unix_server.address) as client:
            assert client.call("ping", {"n": 1}) == {"n": 1}

    def test_the_kernel_spelling_of_an_abstract_address(self, unix_server: ScriptedServer) -> None:
        assert isinstance(unix_server.address, str)
        with Client("\0" + unix_server.address[1:]) as client:
            assert client.call("ping", 2) == 2

    def test_request_half_close_and_read_to_the_end(self, unix_server: ScriptedServer) -> None:
        # What Cluster asks the control socket: one request, FIN, the answer, then the server's FIN.
        with Client(unix_server.address) as client:
            client.send_frame({"in": "ping", "params": "stats?"})
            client.shutdown_write()
            assert client.recv_frame() == {"out": protocol.OUT_PONG, "result": "stats?"}
            assert client.expect_eof() == "eof"

    def test_messages_name_the_address_as_the_server_spells_it(self, unix_server: ScriptedServer) -> None:
        with Client(unix_server.address) as client:
            client.send_frame({"in": "silent"})
            with pytest.raises(ClientTimeout, match=f"no frame from {unix_server.address} within"):
                client.recv_frame(timeout=SHORT)

    def test_missing_socket_is_refused(self) -> None:
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            Client(f"@fdcluster-test-client-nobody-{os.getpid()}")
