"""Every process judged, every path: after any fault, the idle cluster holds what it held at the start.

Invariant checked (every process judged, 6).  Each test starts its own
cluster, serves a few connections on every worker (descriptors a process
opens lazily on its first client belong to its idle state, not to a leak),
lets it go idle and records each process's descriptor counts by kind: the
first generation's baseline.  Then one fault, on an error path:

- a worker SIGKILLed with clients connected, and its replacement;
- a worker killed with handoffs in flight (``faults.kill_during_handoff``);
- handoffs a worker cannot take: its RLIMIT_NOFILE lowered from outside to
  its lowest free descriptor number, so a descriptor passed to it is
  discarded by the kernel and the handoff must be rejected or go elsewhere;
- an oversize frame, a malformed frame, a frame cut off by the client's close;
- a connection storm and an RST storm.

Then the clients leave, every worker serves again (so a replacement reaches
the same idle state as the worker it replaced), and once idle nothing may be
left in the master or in any worker: no client socket (CLOSE_WAIT included),
and no kind of descriptor above the baseline of the same slot.  A process
that appeared during the test is judged against the first-generation worker
it replaced: the reference server's label names the slot; otherwise the test
knows which pid it killed.  Fewer descriptors than the baseline is no leak.
"""

from __future__ import annotations

import struct
import time

import pytest

from pytest_fdcluster import ClientError, ClusterError, faults, process_alive, protocol, resources, wait_until

ANSWER_TIMEOUT = 5.0
RESPAWN_TIMEOUT = 10.0
IDLE_TIMEOUT = 3.0
STORM = 200
STORM_CONCURRENCY = 50
MALFORMED = b'{"in": "ping", "params": '  # a whole frame whose JSON ends too soon


def serve_every_worker(cluster):
    """Two connections per worker, each answered once, then closed: every worker serves on a round-robin target."""
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(2 * len(cluster.workers))]
    try:
        for number, client in enumerate(clients):
            assert client.call("ping", number) == number, f"every process judged: ping {number} not echoed"
    finally:
        for client in clients:
            client.close()


def client_sockets(cluster):
    return cluster.snapshot().client_sockets


class Generations:
    """The first generation's descriptor counts by kind, and which first-generation process each newer one replaced."""

    def __init__(self, cluster):
        self.cluster = cluster
        serve_every_worker(cluster)
        try:
            wait_until(lambda: not client_sockets(cluster), IDLE_TIMEOUT, lambda: "the warmed-up cluster to go idle")
        except ClusterError as exc:
            pytest.fail(f"every process judged: no idle baseline: {exc}; "
                        f"held: {describe_held(client_sockets(cluster))}")
        snap = cluster.snapshot()
        self.views = dict(snap.processes)
        #: pid of a newer process -> pid of the first-generation process of its slot
        self.origin = {}

    def replaced(self, victims):
        """Wait until ``victims`` are replaced (on a target that respawns), and note which slot each newcomer fills."""
        if not self.cluster.capabilities.respawns:
            wait_until(lambda: not any(process_alive(pid) for pid in victims), RESPAWN_TIMEOUT,
                       lambda: f"killed workers {victims} to exit")
            return
        try:
            workers = self.cluster.wait_for_workers(timeout=RESPAWN_TIMEOUT, gone=victims)
        except ClusterError as exc:
            pytest.fail(f"every process judged: killed workers {victims} were not replaced: {exc}")
        known = set(self.views) | set(self.origin)
        newcomers = [pid for pid in workers if pid not in known]
        labels = self.cluster.labels()
        free = [self.first(pid) for pid in victims]
        # The reference server labels a worker by its slot; elsewhere labels follow age, so the rest pair in order.
        for pid in list(newcomers):
            same_slot = [root for root in free if self.views[root].label == labels.get(pid)]
            if same_slot:
                self.origin[pid] = same_slot[0]
                free.remove(same_slot[0])
                newcomers.remove(pid)
        for pid, root in zip(newcomers, free):
            self.origin[pid] = root

    def first(self, pid):
        return self.origin.get(pid, pid)

    def baseline_of(self, view):
        """(the first-generation view judging ``view``, how to name that in a message)."""
        root = self.first(view.pid)
        if root in self.views:
            return self.views[root], "" if root == view.pid else f", replacing {self.views[root]}"
        # Appeared without a kill of ours (a worker died on its own): judged as any first-generation worker.
        first_worker = next(v for pid, v in self.views.items() if pid != self.cluster.master)
        return first_worker, f", which appeared unasked, judged by {first_worker}"

    def leftovers(self):
        """One line per process holding a client socket or more descriptors of a kind than its baseline."""
        lines = []
        for view in self.cluster.snapshot().processes.values():
            base, replacing = self.baseline_of(view)
            name = f"{view}{replacing}"
            if view.tcp_connections:
                lines.append(f"{name} still holds {len(view.tcp_connections)} client sockets: "
                             + describe_held([(view, info) for info in view.tcp_connections]))
            extra = {kind: count - base.kinds.get(kind, 0) for kind, count in sorted(view.kinds.items())
                     if count > base.kinds.get(kind, 0)}
            if extra:
                lines.append(f"{name} holds " + ", ".join(f"{n} more {kind}" for kind, n in extra.items())
                             + f" than its slot's first generation at the baseline ({format_kinds(base.kinds)}; "
                             f"now {format_kinds(view.kinds)})")
        return lines

    def judge(self, fault):
        """every process judged: once the clients left and every worker served again, nothing is left over."""
        assert self.cluster.target.alive(), f"every process judged: the master died after {fault}"
        serve_every_worker(self.cluster)
        try:
            wait_until(lambda: not self.leftovers(), IDLE_TIMEOUT, lambda: f"the cluster to go idle after {fault}")
        except ClusterError:
            pass  # named below
        lines = self.leftovers()
        assert not lines, f"every process judged: {IDLE_TIMEOUT:g} s after {fault}, idle: " + "; ".join(lines)


def describe_held(held):
    text = ", ".join(f"{view.label} pid {view.pid} fd {info}" for view, info in held[:6])
    return text + (f" and {len(held) - 6} more" if len(held) > 6 else "")


def format_kinds(kinds):
    return " ".join(f"{kind}={count}" for kind, count in sorted(kinds.items()))


def open_clients(cluster, count, tag):
    """``count`` connections, each with one ping sent and not yet read."""
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(count)]
    for number, client in enumerate(clients):
        client.send_frame({"in": "ping", "params": {tag: number}})
    return clients


def read_all(clients, timeout):
    """Read one answer (or the end) from each client within one shared deadline; what came does not matter here."""
    deadline = time.monotonic() + timeout
    for client in clients:
        try:
            client.recv_frame(max(0.05, deadline - time.monotonic()))
        except (ClientError, OSError):
            pass  # judged by the modules that own answers; here only what is left behind counts


def close_all(clients):
    for client in clients:
        client.close()


def test_respawned_worker_holds_what_its_predecessor_held(fdcluster):
    generations = Generations(fdcluster)
    clients = open_clients(fdcluster, 2 * len(fdcluster.workers), "respawn")
    try:
        read_all(clients, ANSWER_TIMEOUT)
        victim = fdcluster.kill_worker(0)
        generations.replaced([victim])
    finally:
        close_all(clients)
    generations.judge(f"SIGKILL of worker pid {victim} with clients connected, and its replacement")


def test_worker_killed_with_handoffs_in_flight(fdcluster):
    generations = Generations(fdcluster)
    with faults.kill_during_handoff(fdcluster, worker=0, connections=2) as kill:
        kill.answers(ANSWER_TIMEOUT)
        generations.replaced([kill.frozen_pid])
    generations.judge(f"worker pid {kill.frozen_pid} killed with {len(kill.clients)} handoffs unacknowledged")


def test_handoffs_a_worker_cannot_take(fdcluster):
    generations = Generations(fdcluster)
    worker = fdcluster.workers[0]
    clients = []
    try:
        try:
            lowest = resources.lowest_free_fd(worker)
            with resources.nofile_limit(worker, lowest):
                clients = open_clients(fdcluster, 4 * len(fdcluster.workers), "limited")
                read_all(clients, ANSWER_TIMEOUT)
        except resources.Unobservable as exc:
            pytest.fail(f"every process judged: cannot put worker pid {worker} at its descriptor limit: {exc}")
    finally:
        close_all(clients)
    generations.judge(f"{len(clients)} connections while worker pid {worker} was at RLIMIT_NOFILE {lowest} "
                      "(handoffs to it rejected or sent elsewhere)")


def bad_frames(cluster):
    """name -> bytes a client sends before it reads the answer (or the end) and closes."""
    too_long = cluster.capabilities.max_frame + 1
    return {
        "oversize frame": struct.pack("<I", too_long) + b"{" * 64,
        "malformed frame": struct.pack("<I", len(MALFORMED)) + MALFORMED,
        "truncated frame": protocol.request("ping", "cut")[:-3],
    }


@pytest.mark.parametrize("name", ["oversize frame", "malformed frame", "truncated frame"])
def test_bad_frames_leave_nothing(fdcluster, name):
    generations = Generations(fdcluster)
    data = bad_frames(fdcluster)[name]
    for _ in range(2 * len(fdcluster.workers)):
        if name == "truncated frame":
            faults.truncate_and_close(fdcluster, data, keep=len(data))
            continue
        with fdcluster.client(ANSWER_TIMEOUT) as client:
            client.send_raw(data)
            read_all([client], ANSWER_TIMEOUT)
    generations.judge(f"{2 * len(fdcluster.workers)} connections each sending a {name}")


@pytest.mark.parametrize("storm", [faults.ConnectionStorm, faults.RstStorm], ids=["connection storm", "RST storm"])
def test_storms_leave_nothing(fdcluster, storm):
    generations = Generations(fdcluster)
    result = storm(fdcluster, STORM, concurrency=STORM_CONCURRENCY, timeout=ANSWER_TIMEOUT).run()
    generations.judge(f"a {storm.__name__} of {STORM} connections ({result})")
