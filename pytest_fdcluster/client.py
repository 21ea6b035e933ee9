"""Blocking client for the length-prefixed JSON protocol, used by tests and scenarios.

One ``Client`` is one connection: TCP to ``(host, port)``, or a Unix stream
socket when the address is a path (``"@name"`` or ``"\\0name"`` for Linux's
abstract namespace), as the reference server's control socket is.  It speaks
whole frames (``call``, ``request``, ``send_frame``/``recv_frame``) and also
lets a test misbehave on purpose (``send_raw``, ``shutdown_write``,
``abort``) and observe how the server ends the connection (``expect_eof``).

Framing comes from ``fdcluster_server.protocol``; this module only moves bytes.
No pytest import: the client works in scripts and worker processes too.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections import deque
from typing import Any, Deque, Optional, Tuple, Union

from fdcluster_server import protocol

from .text import format_address

__all__ = [
    "Client",
    "ClientError",
    "ClientTimeout",
    "ConnectionClosed",
    "ProtocolMismatch",
    "RemoteError",
    "UnexpectedData",
]

Address = Tuple[str, int]
#: A Unix socket path; a leading "@" or NUL names an abstract address.
UnixAddress = str

#: A response echoes its request's params, so it may exceed the server's 1 MiB
#: request limit by the envelope; leave generous room before calling it broken.
DEFAULT_MAX_RESPONSE = 16 * protocol.DEFAULT_MAX_FRAME

_RECV_SIZE = 65536


class ClientError(Exception):
    """Base class of every error this client raises on its own account."""


class ClientTimeout(ClientError, TimeoutError):
    """Nothing (or not enough) arrived in time; the message names address and awaited thing."""


class ConnectionClosed(ClientError, ConnectionError):
    """The server closed the connection while a frame was awaited."""


class ProtocolMismatch(ClientError):
    """The server sent something that is not a valid frame or response."""


class UnexpectedData(ClientError):
    """Data arrived where the end of the stream was expected."""


class RemoteError(ClientError):
    """The server answered ``{"out": "error", "result": message}``."""

    def __init__(self, message: Any) -> None:
        super().__init__(message)
        #: The ``result`` of the error frame, normally a human-readable string.
        self.message = message


class Client:
    """One blocking connection to a protocol server.

    ``timeout`` bounds the connect and, unless overridden per call, every
    wait for a frame.  Frames that arrive together are buffered, so
    pipelined responses are returned one per ``recv_frame`` call.
    """

    def __init__(
        self,
        address: Union[Address, UnixAddress],
        timeout: float = 5.0,
        max_frame: int = DEFAULT_MAX_RESPONSE,
    ) -> None:
        self.address: Union[Address, UnixAddress] = (
            address if isinstance(address, str) else (address[0], int(address[1]))
        )
        self.timeout = timeout
        #: The Cluster that made this client (``Cluster.client()``), so faults done on it are recorded there.
        self.cluster: Optional[Any] = None
        self._decoder = protocol.FrameDecoder(max_frame)
        self._frames: Deque[bytes] = deque()
        self._closed = False
        try:
            self._sock = self._connect(timeout)
        except socket.timeout:
            raise ClientTimeout(f"connecting to {format_address(self.address)} timed out after {timeout} s") from None
        try:
            if isinstance(self.address, str):
                local = self._sock.getsockname()
            else:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                local = self._sock.getsockname()[:2]
            # Captured now so it is still known after close, e.g. to match server logs.
            #: ``(host, port)`` on TCP; on a Unix socket its path, "" when unbound (typed as loosely as getsockname).
            self.local_address: Any = local
        except BaseException:
            self._sock.close()
            raise

    def _connect(self, timeout: float) -> socket.socket:
        if not isinstance(self.address, str):
            return socket.create_connection(self.address, timeout=timeout)
        # "@name" is the server's spelling of an abstract address, "\0name" the kernel's.
        path = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- context manager -------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Client {format_address(self.local_address)} -> {format_address(self.address)} {state}>"

    @property
    def closed(self) -> bool:
        """Whether ``close`` or ``abort`` was called."""
        return self._closed

    # -- sending ---------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Send ``data`` as is: partial frames, garbage, several frames at once."""
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise ClientTimeout(
                f"sending {len(data)} bytes to {format_address(self.address)} "
                f"timed out after {self.timeout} s"
            ) from None

    def send_frame(self, obj: Any) -> None:
        """Encode ``obj`` as JSON and send it as one frame."""
        self.send_raw(protocol.encode(obj))

    # -- receiving -------------------------------------------------------------

    def _deadline(self, timeout: Optional[float]) -> Tuple[float, float]:
        if timeout is None:
            timeout = self.timeout
        return timeout, time.monotonic() + timeout

    def _fill(self, deadline: float, timeout: float, awaiting: str) -> bytes:
        """Receive one chunk before ``deadline``; b"" means end of stream."""
        # An expired deadline still gets one non-blocking read: data already here is not a timeout.
        remaining = max(0.0, deadline - time.monotonic())
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(_RECV_SIZE)
        except (socket.timeout, BlockingIOError):
            raise self._timeout(awaiting, timeout) from None

    def _timeout(self, awaiting: str, timeout: float) -> ClientTimeout:
        partial = self._decoder.pending
        detail = f" ({partial} bytes of a partial frame buffered)" if partial else ""
        return ClientTimeout(
            f"no {awaiting} from {format_address(self.address)} within {timeout} s{detail}"
        )

    def recv_raw_frame(self, timeout: Optional[float] = None) -> bytes:
        """Return the body of the next frame, waiting at most ``timeout`` seconds."""
        timeout, deadline = self._deadline(timeout)
        while not self._frames:
            if self._decoder.failure is not None:
                raise ProtocolMismatch(
                    f"from {format_address(self.address)}: {self._decoder.failure}"
                )
            data = self._fill(deadline, timeout, "frame")
            if not data:
                partial = self._decoder.pending
                detail = f" after {partial} bytes of a partial frame" if partial else ""
                raise ConnectionClosed(
                    f"{format_address(self.address)} closed the connection{detail} "
                    "while a frame was awaited"
                )
            self._frames.extend(self._decoder.feed(data))
        return self._frames.popleft()

    def recv_frame(self, timeout: Optional[float] = None) -> Any:
        """Return the next frame decoded from JSON (normally a dict)."""
        body = self.recv_raw_frame(timeout)
        try:
            return protocol.decode_body(body)
        except protocol.ProtocolError as exc:
            raise ProtocolMismatch(f"from {format_address(self.address)}: {exc}") from None

    # -- request/response ------------------------------------------------------

    def request(self, method: str, params: Any = None, timeout: Optional[float] = None) -> dict:
        """Send a request and return the whole response object."""
        self.send_frame({"in": method, "params": params})
        response = self.recv_frame(timeout)
        if not isinstance(response, dict) or not isinstance(response.get("out"), str):
            raise ProtocolMismatch(
                f"response to {method!r} from {format_address(self.address)} "
                f'is not an object with a string "out": {response!r:.200}'
            )
        return response

    def call(self, method: str, params: Any = None, timeout: Optional[float] = None) -> Any:
        """Send a request and return its ``result``; an error response raises ``RemoteError``."""
        response = self.request(method, params, timeout)
        if response["out"] == protocol.OUT_ERROR:
            raise RemoteError(response.get("result"))
        return response.get("result")

    # -- ending the connection -------------------------------------------------

    def expect_eof(self, timeout: Optional[float] = None) -> str:
        """Wait for the server to end the stream: ``"eof"`` (FIN) or ``"reset"`` (RST).

        Raises ``UnexpectedData`` if anything arrives first (including frames
        already buffered) and ``ClientTimeout`` if the stream stays open.
        """
        if self._frames or self._decoder.pending:
            raise UnexpectedData(
                f"{format_address(self.address)} sent data before the expected end of stream "
                f"({len(self._frames)} frames, {self._decoder.pending} bytes buffered)"
            )
        timeout, deadline = self._deadline(timeout)
        try:
            data = self._fill(deadline, timeout, "end of stream")
        except ConnectionResetError:
            return "reset"
        except OSError as exc:
            # A reset can also surface as EPIPE/ECONNABORTED depending on timing.
            if exc.errno in (errno.ECONNABORTED, errno.EPIPE):
                return "reset"
            raise
        if data:
            raise UnexpectedData(
                f"{format_address(self.address)} sent {len(data)} bytes where the end of "
                f"stream was expected: {data[:64]!r}"
            )
        return "eof"

    def shutdown_write(self) -> None:
        """Half-close: send FIN, keep reading."""
        self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close normally (FIN).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()

    def abort(self) -> None:
        """Close with a reset (RST) instead of FIN, via SO_LINGER with a zero timeout."""
        if self._closed:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self.close()

    def fileno(self) -> int:
        """The socket's descriptor, for ``select`` or socket options."""
        return self._sock.fileno()
