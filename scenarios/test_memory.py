"""Bounded memory: what clients send does not pile up in the server.

Invariant checked (bounded memory): a client that pipelines requests and
never reads its responses, a pipelining flood from a client that does read,
and 500 idle connections: the resident memory (RSS) of the master and of
every worker grows by at most ``max(FLOOR, sent / DIVISOR)`` over its own
baseline taken in the same test (after a warm-up, so lazily allocated memory
is not counted), where ``sent`` is what the clients wrote.  RSS is sampled
from outside (psutil) throughout each fault and the peak is judged.

The bound: a server that stops reading a connection whose responses back up
holds at most its own buffers for it, however much the client tries to send;
one that reads everything and buffers the responses grows by about ``sent``
(the responses echo the requests).  The never-reading client tries 32 MiB,
twice ``FLOOR``.  Measured on the reference server (2 cores, loaded): the
client gets 11 MiB into the kernel's buffers and the worker grows by 4.1 MiB
(its 4 MiB high-water mark); with the high-water mark removed it takes all
32 MiB and grows by 29 MiB.  500 idle connections cost it 0.1 MiB, the Node
target 6 MiB.  The flood is judged by its rate instead: a runtime with a
garbage collector peaks with uncollected garbage (the Node target: 25 MiB
after 32 MiB, 28 MiB after 96 MiB), so after a first 32 MiB the next 64 MiB
may add at most ``1 / DIVISOR`` of themselves.
"""

from __future__ import annotations

import selectors
import socket
import time

import pytest

from pytest_fdcluster import ClusterError, faults, protocol, resources, wait_until

MIB = 1 << 20
FLOOR = 16 * MIB
DIVISOR = 4
PAYLOAD = 64 * 1024
#: Requests each fault pipelines: 512 x 64 KiB = 32 MiB, twice the floor.
REQUESTS = 512
FAULT_TIMEOUT = 10.0
SAMPLE_EVERY = 0.02
#: A never-reading client whose sends make no progress this long has been stopped by the server.
STALLED = 1.0
SETTLE = 5.0


def cluster_pids(cluster):
    return [cluster.master] + list(cluster.workers)


class RssPeaks:
    """The highest RSS seen of each process of the cluster, sampled from outside."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.labels = cluster.labels()
        self.pids = cluster_pids(cluster)
        self.baseline = self.sample()
        self.peak = dict(self.baseline)
        self._last = time.monotonic()

    def sample(self):
        try:
            return {pid: resources.rss(pid) for pid in self.pids}
        except resources.Unobservable as exc:
            pytest.fail(f"bounded memory: cannot read the cluster's memory: {exc}")

    def update(self, force=False):
        """Sample again, at most every ``SAMPLE_EVERY`` seconds unless forced."""
        now = time.monotonic()
        if not force and now - self._last < SAMPLE_EVERY:
            return
        self._last = now
        for pid, value in self.sample().items():
            self.peak[pid] = max(self.peak[pid], value)

    def assert_bounded(self, sent, what):
        """bounded memory: every process's peak growth under the bound for ``sent`` bytes."""
        self.update(force=True)
        bound = max(FLOOR, sent // DIVISOR)
        over = [f"{self.labels.get(pid, 'process')} pid {pid} grew by {(self.peak[pid] - base) / MIB:.1f} MiB "
                f"(from {base / MIB:.1f} MiB)" for pid, base in self.baseline.items()
                if self.peak[pid] - base > bound]
        assert not over, (f"bounded memory: with {what}, {sent / MIB:.1f} MiB sent: " + "; ".join(over)
                          + f" (bound {bound / MIB:.0f} MiB)")


def warm_up(cluster):
    """One large ping on a fresh connection per worker: first-use allocations are not growth."""
    for _ in range(2 * len(cluster.workers)):
        assert cluster.call("ping", "w" * PAYLOAD) == "w" * PAYLOAD


def test_never_reading_client(fdcluster):
    warm_up(fdcluster)
    peaks = RssPeaks(fdcluster)
    with faults.SlowReader(fdcluster.address, requests=REQUESTS, payload_size=PAYLOAD,
                           timeout=FAULT_TIMEOUT) as reader:
        deadline = time.monotonic() + FAULT_TIMEOUT
        progress = time.monotonic()
        while reader.requests_sent < REQUESTS and time.monotonic() < deadline:
            before = reader.bytes_written
            reader.fill(timeout=0.2, stall=0.2)
            peaks.update()
            if reader.bytes_written > before:
                progress = time.monotonic()
            elif time.monotonic() - progress > STALLED:
                break  # the server stopped reading it for good: what a bounded server does
        # Whatever the server read is processed by now, or it is still reading: sample a little longer.
        watch_until = time.monotonic() + 0.3
        while time.monotonic() < watch_until:
            peaks.update()
            time.sleep(SAMPLE_EVERY)  # sampling pace, not synchronisation
        peaks.assert_bounded(reader.bytes_written, f"a client that pipelined {reader.requests_sent} "
                                                   f"pings of {PAYLOAD // 1024} KiB and never read")


class Flood:
    """One connection that pipelines pings of ``payload`` bytes, 16 per send, while it reads every answer."""

    def __init__(self, cluster, peaks, payload=PAYLOAD):
        self.peaks = peaks
        self.out = memoryview(protocol.request("ping", "f" * payload) * 16)
        self.decoder = protocol.FrameDecoder(4 * protocol.DEFAULT_MAX_FRAME)
        self.sock = socket.create_connection(cluster.address, timeout=FAULT_TIMEOUT)
        self.sock.setblocking(False)
        self.sent = self.answered = self.expected = 0

    def close(self):
        self.sock.close()

    def run(self, requests):
        """Pipeline ``requests`` more pings (rounded up to 16) and read until all are answered or time is up."""
        batches, offset = (requests + 15) // 16, 0
        self.expected += batches * 16
        deadline = time.monotonic() + FAULT_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while self.answered < self.expected and time.monotonic() < deadline:
                for _, mask in selector.select(0.1):
                    if mask & selectors.EVENT_WRITE:
                        offset = self._send(offset)
                        if offset == len(self.out):
                            offset, batches = 0, batches - 1
                            if not batches:
                                selector.modify(self.sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ and not self._receive():
                        return  # the server closed: judged by the answered count
                self.peaks.update()

    def _send(self, offset):
        try:
            count = self.sock.send(self.out[offset:])
        except (BlockingIOError, InterruptedError):
            return offset
        self.sent += count
        return offset + count

    def _receive(self):
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return True
        self.answered += len(self.decoder.feed(data))
        return bool(data)


def test_pipelining_flood_on_a_reading_client(fdcluster):
    """The peak may include a runtime's garbage not yet collected; what must not grow is the rate."""
    warm_up(fdcluster)
    peaks = RssPeaks(fdcluster)
    flood = Flood(fdcluster, peaks)
    try:
        flood.run(REQUESTS)
        first_sent, first_peak = flood.sent, dict(peaks.peak)
        flood.run(2 * REQUESTS)
    finally:
        flood.close()
    assert flood.answered == flood.expected, (
        f"bounded memory: a reading client's pipelined flood got {flood.answered} of {flood.expected} answers "
        f"within {FAULT_TIMEOUT:g} s per phase")
    peaks.update(force=True)
    sent = flood.sent - first_sent
    bound = sent // DIVISOR
    over = [f"{peaks.labels.get(pid, 'process')} pid {pid} grew by {(peaks.peak[pid] - first_peak[pid]) / MIB:.1f} MiB"
            f" more (by {(first_peak[pid] - base) / MIB:.1f} MiB over the first {first_sent / MIB:.0f} MiB)"
            for pid, base in peaks.baseline.items() if peaks.peak[pid] - first_peak[pid] > bound]
    assert not over, (f"bounded memory: a reading client pipelined {sent / MIB:.0f} MiB more of "
                      f"{PAYLOAD // 1024} KiB pings: " + "; ".join(over) + f" (bound {bound / MIB:.0f} MiB)")


def test_idle_connections(fdcluster):
    warm_up(fdcluster)
    peaks = RssPeaks(fdcluster)
    with faults.Slowloris(fdcluster.address, count=500, partial=0) as idle:
        try:
            wait_until(lambda: not resources.not_held_by_one_worker(fdcluster.snapshot(), idle.local_addresses),
                       SETTLE, lambda: "500 idle connections to be held by the workers")
        except (ClusterError, resources.Unobservable) as exc:
            pytest.fail(f"bounded memory: the fault could not be set up: {exc}")
        peaks.assert_bounded(0, "500 idle connections")
