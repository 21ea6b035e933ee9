"""Which worker served a connection, seen from outside while the connection is still open.

The load generator's clients register each connection's local address; a
background thread takes one snapshot of the target (``observe.snapshot``)
per batch of registrations and names the process holding each one.  A
client waits for that verdict before it closes the connection, so the
kernel still shows the server side when the snapshot is taken.  No pytest
import.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

from . import observe
from .sockets import Address

__all__ = ["OBSERVE_TIMEOUT", "ConnectionOwners"]

#: How long a closing connection waits for the observer to place it before it counts as unowned.
OBSERVE_TIMEOUT = 5.0


class ConnectionOwners:
    """Places connections on workers: a thread takes a snapshot after each batch of registrations.

    A connection registers while open and, before closing, waits for the
    verdict of a snapshot taken after it registered.
    """

    def __init__(self, master_pid: int, labels: Dict[int, str]) -> None:
        self.master_pid = master_pid
        self.labels = dict(labels)
        self._cond = threading.Condition()
        self._pending: List[Tuple[int, Address]] = []
        self._verdicts: Dict[int, str] = {}
        self._next = 0
        self._stopped = False
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="fdcluster-load-observer", daemon=True)
        self._thread.start()

    def register(self, address: Address) -> int:
        """Ask where the open connection with local ``address`` is held; returns the ticket for ``verdict``."""
        with self._cond:
            self._next += 1
            self._pending.append((self._next, address))
            self._cond.notify_all()
            return self._next

    def verdict(self, ticket: int, timeout: float = OBSERVE_TIMEOUT) -> str:
        """The label of the process that held ``ticket``'s connection; ``observe.UNOWNED`` if none or too late."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while ticket not in self._verdicts:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped:
                    return observe.UNOWNED
                self._cond.wait(remaining)
            return self._verdicts.pop(ticket)

    def _label(self, view: Optional[observe.ProcessView]) -> str:
        if view is None:
            return observe.UNOWNED
        # A worker respawned during the run is not among the labels taken at the start.
        return self.labels.get(view.pid) or f"worker pid {view.pid}"

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    batch, self._pending = self._pending, []
                snap = observe.snapshot(self.master_pid, self.labels)
                verdicts = {ticket: self._label(snap.owner_of(address)) for ticket, address in batch}
                with self._cond:
                    self._verdicts.update(verdicts)
                    self._cond.notify_all()
        except BaseException as exc:  # re-raised by run_load in the caller's thread
            self.error = exc
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def stop(self) -> None:
        """End the thread; verdicts still awaited come back unowned."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(OBSERVE_TIMEOUT)
