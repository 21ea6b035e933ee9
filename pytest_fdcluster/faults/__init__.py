"""Client-side fault injectors: each fault is one call, composed in a user's own tests.

Like the rules of a Hypothesis state machine, a fault here is a single call a
test makes between its invariant checks: split a frame, stall a connection,
never read, reset, storm, or kill a worker while connections handed to it are
still unacknowledged.  Faults on the server's processes themselves (kill,
pause, resume a worker; kill the master) are ``Cluster`` methods and are not
repeated here.

One shape for all of them.  Each takes a ``Cluster`` (or a plain
``(host, port)``; those that misbehave on the test's own connection take a
``Client`` or socket, with ``cluster=`` to record in).  Each is one call,
and those that leave something open are also context managers: entering
injects the fault, exiting undoes it (closes the sockets), even when the test
body raised, so several compose in one ``contextlib.ExitStack``.  Each
records itself: one line with its parameters in the cluster's events (shown
under "fdcluster: to replay" when a test fails) and at INFO on the
``fdcluster.faults`` logger; a plain address is only logged.

Every injector is bounded in how many sockets it opens and how long it runs.
Framing comes from ``fdcluster_server.protocol``; these modules only
misbehave with the bytes, and judge answers by their JSON value.  No pytest
import.

One module per family: ``frames`` (split frames, ending a connection badly),
``slow_clients`` (slowloris, the client that never reads), ``storms``
(connection and RST storms), ``process_faults`` (a worker killed during
handoff), ``misbehaviours`` (what one connection of a load run does wrong);
``_connect`` opens many sockets at once for them, ``_record`` writes every
injection down.
"""

from __future__ import annotations

from ..sockets import Address as Address
from ._connect import MAX_CONNECTIONS as MAX_CONNECTIONS
from ._connect import FaultError
from ._record import Target as Target
from .frames import MAX_PIECES as MAX_PIECES
from .frames import SockOrClient as SockOrClient
from .frames import (
    byte_by_byte,
    half_close_request,
    rst_close,
    send_in_pieces,
    split_frame,
    truncate_and_close,
)
from .misbehaviours import MISBEHAVIOURS as MISBEHAVIOURS
from .misbehaviours import choose_misbehaving
from .process_faults import Answer as Answer
from .process_faults import HandoffKill, kill_during_handoff
from .slow_clients import Slowloris, SlowReader
from .storms import ConnectionStorm, RstStorm, StormResult

__all__ = [
    "ConnectionStorm",
    "FaultError",
    "HandoffKill",
    "RstStorm",
    "SlowReader",
    "Slowloris",
    "StormResult",
    "byte_by_byte",
    "choose_misbehaving",
    "half_close_request",
    "kill_during_handoff",
    "rst_close",
    "send_in_pieces",
    "split_frame",
    "truncate_and_close",
]
