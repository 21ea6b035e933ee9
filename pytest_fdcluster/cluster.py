"""A running cluster as a test sees it: address, processes, clients, faults on workers.

``Cluster`` wraps a ``RunningTarget`` with the verbs a test uses (``call``,
``kill_worker``, ``pause_worker``, ``wait_for_workers``, ``snapshot``) and
records what happened to it for the report.  ``ClusterFactory`` starts any
number of clusters and stops them all, and raises ``GracefulStopError`` once
they are stopped if a master did not stop gracefully on SIGTERM.

Faults injected here are logged (INFO) on the ``fdcluster.cluster`` logger, a
child of ``fdcluster``, together with each cluster's start and stop.  No
pytest import: the plugin's fixtures are thin wrappers over these.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union, overload

import psutil

from . import observe
from .capabilities import Capabilities
from .client import Client, ClientError
from .polling import ClusterError, wait_until
from .settings import ClusterSettings
from .stopping import describe_stop
from .target import RunningTarget, StopResult, TargetSpec, start_target

WorkerRef = Union[int, str]

DEFAULT_CALL_TIMEOUT = 5.0

#: How long ``kill_worker`` waits for the signalled worker to be dead (a zombie counts).
KILL_TIMEOUT = 10.0

log = logging.getLogger("fdcluster.cluster")


class GracefulStopError(ClusterError):
    """A master did not stop gracefully on SIGTERM: SIGKILLed after the grace period, or a non-zero exit.

    Raised by ``ClusterFactory.close`` once every cluster is stopped; ``failures`` pairs each such
    cluster with its ``StopResult``.
    """

    def __init__(self, failures: List[Tuple[Cluster, StopResult]]) -> None:
        super().__init__("\n".join(f"{cluster.name}: {result.graceful_failure}" for cluster, result in failures))
        self.failures = failures


class Cluster:
    """One running target: the master, its workers, and what a test does to them."""

    def __init__(self, target: RunningTarget, settings: ClusterSettings, name: str = "fdcluster") -> None:
        self.target = target
        self.settings = settings
        self.name = name
        self.paused: Set[int] = set()
        #: pid -> create time of every worker this cluster killed: never listed as a worker again.
        self.killed: Dict[int, float] = {}
        self.events: List[Tuple[float, str]] = []  # (seconds since start, what) for replay and reports
        self.started = time.monotonic()
        self.ready_seconds = 0.0
        self.stop_result: Optional[StopResult] = None
        self.baseline: Optional[observe.Snapshot] = None
        self.final: Optional[observe.Snapshot] = None
        self.final_stats: Optional[Dict[str, Any]] = None
        self._labels: Optional[Dict[int, str]] = None

    def __repr__(self) -> str:
        return f"<Cluster {self.name} master={self.master} workers={self.workers}>"

    # -- where and who --------------------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) clients connect to."""
        return self.target.address

    @property
    def master(self) -> int:
        """The master's pid."""
        return self.target.master_pid

    @property
    def workers(self) -> List[int]:
        """Pids of the live workers, oldest first.

        Never a dead process (a zombie the master has not reaped yet is dead) nor
        one this cluster killed, even while the kernel is still tearing it down.
        """
        return [proc.pid for proc in self.target.descendants() if not self._killed_by_us(proc)]

    def _killed_by_us(self, proc: psutil.Process) -> bool:
        # By create time too: a recycled pid is a new worker, not the one we killed.
        created = self.killed.get(proc.pid)
        if created is None:
            return False
        try:
            return proc.create_time() == created
        except psutil.Error:
            return True  # gone meanwhile

    @property
    def is_reference(self) -> bool:
        return self.settings.is_reference

    @property
    def capabilities(self) -> Capabilities:
        """What the target has, as declared (the reference server's: as started); see ``capabilities.require``."""
        return self.settings.capabilities

    def labels(self) -> Dict[int, str]:
        """pid -> 'master' / 'worker N': the reference server's own indexes, else by age.

        Cached until the set of live workers changes, so observing stays cheap.
        """
        workers = self.workers
        if self._labels is not None and set(workers) <= set(self._labels):
            return dict(self._labels)
        labels = {self.master: observe.MASTER}
        table = self._control("workers") if self.target.control else None
        if table:
            for worker in table:
                labels[worker["pid"]] = observe.worker_label(worker["index"])
        if not table or not set(workers) <= set(labels):
            labels = {self.master: observe.MASTER}
            for index, pid in enumerate(workers):
                labels[pid] = observe.worker_label(index)
        self._labels = labels
        return dict(labels)

    def worker_pid(self, worker: WorkerRef) -> int:
        """A worker's pid from its pid, its index among live workers, or its label ('worker 1')."""
        __tracebackhide__ = True
        workers = self.workers
        if isinstance(worker, str):
            by_label = {label: pid for pid, label in self.labels().items()}
            if worker not in by_label:
                raise ClusterError(f"no {worker!r} in {self.name}: live workers are {sorted(by_label)}")
            return by_label[worker]
        if worker in workers:
            return worker
        if 0 <= worker < len(workers):
            return workers[worker]
        raise ClusterError(f"{worker} is neither a worker pid nor an index of {self.name}'s live workers {workers}")

    # -- talking to it ----------------------------------------------------------------

    def client(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> Client:
        """A connected protocol client; use it as a context manager.

        Its ``cluster`` is this cluster, so a fault done on the client is recorded in ``events``.
        """
        client = Client(self.address, timeout=timeout)
        client.cluster = self
        return client

    def call(self, method: str, params: Any = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """One request on a fresh connection; returns the result, raises ``RemoteError`` on an error frame."""
        with self.client(timeout) as client:
            return client.call(method, params)

    def stats(self) -> Optional[Dict[str, Any]]:
        """The reference server's own counters (None for targets without a control socket)."""
        return self._control("stats")

    def _control(self, method: str) -> Any:
        address = self.target.control
        if not address:
            return None
        try:
            with Client(address, timeout=DEFAULT_CALL_TIMEOUT) as client:
                client.send_frame({"in": method, "params": None})
                # Half-close and read to EOF: the master closes its end before we return,
                # so observing the cluster never sees our own control connection.
                client.shutdown_write()
                response = client.recv_frame()
                client.expect_eof()
        except (ClientError, OSError):
            return None  # the master is gone or stopping: counters are a bonus, not a requirement
        return response.get("result") if isinstance(response, dict) else None

    # -- observing it -------------------------------------------------------------------

    def snapshot(self) -> observe.Snapshot:
        """Every fd of every process of the cluster, labelled master / worker N.

        One pass over the process tree with the cached labels; the labels are
        refreshed (and the tree read again) only when a process is new to them.
        Judging a process whose descriptors were unreadable raises
        ``ObservationError`` (see ``observe``); the settings' ``blind_checks``, if
        any, says whether to skip instead.
        """
        blind = getattr(self.settings, "blind_checks", None)
        cached = self._labels
        if cached is not None:
            snap = observe.snapshot(self.master, cached, blind)
            if set(snap.processes) <= set(cached):
                return snap
        return observe.snapshot(self.master, self.labels(), blind)

    def owner_of(self, client: Union[Client, socket.socket, Tuple[str, int]]) -> Optional[str]:
        """Label of the process serving ``client`` ('worker 1'), seen from outside; None if nobody holds it.

        Raises ``ObservationError`` if a process's descriptors cannot be read: nobody is not an answer then.
        """
        __tracebackhide__ = True
        view = self.snapshot().owner_of(_local_address(client))
        return view.label if view else None

    def connections_per_worker(
        self, clients: Sequence[Union[Client, socket.socket, Tuple[str, int]]]
    ) -> Dict[str, int]:
        """How many of ``clients`` each worker holds (every live worker listed, zeros included)."""
        __tracebackhide__ = True
        return self.snapshot().connections_per_process([_local_address(c) for c in clients])

    # -- faults on workers ------------------------------------------------------------------

    def kill_worker(self, worker: WorkerRef = 0, sig: int = signal.SIGKILL, timeout: float = KILL_TIMEOUT,
                    wait: bool = True) -> int:
        """Send ``sig`` (SIGKILL by default) to one worker and return its pid once it is dead.

        Dead includes a zombie its master has not reaped yet.  From then on the
        pid is never listed in ``workers``, so ``wait_for_workers(n)`` waits for
        its replacement.  Raises ``ClusterError`` if it is still alive after
        ``timeout`` seconds (a worker that handles ``sig`` and keeps running).
        A paused worker is continued after ``sig`` (it could not act on it
        otherwise).  ``wait=False`` returns at once, for a SIGTERM whose drain
        needs the test's clients to keep reading; the worker is still never
        listed again.
        """
        __tracebackhide__ = True
        pid = self.worker_pid(worker)
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            created = 0.0
        name = signal.Signals(sig).name
        self._signal(pid, sig)
        if pid in self.paused and sig not in (signal.SIGKILL, signal.SIGCONT):
            # A stopped process acts on no other signal until it is continued.
            self._signal(pid, signal.SIGCONT)
        self._record(f"{name} worker pid {pid}")
        log.info("%s: %s worker pid %d", self.name, name, pid)
        if wait:  # a worker that survives the signal stays listed: the error says so
            wait_until(lambda: not process_alive(pid), timeout,
                       lambda: f"worker pid {pid} of {self.name} to die after {name}; it is still {_status(pid)}")
        self.paused.discard(pid)
        self.killed[pid] = created
        return pid

    def pause_worker(self, worker: WorkerRef = 0) -> int:
        """SIGSTOP one worker and wait until the kernel shows it stopped; returns its pid."""
        __tracebackhide__ = True
        pid = self.worker_pid(worker)
        self._signal(pid, signal.SIGSTOP)
        self.paused.add(pid)
        self._record(f"SIGSTOP worker pid {pid}")
        log.info("%s: SIGSTOP worker pid %d (paused)", self.name, pid)
        wait_until(lambda: _status(pid) in (psutil.STATUS_STOPPED, None), 5.0, lambda: f"worker pid {pid} to stop")
        return pid

    @overload
    def resume_worker(self) -> List[int]: ...

    @overload
    def resume_worker(self, worker: WorkerRef) -> int: ...

    def resume_worker(self, worker: Optional[WorkerRef] = None) -> Union[int, List[int]]:
        """SIGCONT a paused worker and return its pid; with no argument, every worker ``pause_worker`` paused.

        ``resume_worker()`` resumes all of them, not only the last one, and
        returns their pids (oldest pause first); a paused worker that died
        meanwhile is skipped.
        """
        __tracebackhide__ = True
        if worker is None:
            resumed = []
            for pid in list(self.paused):
                if not process_alive(pid):  # died while paused (a zombie not yet reaped included)
                    self.paused.discard(pid)
                    continue
                try:
                    resumed.append(self._resume(pid))
                except ClusterError:
                    self.paused.discard(pid)  # reaped between the look and the signal
            return resumed
        # A paused worker is looked up by pid as given: it may no longer count as live.
        pid = worker if isinstance(worker, int) and worker in self.paused else self.worker_pid(worker)
        return self._resume(pid)

    def _resume(self, pid: int) -> int:
        __tracebackhide__ = True
        self._signal(pid, signal.SIGCONT)
        self.paused.discard(pid)
        self._record(f"SIGCONT worker pid {pid}")
        log.info("%s: SIGCONT worker pid %d (resumed)", self.name, pid)
        return pid

    def kill_master(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the master; returns its pid.

        The teardown then does not judge the master's exit: the test chose it.
        """
        __tracebackhide__ = True
        name = signal.Signals(sig).name
        self._signal(self.master, sig)
        self.target.signalled_by_test.append(name)
        self._record(f"{name} master pid {self.master}")
        log.info("%s: %s master pid %d", self.name, name, self.master)
        return self.master

    def wait_for_workers(self, n: Optional[int] = None, timeout: float = 10.0, gone: Sequence[int] = ()) -> List[int]:
        """Wait until exactly ``n`` workers (default: as configured) are alive; returns their pids.

        Workers this cluster killed never count (see ``workers``); ``gone``
        names more pids that must not be among them, e.g. workers killed by
        someone else.
        """
        __tracebackhide__ = True
        n = self.settings.workers if n is None else n

        def settled() -> Optional[List[int]]:
            workers = self.workers
            return workers if len(workers) == n and not set(gone) & set(workers) else None

        return wait_until(settled, timeout, lambda: (
            f"{n} live workers in {self.name}" + (f" without {list(gone)}" if gone else "")
            + f"; live now: {self.workers}" + ("" if self.target.alive() else "; the master is dead")))

    # -- the end ------------------------------------------------------------------------

    def stop(self) -> StopResult:
        """Resume paused workers, SIGTERM, grace, SIGKILL the rest; idempotent."""
        if self.stop_result is not None:
            return self.stop_result
        for pid in list(self.paused):
            try:
                psutil.Process(pid).resume()
            except psutil.Error:
                pass  # it died while paused
        self.paused.clear()
        if self.target.alive():
            try:
                self.final_stats = self.stats()
                self.final = _seen_whole(self.snapshot())
            except Exception:  # observation must never stop a teardown
                self.final = None
        result = self.stop_result = self.target.stop()
        self._record("stopped")
        log.info("%s: stopped in %.3f s: %s", self.name, result.seconds, describe_stop(result))
        return result

    def _signal(self, pid: int, sig: int) -> None:
        __tracebackhide__ = True
        try:
            psutil.Process(pid).send_signal(sig)
        except psutil.NoSuchProcess:
            raise ClusterError(f"cannot send {signal.Signals(sig).name} to pid {pid}: it is not running") from None

    def _record(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.started, 3), what))


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    status = _status(pid)
    return status is not None and status != psutil.STATUS_ZOMBIE


def _status(pid: int) -> Optional[str]:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return None


def _seen_whole(snap: observe.Snapshot) -> Optional[observe.Snapshot]:
    """``snap`` if every process's descriptors were readable; reports never show counts of what was not seen."""
    return None if snap.unreadable else snap


def _local_address(client: Union[Client, socket.socket, Tuple[str, int]]) -> Tuple[str, int]:
    if isinstance(client, tuple):
        return client
    if isinstance(client, Client):
        return client.local_address
    return client.getsockname()[:2]


class ClusterFactory:
    """Starts clusters and stops every one of them at ``close``."""

    def __init__(self, default: ClusterSettings) -> None:
        self.default = default
        self.clusters: List[Cluster] = []

    def start(self, settings: Optional[ClusterSettings] = None, name: Optional[str] = None) -> Cluster:
        """Start one cluster and wait until it is ready; raises ``TargetStartupError`` if it is not."""
        settings = settings or self.default
        spec = TargetSpec(command=list(settings.command), workers=settings.workers,
                          startup_timeout=settings.startup_timeout, grace=settings.grace,
                          ready_line=settings.ready_line)
        began = time.monotonic()
        target = start_target(spec)
        cluster = Cluster(target, settings, name or f"cluster {len(self.clusters) + 1}")
        cluster.ready_seconds = time.monotonic() - began
        self.clusters.append(cluster)
        log.info("%s started: master pid %d, workers %s, %s:%d, ready in %.3f s", cluster.name, cluster.master,
                 cluster.workers, *cluster.address, cluster.ready_seconds)
        try:
            cluster.baseline = _seen_whole(cluster.snapshot())
        except Exception:
            cluster.baseline = None
        return cluster

    def close(self) -> List[Tuple[Cluster, StopResult]]:
        """Stop every cluster (newest first); returns what each stop found.

        Every cluster is stopped even if stopping one raises; then the first
        such error is re-raised, or else ``GracefulStopError`` if a master did
        not stop gracefully on SIGTERM (see ``StopResult.graceful_failure``).
        """
        __tracebackhide__ = True
        results = []
        first_error: Optional[BaseException] = None
        for cluster in reversed(self.clusters):
            try:
                results.append((cluster, cluster.stop()))
            except BaseException as exc:  # stop the others anyway, then say what went wrong
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        failures = [(cluster, result) for cluster, result in results if result.graceful_failure]
        if failures:
            raise GracefulStopError(failures)
        return results


def scm_rights_unavailable() -> Optional[str]:
    """Why fd passing cannot be tested here, or None when it can."""
    if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "SCM_RIGHTS"):
        return f"SCM_RIGHTS descriptor passing is not available on {sys.platform}"
    return None
