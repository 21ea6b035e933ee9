"""At most one log line a second for an event that repeats, with a count of the ones not logged.

A client storm, a peer refused over and over, accept() out of descriptors:
each would otherwise write a line per occurrence and fill the target's
stderr.  ``RateLimit`` decides which occurrence gets a line and counts the
rest; ``RateLimitedLog`` is the usual way to use it.  Used by the master's
acceptor, the shared-accept worker (``acceptor.AcceptBackoff``) and the
control socket.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

LOG_INTERVAL = 1.0  # at most one line per kind of repeated event in this many seconds


class RateLimit:
    """Lets one occurrence of an event through per ``interval`` seconds; counts those in between."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0  # the first occurrence always gets its line
        self.suppressed = 0

    def admit(self, now: float) -> Optional[int]:
        """None if the occurrence at ``now`` is only counted; else how many were counted since the last line."""
        if now < self.next_at:
            self.suppressed += 1
            return None  # a line went out less than ``interval`` ago: counted in the next one
        skipped, self.suppressed = self.suppressed, 0
        self.next_at = now + self.interval
        return skipped


class RateLimitedLog:
    """One log line per ``LOG_INTERVAL`` for a repeated event; the ones in between are counted."""

    def __init__(self, logger: logging.Logger, level: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.level, self.clock = logger, level, clock
        self.limit = RateLimit()

    def __call__(self, message: str, *args: Any) -> None:
        skipped = self.limit.admit(self.clock())
        if skipped is None:
            return
        if skipped:
            message += f" ({skipped} more since the last such line)"
        self.logger.log(self.level, message, *args)
