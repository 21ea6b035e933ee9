"""A fault on the server's processes that needs clients in a precise state: a worker killed during handoff.

``kill_during_handoff`` pauses a worker, opens clients until the master has
handed it connections it cannot acknowledge, then SIGKILLs it: every one of
those clients should still be answered by another worker.  Plain process
faults (kill, pause, resume a worker; kill the master) are ``Cluster``
methods and are not repeated here.  It needs a ``Cluster`` (the server's
processes, not just its address); it is one call whose ``HandoffKill`` is a
context manager closing the clients, and it records itself (see ``_record``)
besides the pause and kill the cluster records.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any, Dict, List, Optional, Tuple, Union

from fdcluster_server import protocol

from .. import observe
from ..client import Client, ClientError
from ..cluster import Cluster, ClusterError, WorkerRef
from ..polling import POLL_INTERVAL
from ..sockets import Address
from ..text import format_address
from ._connect import MAX_CONNECTIONS, FaultError, check_count
from ._record import logger, record

Answer = Tuple[int, Union[dict, BaseException]]


class HandoffKill:
    """The outcome of ``kill_during_handoff``: the clients caught in the kill, and how to hear from them.

    ``clients[i]`` sent ``ping`` with ``params[i]`` while its socket was handed
    to the frozen worker and not acknowledged; ``bystanders`` are connections
    opened on the way that went to live workers (answered already, left open
    so the handoff order stays as observed).  Close it, or use it as a context
    manager, to close them all.
    """

    def __init__(self, cluster: Cluster, frozen_pid: int, frozen_index: Optional[int],
                 redistributed_before: Optional[int]) -> None:
        self.cluster = cluster
        self.frozen_pid = frozen_pid
        #: The reference server's index of the frozen worker; None for other targets.
        self.frozen_index = frozen_index
        #: The master's ``redistributed`` counter before the fault (reference server only).
        self.redistributed_before = redistributed_before
        self.clients: List[Client] = []
        self.params: List[Any] = []
        self.bystanders: List[Client] = []
        #: Whether the frozen worker's hold on ``clients`` was confirmed by the server's counters.
        self.confirmed_by_stats = False

    def __enter__(self) -> HandoffKill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<HandoffKill pid={self.frozen_pid} clients={len(self.clients)} bystanders={len(self.bystanders)}>"

    def answers(self, timeout: float = 5.0) -> List[Answer]:
        """Each client's response, or the exception raised waiting for it: ``[(index, response or error)]``.

        One deadline of ``timeout`` seconds covers every client.
        """
        deadline = time.monotonic() + timeout
        found: List[Answer] = []
        for index, client in enumerate(self.clients):
            try:
                # A short floor, so an answer already waiting is still read after the deadline.
                found.append((index, client.recv_frame(max(0.05, deadline - time.monotonic()))))
            except (ClientError, OSError) as exc:
                found.append((index, exc))
        return found

    def close(self) -> None:
        """Close every client and bystander."""
        for client in self.clients + self.bystanders:
            client.close()


def _is_readable(client: Client) -> bool:
    readable, _, _ = select.select([client], [], [], 0)
    return bool(readable)


def _holders(snap: observe.Snapshot, address: Address) -> Optional[str]:
    """'worker' if a non-master process holds the client's server side, 'master' if only it does."""
    owner = snap.owner_of(address)
    if owner is None:
        return None
    return "master" if owner.pid == snap.master_pid else "worker"


def _ping_client(cluster: Cluster, number: int, nonce: str, timeout: float) -> Tuple[Client, Any]:
    client = Client(cluster.address, timeout=timeout)
    params = {"handoff": number, "nonce": nonce}
    try:
        client.send_raw(protocol.request("ping", params))
    except BaseException:
        client.close()
        raise
    return client, params


def kill_during_handoff(cluster: Cluster, worker: WorkerRef = 0, connections: int = 4,
                        timeout: float = 5.0) -> HandoffKill:
    """SIGKILL a worker while ``connections`` connections handed to it are not yet acknowledged.

    The worker is paused (SIGSTOP), so it cannot acknowledge; clients each
    send a ``ping`` with distinct params until the frozen worker has been
    handed ``connections`` of them.  On the reference server its counters
    confirm it (the worker's ``unacked``; this needs at most the server's
    handoff window, 4 by default).  On other targets, ``connections`` clients
    are opened, the kernel must show each held by a process of the target,
    and the master's descriptor count must stop changing.  Then the worker
    is SIGKILLed; every client should still get its answer (``answers``).

    Raises ``FaultError`` (the worker resumed, every client closed) if that
    state is not reached within ``timeout`` seconds.
    """
    check_count(connections, "connections")
    stats = cluster.stats()
    pid = cluster.worker_pid(worker)
    index: Optional[int] = None
    redistributed: Optional[int] = None
    if stats is not None:
        index = next((w["index"] for w in stats["workers"] if w.get("pid") == pid), None)
        redistributed = stats["master"].get("redistributed")
    labels = cluster.labels()
    record(cluster, "kill_during_handoff", worker=pid, connections=connections, timeout=timeout)
    cluster.pause_worker(pid)
    kill = HandoffKill(cluster, pid, index, redistributed)
    deadline = time.monotonic() + timeout
    try:
        if index is not None:
            _hand_to_frozen_reference(cluster, kill, connections, deadline, timeout, labels)
        else:
            _hand_to_frozen_generic(cluster, kill, connections, deadline, timeout, labels)
        cluster.kill_worker(pid)
        cluster.paused.discard(pid)  # dead now: never SIGCONT a recycled pid at teardown
        logger.info("%s: killed worker pid %d holding %d unacknowledged connections (%d bystanders)",
                    cluster.name, pid, len(kill.clients), len(kill.bystanders))
    except BaseException:
        kill.close()
        if pid in cluster.paused:
            try:
                cluster.resume_worker(pid)
            except ClusterError:
                pass  # it died on its own; the error below says what was not reached
        raise
    return kill


def _snapshot(cluster: Cluster, labels: Dict[int, str]) -> observe.Snapshot:
    # Not cluster.snapshot(): its labels come from the server's stats, which
    # wait a full second for the paused worker's counters.
    return observe.snapshot(cluster.master, labels)


def _wait_held(cluster: Cluster, client: Client, deadline: float, timeout: float,
               labels: Dict[int, str]) -> str:
    """Poll until a process of the target holds ``client``'s server side; 'master' or 'worker'."""
    while True:
        if _is_readable(client):
            return "worker"  # answered (or closed): a live worker has it
        held = _holders(_snapshot(cluster, labels), client.local_address)
        if held is not None:
            return held
        if time.monotonic() >= deadline:
            raise FaultError(f"kill_during_handoff: no process of {cluster.name} took connection "
                             f"{format_address(client.local_address)} within {timeout:g} s")
        time.sleep(POLL_INTERVAL)


def _hand_to_frozen_reference(cluster: Cluster, kill: HandoffKill, connections: int, deadline: float,
                              timeout: float, labels: Dict[int, str]) -> None:
    """Open clients until the server's counters show ``connections`` unacknowledged at the frozen worker."""
    nonce = f"{os.getpid()}-{time.monotonic_ns()}"
    # Round-robin or least-connections hands the frozen worker about one in
    # every N connections; far more than that means it is not taking any more.
    most = min(MAX_CONNECTIONS, connections * (len(cluster.workers) + 1) * 4)
    opened = 0
    candidates: List[Tuple[Client, Any]] = []
    while True:
        # Clients the master alone holds may be frozen, or just not handed yet;
        # a frozen one is never held by a worker, so this never overshoots.
        while len(candidates) < connections:
            if time.monotonic() >= deadline or opened >= most:
                raise FaultError(f"kill_during_handoff: only {len(candidates)} of {connections} connections went "
                                 f"to the frozen worker after {opened} clients and {timeout:g} s "
                                 "(is the server's handoff window smaller than connections?)")
            client, params = _ping_client(cluster, opened, nonce, timeout)
            opened += 1
            if _wait_held(cluster, client, deadline, timeout, labels) == "master":
                candidates.append((client, params))
            else:
                kill.bystanders.append(client)
        frozen = _settled_unacked(cluster, kill.frozen_index, deadline, timeout)
        snap = _snapshot(cluster, labels)
        still: List[Tuple[Client, Any]] = []
        for client, params in candidates:
            if _is_readable(client) or _holders(snap, client.local_address) == "worker":
                kill.bystanders.append(client)
            else:
                still.append((client, params))
        candidates = still
        if frozen == len(candidates) == connections:
            break
        if frozen > connections:
            raise FaultError(f"kill_during_handoff: the frozen worker holds {frozen} unacknowledged connections, "
                             f"more than the {connections} asked for (other clients are connecting)")
        if time.monotonic() >= deadline:
            raise FaultError(f"kill_during_handoff: the frozen worker holds {frozen} of {connections} "
                             f"unacknowledged connections after {timeout:g} s and {opened} clients "
                             "(is the server's handoff window smaller than connections?)")
    kill.clients = [client for client, _ in candidates]
    kill.params = [params for _, params in candidates]
    kill.confirmed_by_stats = True


def _settled_unacked(cluster: Cluster, index: Optional[int], deadline: float, timeout: float) -> int:
    """The frozen worker's unacknowledged handoffs, once nothing is pending and live workers have acked."""
    while True:
        stats = cluster.stats()
        if stats is None:
            raise FaultError("kill_during_handoff: the server stopped answering stats")
        frozen = next((w for w in stats["workers"] if w["index"] == index), None)
        live_unacked = sum(w.get("unacked", 0) for w in stats["workers"] if w["index"] != index)
        if frozen is not None and stats["master"]["pending"] == 0 and live_unacked == 0:
            return int(frozen.get("unacked", 0))
        if time.monotonic() >= deadline:
            raise FaultError(f"kill_during_handoff: handoffs did not settle within {timeout:g} s "
                             f"(pending {stats['master']['pending']}, live workers' unacked {live_unacked})")


def _hand_to_frozen_generic(cluster: Cluster, kill: HandoffKill, connections: int, deadline: float,
                            timeout: float, labels: Dict[int, str]) -> None:
    """Open ``connections`` clients; wait until each is held and the master's fd count is steady."""
    nonce = f"{os.getpid()}-{time.monotonic_ns()}"
    for number in range(connections):
        client, params = _ping_client(cluster, number, nonce, timeout)
        kill.clients.append(client)
        kill.params.append(params)
    addresses = [client.local_address for client in kill.clients]
    steady_needed = 3  # consecutive snapshots with the same master fd count
    steady, last = 0, -1
    while True:
        snap = _snapshot(cluster, labels)
        master = snap.master
        if master is None:
            raise FaultError(f"kill_during_handoff: the master of {cluster.name} is gone")
        if all(snap.owner_of(address) is not None for address in addresses):
            steady = steady + 1 if master.fd_count == last else 1
            last = master.fd_count
            if steady >= steady_needed:
                return
        else:
            steady, last = 0, -1
        if time.monotonic() >= deadline:
            held = sum(1 for address in addresses if snap.owner_of(address) is not None)
            raise FaultError(f"kill_during_handoff: {held} of {connections} connections held by {cluster.name}, "
                             f"master fd count not steady, after {timeout:g} s")
        time.sleep(POLL_INTERVAL)
