"""Bounded polls: the one way this package waits for observed state.

Never a bare sleep as synchronisation: every wait names what it waits for,
polls at ``POLL_INTERVAL`` and gives up at a deadline with a message.
"""

from __future__ import annotations

import time
from typing import Any, Callable

POLL_INTERVAL = 0.005


class ClusterError(AssertionError):
    """A cluster did not reach the state a test waited for; the message says which and why."""


def wait_until(predicate: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise ``ClusterError`` after ``timeout``."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout:g} s waiting for {describe()}")
        time.sleep(POLL_INTERVAL)
