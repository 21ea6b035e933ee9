"""The processes a benchmark measures: starting them, their CPU time and memory, stopping them.

Clusters (the reference server, the Node.js cluster) start through the
plugin's own ``ClusterFactory``, so they are torn down the way a test's are.
The baseline servers of this package run as plain child processes that print
their port; ``baseline_server`` kills and reaps them whatever happens.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import psutil

from pytest_fdcluster import guard
from pytest_fdcluster.cluster import Cluster, ClusterFactory
from pytest_fdcluster.settings import ClusterSettings, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_SCRIPT = os.path.join(REPO, "tests", "targets", "node_cluster_server.js")
HOST = "127.0.0.1"
BASELINE_START_TIMEOUT = 15.0

Address = Tuple[str, int]

#: Command-line fragments of helper processes that exit with this one.
LIFETIME_HELPERS = (os.path.abspath(guard.__file__), "pytest_fdcluster.guard", "multiprocessing.resource_tracker")


# -- what a process costs ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used, user plus system, over all its threads.

    From ``/proc/PID/task/*/schedstat`` (nanoseconds) where it exists, since
    ``/proc/PID/stat`` counts in clock ticks of 10 ms; psutil elsewhere.
    """
    total = 0
    found = False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as stat:
                total += int(stat.read().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that just exited
    if found:
        return total / 1e9
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run_queue_seconds(pid: int) -> Tuple[float, int]:
    """(seconds ``pid``'s threads spent runnable but waiting for a CPU, times they were scheduled in).

    The second and third fields of ``/proc/PID/task/*/schedstat``; (nan, 0)
    where the kernel does not provide them.
    """
    waited, slices, found = 0, 0, False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as stat:
                fields = stat.read().split()
            waited += int(fields[1])
            slices += int(fields[2])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return (waited / 1e9, slices) if found else (float("nan"), 0)


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    return psutil.Process(pid).memory_info().rss


def children_cpu_seconds() -> float:
    """CPU time of this process's reaped children (the load generator's processes), user plus system."""
    times = os.times()
    return times.children_user + times.children_system


def own_cpu_seconds() -> float:
    """CPU time of this process (the load generator's threads when it runs in-process)."""
    times = os.times()
    return times.user + times.system


# -- clusters -----------------------------------------------------------------------------------


def no_setting(name: str) -> None:
    """A settings lookup that finds nothing: no command line, no ini (the benchmark's settings are explicit)."""
    return None


def reference_settings(workers: int, strategy: str = "round-robin", **server: Any) -> ClusterSettings:
    """Settings for the reference server, resolved the way the plugin resolves a marker's."""
    return resolve(dict(workers=workers, strategy=strategy, **server), no_setting, no_setting)


def node_settings(workers: int) -> Optional[ClusterSettings]:
    """Settings for the Node.js cluster target, or None when ``node`` is not installed."""
    node = shutil.which("node")
    if node is None or not os.path.exists(NODE_SCRIPT):
        return None
    command = [node, NODE_SCRIPT, "--port", "{port}", "--workers", "{workers}", "--host", "{host}"]
    # The primary accepts before its workers have registered: wait for the ready line it prints then.
    return resolve({"workers": workers, "server": command, "ready_line": True}, no_setting, no_setting)


def other_checkout_settings(workers: int, server_dir: str, strategy: str = "round-robin") -> ClusterSettings:
    """Settings for the reference server imported from ``server_dir`` (another checkout's ``server/``).

    How a change is measured against the code it replaces in one run: the same
    interpreter, ``PYTHONPATH`` pointing at the other copy of ``fdcluster_server``.
    """
    package = os.path.join(server_dir, "fdcluster_server", "__main__.py")
    if not os.path.exists(package):
        raise FileNotFoundError(f"{server_dir} holds no fdcluster_server package ({package} is missing)")
    command = ["env", f"PYTHONPATH={os.path.abspath(server_dir)}", sys.executable, "-m", "fdcluster_server",
               "--host", "{host}", "--port", "{port}", "--workers", "{workers}", "--strategy", strategy]
    return resolve({"workers": workers, "server": command, "ready_line": True}, no_setting, no_setting)


@contextlib.contextmanager
def cluster(settings: ClusterSettings, name: str) -> Iterator[Cluster]:
    """A running cluster, stopped (every process killed, port freed) on the way out."""
    factory = ClusterFactory(settings)
    try:
        yield factory.start(name=name)
    finally:
        factory.close()


# -- baseline servers of this package ----------------------------------------------------------


@contextlib.contextmanager
def baseline_server(module: str, *args: str) -> Iterator[Tuple[subprocess.Popen, Address]]:
    """Run ``python -m benchmarks.MODULE``, which prints its port on its first line; kill it at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{module}", "--host", HOST, *args],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _first_line(proc, BASELINE_START_TIMEOUT)
        if not line.startswith("port "):
            raise RuntimeError(f"benchmarks.{module} did not start: {line!r}; stderr: {_stderr(proc)!r}")
        yield proc, (HOST, int(line.split()[1]))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return f"(no output within {timeout:g} s)"
    return proc.stdout.readline().strip()


def _stderr(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.kill()
    try:
        return proc.stderr.read()[-500:]
    except (OSError, ValueError):
        return ""


# -- leftovers ------------------------------------------------------------------------------------


def live_descendants() -> List[psutil.Process]:
    """Processes this one started (directly or not) that are still running.

    Helpers that live as long as this process, by design, and exit with it
    are not counted: the plugin's orphan guard and multiprocessing's
    resource tracker (started by the load generator's processes).
    """
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            command = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(helper in command for helper in LIFETIME_HELPERS):
            continue
        alive.append(proc)
    return alive


def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until truthy; its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def median(values: List[float]) -> float:
    """The median of measured values (nan when there are none)."""
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def describe(values: List[float], scale: float = 1.0, digits: int = 1) -> List[float]:
    """Measured values, rounded for the JSON's details."""
    return [round(v * scale, digits) for v in values]


Details = Dict[str, Any]
