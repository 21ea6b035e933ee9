"""A payload that paces the load generator's clients, for latency measured below saturation.

``run_load`` computes a request's params before it starts that request's
clock, so a payload that sleeps until the request is due turns the closed
loop into a paced one without counting the wait as latency.  Each client
sends at ``rate / clients`` requests per second, clients offset evenly.

A request that is late because the previous one was slow is timed from when
it is sent, not from when it was due (coordinated omission): at the rates
used here, well below saturation, the difference stays in the tail's noise.
"""

from __future__ import annotations

import time
from typing import Dict


class Paced:
    """``payload(i) -> i``, returned when request ``i`` is due; picklable for spawned load processes."""

    def __init__(self, rate: float, clients: int) -> None:
        if rate <= 0 or clients < 1:
            raise ValueError(f"need a positive rate and at least one client, got {rate!r}, {clients!r}")
        self.interval = clients / rate  # seconds between two requests of one client
        self.clients = clients
        self._starts: Dict[int, float] = {}

    def __call__(self, i: int) -> int:
        # run_load numbers requests client + clients * k, k counting each client's requests.
        client, k = i % self.clients, i // self.clients
        start = self._starts.get(client)
        if start is None:
            start = self._starts[client] = time.monotonic() + self.interval * client / self.clients
        delay = start + k * self.interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return i
