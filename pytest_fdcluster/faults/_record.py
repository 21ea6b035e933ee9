"""Where a fault says what it did: the target it was aimed at, the cluster's events and the log.

Every injector takes a ``Cluster`` or a plain ``(host, port)``; ``resolve``
turns either into the address to connect to and the cluster (if any) to
record in.  ``record`` is the one place an injection is written down: one
line with its parameters, appended to the cluster's events (so the
"fdcluster: to replay" section of a failed test shows it, with its time)
and logged at INFO on ``fdcluster.faults``.  A plain address is only
logged: there is no cluster to record in.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Optional, Tuple, Union

from ..client import Client
from ..cluster import Cluster
from ..sockets import Address
from ..text import format_address

__all__ = ["Target", "describe", "local_of", "logger", "peer_of", "record", "resolve"]

#: What an injector is aimed at: a running cluster, or the address of any server.
Target = Union[Cluster, Address]

logger = logging.getLogger("fdcluster.faults")

#: A list parameter longer than this is shown by its first items and its length.
_MAX_ITEMS = 12


def resolve(target: Target) -> Tuple[Address, Optional[Cluster]]:
    """The address to connect to and the cluster to record in (None for a plain address)."""
    if isinstance(target, Cluster):
        return target.address, target
    if isinstance(target, (tuple, list)) and len(target) >= 2:
        return (str(target[0]), int(target[1])), None
    raise TypeError(f"a fault needs a Cluster or a (host, port) address, got {target!r}")


def peer_of(target: Union[Client, socket.socket]) -> Optional[Address]:
    """The server address a connected client or socket talks to (None once it is closed)."""
    return _end(target, "address", "getpeername")


def local_of(target: Union[Client, socket.socket]) -> Optional[Address]:
    """The client's own address, which names the connection in a snapshot (None once it is closed)."""
    return _end(target, "local_address", "getsockname")


def _end(target: Union[Client, socket.socket], attribute: str, query: str) -> Optional[Address]:
    if isinstance(target, Client):
        return getattr(target, attribute)
    try:
        return getattr(target, query)()[:2]
    except OSError:
        return None


def _format(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        return format_address(value)  # a (host, port) address, as every message writes one
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)) and len(value) > _MAX_ITEMS:
        shown = ", ".join(_format(v) for v in value[:_MAX_ITEMS])
        return f"[{shown}, ... {len(value)} in all]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return repr(value)


def describe(name: str, **params: Any) -> str:
    """``slowloris count=30 partial=5 ...``: the fault and its parameters, None-valued ones left out."""
    shown = " ".join(f"{key}={_format(value)}" for key, value in params.items() if value is not None)
    return f"{name} {shown}" if shown else name


def record(cluster: Optional[Cluster], name: str, address: Optional[Address] = None,
           log: logging.Logger = logger, **params: Any) -> str:
    """Write one injection down: the cluster's events (when there is a cluster) and an INFO line; return it.

    ``address`` names the server in the log line when there is no cluster
    to name it.
    """
    text = describe(name, **params)
    where = cluster.name if cluster is not None else format_address(address)
    log.info("%s: %s", where, text)
    if cluster is not None:
        # Cluster's own recorder, so faults and the cluster's verbs share one time line.
        cluster._record(text)
    return text
