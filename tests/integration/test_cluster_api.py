"""The Cluster verbs and checks hold no traps: killed workers are gone, resume undoes pause, no check passes blind.

Real clusters of the reference server (the ``fdcluster`` fixture) and real
processes.  The blind checks run in an observer process that is really
blind: it runs as ``nobody`` (with ``setpriv``) against a cluster run by
root, so the kernel refuses it /proc/PID/fd of every process of the target.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from fdcluster_server import protocol
from pytest_fdcluster import ClusterError, ObservationError, ObservationSkipped, faults, process_alive, wait_until
from pytest_fdcluster.observe import BLIND_FAILED, BLIND_OPTION

REPO_ROOT = Path(__file__).resolve().parents[2]
STUBBORN = REPO_ROOT / "tests" / "plugin" / "stubborn_target.py"

#: Bound on every wait for the cluster to react.
DEADLINE = 10.0

def stubborn(*extra: str) -> str:
    """A shared-accept target whose workers ignore SIGTERM and whose master exits 0 on it."""
    return shlex.join([sys.executable, str(STUBBORN), "{port}", "{workers}", "--term-exit", "0", *extra])


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="a real blind observer needs root (to run a cluster another user cannot read) and setpriv (util-linux)",
)


def is_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


class TestKillWorker:
    @pytest.mark.fdcluster(workers=2)
    def test_the_users_first_test(self, fdcluster):
        victim = fdcluster.kill_worker(0)
        fdcluster.wait_for_workers(2)
        assert victim not in fdcluster.workers

    @pytest.mark.fdcluster(workers=2)
    def test_it_returns_once_the_worker_is_dead(self, fdcluster):
        victim = fdcluster.kill_worker(1)
        assert not process_alive(victim), f"worker pid {victim} still runs after kill_worker returned"
        assert victim not in fdcluster.workers
        replacements = fdcluster.wait_for_workers(2, timeout=DEADLINE)
        assert victim not in replacements and len(replacements) == 2

    @pytest.mark.fdcluster(workers=2)
    def test_an_unreaped_zombie_is_dead_and_not_listed(self, fdcluster):
        # A stopped master cannot reap: the killed worker stays a zombie until it is continued.
        os.kill(fdcluster.master, signal.SIGSTOP)
        try:
            victim = fdcluster.kill_worker(0)
            assert psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
            assert victim not in fdcluster.workers
            assert len(fdcluster.workers) == 1
        finally:
            os.kill(fdcluster.master, signal.SIGCONT)
        assert victim not in fdcluster.wait_for_workers(2, timeout=DEADLINE)

    @pytest.mark.fdcluster(workers=2)
    def test_a_paused_worker_dies_of_sigterm(self, fdcluster):
        victim = fdcluster.pause_worker(0)
        assert fdcluster.kill_worker(victim, signal.SIGTERM) == victim
        assert not process_alive(victim) and victim not in fdcluster.paused

    @pytest.mark.fdcluster(server=stubborn("--drain", "0.5"), workers=2)
    def test_a_draining_worker_is_waited_for(self, fdcluster):
        # It runs on for half a second after SIGTERM: listed and alive all that time, were it not waited for.
        victim = fdcluster.kill_worker(0, signal.SIGTERM)
        assert not process_alive(victim), f"worker pid {victim} still runs after kill_worker returned"
        assert victim not in fdcluster.workers and len(fdcluster.workers) == 1

    @pytest.mark.fdcluster(server=stubborn("--drain", "0.5"), workers=2)
    def test_without_waiting_a_draining_worker_is_no_longer_listed(self, fdcluster):
        victim = fdcluster.kill_worker(0, signal.SIGTERM, wait=False)
        assert process_alive(victim), "the worker should still be draining right after SIGTERM"
        assert victim not in fdcluster.workers and len(fdcluster.workers) == 1

    @pytest.mark.fdcluster(server=stubborn(), workers=1)
    def test_a_worker_that_survives_the_signal_is_named(self, fdcluster):
        (survivor,) = fdcluster.workers
        with pytest.raises(ClusterError, match=rf"worker pid {survivor} of cluster 1 to die after SIGTERM"):
            fdcluster.kill_worker(0, signal.SIGTERM, timeout=0.3)
        assert fdcluster.workers == [survivor], "a worker that did not die is still listed"

    @pytest.mark.fdcluster(workers=2)
    def test_gone_still_names_workers_killed_by_others(self, fdcluster):
        victim = fdcluster.workers[0]
        os.kill(victim, signal.SIGKILL)
        assert victim not in fdcluster.wait_for_workers(2, timeout=DEADLINE, gone=[victim])


class TestResume:
    @pytest.mark.fdcluster(workers=3)
    def test_without_an_argument_every_paused_worker_resumes(self, fdcluster):
        first, second = fdcluster.pause_worker(0), fdcluster.pause_worker(2)
        assert sorted(fdcluster.resume_worker()) == sorted([first, second])
        wait_until(lambda: not is_stopped(first) and not is_stopped(second), DEADLINE,
                   lambda: f"workers {first} and {second} to run again")
        assert not fdcluster.paused
        assert fdcluster.resume_worker() == []

    @pytest.mark.fdcluster(workers=2)
    def test_a_paused_worker_that_died_is_skipped(self, fdcluster):
        paused = fdcluster.pause_worker(0)
        os.kill(paused, signal.SIGKILL)
        wait_until(lambda: not process_alive(paused), DEADLINE, lambda: f"pid {paused} to die")
        assert fdcluster.resume_worker() == []


class TestClient:
    @pytest.mark.fdcluster(workers=1)
    def test_a_fault_on_its_client_is_recorded_in_the_clusters_events(self, fdcluster):
        frame = protocol.request("ping", "split")
        with fdcluster.client() as client:
            assert client.cluster is fdcluster, "Cluster.client() names its cluster on the client"
            faults.send_in_pieces(client, frame, 3)  # no cluster=: the client's own is where it is recorded
            reply = client.recv_frame()
        assert reply == {"out": "pong", "result": "split"}, f"the split ping was answered: {reply!r}"
        recorded = [what for _, what in fdcluster.events]
        assert any(what.startswith("send_in_pieces ") for what in recorded), \
            f"send_in_pieces on fdcluster.client() recorded in {fdcluster.name}'s events: {recorded}"


#: Run as nobody: observe the cluster whose master pid is argv[1] and report what each judgement did.
BLIND_OBSERVER = r'''
import json, sys
from types import SimpleNamespace

import psutil

from pytest_fdcluster import checks, cluster, observe, proctree

master, host, port, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
observe.BLIND = mode
client = (host, port)
snap = observe.snapshot(master)
target = SimpleNamespace(master_pid=master, control=None, alive=lambda: True,
                         descendants=lambda: proctree.live_oldest_first(psutil.Process(master).children()))
view = cluster.Cluster(target, SimpleNamespace(workers=2))
judgements = {
    "fds": lambda: list(snap.master.fds),
    "fd_count": lambda: snap.master.fd_count,
    "tcp_connections": lambda: snap.workers[0].tcp_connections,
    "diff": lambda: str(snap - snap),
    "assert_no_fd_leak": lambda: checks.assert_no_fd_leak(snap, snap),
    "assert_no_close_wait": lambda: checks.assert_no_close_wait(snap),
    "assert_master_holds_no_clients": lambda: checks.assert_master_holds_no_clients(snap),
    "Snapshot.owner_of": lambda: snap.owner_of(client),
    "Cluster.owner_of": lambda: view.owner_of(client),
    "Cluster.connections_per_worker": lambda: view.connections_per_worker([client]),
}
report = {"unreadable": [[p.pid, p.label, p.user] for p in snap.unreadable], "judged": {}}
for name, judge in judgements.items():
    try:
        report["judged"][name] = ["passed", repr(judge())]
    except BaseException as exc:
        report["judged"][name] = [type(exc).__name__, str(exc), type(exc).__module__]
print(json.dumps(report))
'''


def observe_as_nobody(master: int, client: tuple, mode: str) -> Dict[str, object]:
    """What the blind observer saw and did, run as nobody in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HOME="/tmp")
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            sys.executable, "-c", BLIND_OBSERVER, str(master), client[0], str(client[1]), mode]
    done = subprocess.run(argv, cwd="/tmp", env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the blind observer failed:\n{done.stderr}"
    return json.loads(done.stdout)


@needs_root
class TestBlindChecks:
    @pytest.mark.fdcluster(workers=2)
    def test_every_judgement_of_an_unreadable_process_fails(self, fdcluster):
        with fdcluster.client() as client:
            client.call("ping")
            report = observe_as_nobody(fdcluster.master, client.local_address, "fail")
        pids = [fdcluster.master, *fdcluster.workers]
        assert sorted(pid for pid, _, _ in report["unreadable"]) == sorted(pids)
        assert {user for _, _, user in report["unreadable"]} == {"root"}
        master_message = BLIND_FAILED.format(process="master", pid=fdcluster.master, user="root",
                                             reason=f"PermissionError reading /proc/{fdcluster.master}/fd",
                                             option=BLIND_OPTION)
        judged: Dict[str, List[str]] = report["judged"]  # type: ignore[assignment]
        assert judged["fds"][:2] == [ObservationError.__name__, master_message]
        for name, outcome in judged.items():
            assert outcome[0] == ObservationError.__name__, f"{name} judged a process it could not see: {outcome}"
            assert "cannot see the descriptors of " in outcome[1] and "user root" in outcome[1], outcome
            assert f"opt out with {BLIND_OPTION} skip" in outcome[1], outcome

    @pytest.mark.fdcluster(workers=1)
    def test_a_user_who_opts_out_gets_a_skip_never_a_pass(self, fdcluster):
        with fdcluster.client() as client:
            client.call("ping")
            report = observe_as_nobody(fdcluster.master, client.local_address, "skip")
        judged: Dict[str, List[str]] = report["judged"]  # type: ignore[assignment]
        for name, outcome in judged.items():
            assert outcome[0] == ObservationSkipped.__name__, f"{name} did not skip: {outcome}"
            assert f"{BLIND_OPTION} is skip" in outcome[1], outcome

    def test_root_sees_everything(self, fdcluster):
        snap = fdcluster.snapshot()
        assert snap.unreadable == []
        assert snap.master.fd_count > 0
