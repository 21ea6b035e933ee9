"""Integration tests of target start-up and teardown, with real processes and sockets.

Targets: a small Python prefork server (tests/support/prefork_target.py; its
options switch on misbehaviours such as ignoring SIGTERM or abandoning its
workers) and the Node.js cluster server under tests/targets/.  Every process
a test sees is recorded and killed at teardown, whatever the test's outcome.
"""

from __future__ import annotations

import fnmatch
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Sequence

import psutil
import pytest

from fdcluster_server import protocol
from pytest_fdcluster import guard, guard_client, proctree, target, wait_until
from pytest_fdcluster.client import Client
from pytest_fdcluster.target import RunningTarget, TargetSpec, TargetStartupError, start_target

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPPORT = REPO_ROOT / "tests" / "support"
# tests/support is a folder of scripts and helpers, not a package: it goes on the path to be imported.
sys.path.insert(0, str(SUPPORT))
import reaping  # noqa: E402
from reaping import is_live  # noqa: E402

needs_node = pytest.mark.skipif(
    shutil.which("node") is None,
    reason="node (Node.js) is not installed; the non-Python target test needs it",
)
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the orphan guard's session scan is Linux-only"
)

NODE_SERVER = REPO_ROOT / "tests" / "targets" / "node_cluster_server.js"
PREFORK_TARGET = SUPPORT / "prefork_target.py"
PYTHONPATH = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "server")])

#: Bound on every wait for observed state in these tests.
DEADLINE = 5.0

# Stands in for a pytest process that starts a target and is then SIGKILLed.
DRIVER = r'''
import json, sys
from pytest_fdcluster import guard_client, target

spec = target.TargetSpec(json.loads(sys.argv[1]), workers=int(sys.argv[2]))
running = target.start_target(spec)
print(json.dumps({"master": running.master_pid, "workers": running.worker_pids(),
                  "guard": guard_client.link.pid}), flush=True)
sys.stdin.read()
'''


# -- helpers ----------------------------------------------------------------------


def pid_gone(pid: int) -> bool:
    """Whether ``pid`` no longer names a live process."""
    try:
        return not is_live(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


def session_of_two(sid: int) -> List[int]:
    """The session's pids once it has both processes of a forked sleeper, else []."""
    pids = proctree.session_pids([sid])
    return pids if len(pids) == 2 else []


def live(procs: Iterable[psutil.Process]) -> List[int]:
    """The pids of ``procs`` still alive."""
    return [proc.pid for proc in procs if is_live(proc)]


def port_refuses(port: int) -> bool:
    """Whether a connect() to 127.0.0.1:``port`` is refused."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def match_lines(text: str, patterns: Sequence[str]) -> None:
    """Assert ``text`` has lines matching ``patterns`` (fnmatch), consecutively and in order."""
    lines = text.splitlines()
    for start in range(len(lines) - len(patterns) + 1):
        if all(fnmatch.fnmatch(line, pattern) for line, pattern in zip(lines[start:], patterns)):
            return
    pytest.fail("message does not match\n--- message:\n" + text + "\n--- patterns:\n" + "\n".join(patterns))


class Reaper(reaping.Reaper):
    """The shared reaper, which also stops every target the test started, before it kills what is left."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: List[RunningTarget] = []

    def start(self, spec: TargetSpec) -> RunningTarget:
        """``start_target``, remembering the target and its processes."""
        running = start_target(spec)
        self.targets.append(running)
        self.track(running.master_pid, *running.worker_pids())
        return running

    def close(self) -> None:
        for running in self.targets:
            running.stop(grace=0)
        super().close()


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """A ``Reaper`` that cleans up after the test, whatever its outcome."""
    with Reaper() as tracked:
        yield tracked


@pytest.fixture
def prefork() -> Callable[..., List[str]]:
    """Build a prefork target command: ``prefork("--ignore-term")``."""

    def command(*options: str, port: bool = True) -> List[str]:
        argv = [sys.executable, str(PREFORK_TARGET), "--workers", "{workers}"]
        if port:
            argv += ["--port", "{port}"]
        return argv + list(options)

    return command


def python_spec(command: Sequence[str], workers: int, **kwargs: Any) -> TargetSpec:
    """A spec for a Python target that can import ``fdcluster_server``."""
    return TargetSpec(command, workers=workers, env={"PYTHONPATH": PYTHONPATH}, **kwargs)


def node_spec(workers: int, **kwargs: Any) -> TargetSpec:
    """A spec for the Node.js cluster target.

    It waits for the primary's ready line: Node's port accepts as soon as one
    worker registers, and if that worker is the one a test kills, the port closes.
    """
    command = ["node", str(NODE_SERVER), "--port", "{port}", "--workers", "{workers}", "--host", "{host}"]
    kwargs.setdefault("ready_line", True)
    return TargetSpec(command, workers=workers, **kwargs)


# -- tests ---------------------------------------------------------------------------


class TestSpec:
    def test_placeholders_are_replaced_and_other_braces_survive(self) -> None:
        spec = TargetSpec(
            ["srv", "--listen={host}:{port}", "-w", "{workers}", '{"port": {port}, "x": {}}'], workers=3
        )
        assert spec.render(4242) == ["srv", "--listen=127.0.0.1:4242", "-w", "3", '{"port": 4242, "x": {}}']

    def test_string_command_is_split_like_a_shell_but_not_run_by_one(self) -> None:
        spec = TargetSpec("srv --name 'a b' $HOME {port}", workers=1)
        assert spec.render(1) == ["srv", "--name", "a b", "$HOME", "1"]
        assert spec.uses_port

    def test_without_port_placeholder_the_port_comes_from_the_readiness_line(self) -> None:
        assert not TargetSpec("srv --workers {workers}", workers=1).uses_port

    @pytest.mark.parametrize("field, value", [("workers", -1), ("startup_timeout", 0), ("command", "")])
    def test_invalid_spec_is_rejected(self, field: str, value: Any) -> None:
        kwargs = {"command": "srv", "workers": 1, field: value}
        with pytest.raises(ValueError, match=field):
            TargetSpec(**kwargs)


@needs_node
class TestNodeTarget:
    def test_start_serve_and_stop(self, reaper: Reaper) -> None:
        running = reaper.start(node_spec(workers=3))
        workers = running.worker_pids()
        assert len(workers) == 3
        assert running.ready_info["pid"] == running.master_pid
        assert running.control is None
        for i in range(6):
            with Client(running.address) as client:
                assert client.call("ping", {"i": i}) == {"i": i}
        seen = reaper.track(running.master_pid, *workers)

        result = running.stop()

        assert result.returncode == 0
        assert not result.needed_sigkill, result
        assert result.clean, result
        assert live(seen) == []
        assert port_refuses(running.port)

    def test_dead_worker_is_respawned(self, reaper: Reaper) -> None:
        running = reaper.start(node_spec(workers=2))
        victim = running.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in running.worker_pids() and len(running.worker_pids()) == 2,
            DEADLINE,
            lambda: "the node primary to replace its killed worker",
        )
        reaper.track(*running.worker_pids())
        with Client(running.address) as client:
            assert client.call("ping", "after respawn") == "after respawn"
        assert running.stop().clean

    def test_speaks_the_protocol(self, reaper: Reaper) -> None:
        running = reaper.start(node_spec(workers=2))
        with Client(running.address) as client:
            # Pipelined requests, delivered one byte at a time.
            for byte in protocol.request("ping", 1) + protocol.request("ping", {"two": [2]}):
                client.send_raw(bytes([byte]))
            assert client.recv_frame() == {"out": "pong", "result": 1}
            assert client.recv_frame() == {"out": "pong", "result": {"two": [2]}}
            client.send_raw(protocol.encode_body(b"{nope"))
            assert client.recv_frame()["out"] == "error"
            assert client.call("ping", "same connection") == "same connection"
        with Client(running.address) as client:
            client.send_raw(protocol.encode_body(b"{nope") + protocol.encode([1]) + protocol.request("nope"))
            answers = [client.recv_frame() for _ in range(3)]
            assert [answer["out"] for answer in answers] == ["error"] * 3
            assert answers[0]["result"].startswith("malformed JSON")
            assert answers[1]["result"] == "request must be a JSON object, got list"
            assert answers[2]["result"] == "unknown method 'nope'"
            assert client.call("ping", "still usable") == "still usable"
        with Client(running.address) as client:
            client.send_raw(struct.pack("<I", protocol.DEFAULT_MAX_FRAME + 1))
            assert client.recv_frame() == {
                "out": "error",
                "result": "frame of 1048577 bytes exceeds the maximum of 1048576 bytes",
            }
            assert client.expect_eof(DEADLINE) == "eof"

    def test_usage_error_is_reported(self, reaper: Reaper) -> None:
        spec = TargetSpec(
            ["node", str(NODE_SERVER), "--port", "{port}", "--workers", "{workers}", "--bogus"], workers=2
        )
        with pytest.raises(TargetStartupError) as info:
            reaper.start(spec)
        match_lines(
            str(info.value),
            [
                "fdcluster target failed to start: exited with status 2 after * s",
                f"  command: node {NODE_SERVER} --port * --workers 2 --bogus",
                "  waiting for: readiness (port * accepting, ping answered, 2 workers)",
                "  last stderr lines:",
                "    usage: node node_cluster_server.js *",
                "    error: unrecognized argument: --bogus",
            ],
        )


class TestReadiness:
    def test_waits_for_every_worker_even_when_ping_already_works(
        self, reaper: Reaper, prefork: Callable[..., List[str]]
    ) -> None:
        # The master answers pings itself at once but forks its workers only later.
        running = reaper.start(python_spec(prefork("--master-serves", "--worker-delay", "0.5"), workers=3))
        assert len(running.worker_pids()) >= 3

    def test_too_few_workers_times_out_with_the_count(self, reaper: Reaper, prefork: Callable[..., List[str]]) -> None:
        spec = python_spec(prefork("--fork", "1", "--master-serves"), workers=3, startup_timeout=1.0)
        with pytest.raises(TargetStartupError) as info:
            reaper.start(spec)
        match_lines(
            str(info.value),
            [
                "fdcluster target failed to start: did not become ready within 1.0 s: "
                "port accepting, ping answered, 1 of 3 workers present",
                "  command: * --workers 3 --port * --fork 1 --master-serves",
                "  waiting for: readiness (port * accepting, ping answered, 3 workers)",
            ],
        )

    def test_exit_during_startup_quotes_status_and_stderr(self, reaper: Reaper) -> None:
        script = (
            "import sys; sys.stderr.write('usage: srv --port N\\nerror: unrecognized arguments: --bogus\\n');"
            " sys.exit(2)"
        )
        spec = TargetSpec([sys.executable, "-c", script, "--port", "{port}", "--bogus"], workers=4)
        with pytest.raises(TargetStartupError) as info:
            reaper.start(spec)
        match_lines(
            str(info.value),
            [
                "fdcluster target failed to start: exited with status 2 after *.** s",
                f"  command: {sys.executable} -c * --port * --bogus",
                "  waiting for: readiness (port * accepting, ping answered, 4 workers)",
                "  last stderr lines:",
                "    usage: srv --port N",
                "    error: unrecognized arguments: --bogus",
            ],
        )
        assert info.value.returncode == 2
        assert not info.value.port_in_use

    def test_never_listening_times_out_and_is_killed(self, reaper: Reaper) -> None:
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "{port}"]
        spec = TargetSpec(sleeper, workers=2, startup_timeout=1.0)
        with pytest.raises(TargetStartupError) as info:
            reaper.start(spec)
        match_lines(
            str(info.value),
            [
                "fdcluster target failed to start: did not become ready within 1.0 s: "
                "port * not accepting, 0 of 2 workers present",
                "  command: *",
                "  waiting for: readiness (port * accepting, ping answered, 2 workers)",
                "  stderr: (nothing)",
            ],
        )
        assert info.value.master_pid is not None
        assert pid_gone(info.value.master_pid)

    def test_missing_readiness_line_times_out(self, reaper: Reaper) -> None:
        spec = TargetSpec([sys.executable, "-c", "import time; time.sleep(60)"], workers=1, startup_timeout=0.5)
        with pytest.raises(TargetStartupError, match="did not become ready within 0.5 s: no fdcluster-ready line"):
            reaper.start(spec)

    def test_missing_executable_is_a_startup_error(self, reaper: Reaper) -> None:
        with pytest.raises(TargetStartupError, match="cannot run it"):
            reaper.start(TargetSpec(["/nonexistent/fdcluster-server", "{port}"], workers=1))

    def test_readiness_line_gives_port_and_control(self, reaper: Reaper, prefork: Callable[..., List[str]]) -> None:
        running = reaper.start(python_spec(prefork("--port", "0", "--ready-line", port=False), workers=2))
        assert running.ready_info is not None
        assert running.address == ("127.0.0.1", running.ready_info["port"])
        assert running.control == "@prefork-test"
        assert running.ready_info["pid"] == running.master_pid
        assert sorted(running.ready_info["workers"]) == sorted(running.worker_pids())
        with Client(running.address) as client:
            assert client.call("ping", "hi") == "hi"
        assert running.stop().clean

    def test_port_taken_between_pick_and_bind_is_retried(
        self, reaper: Reaper, prefork: Callable[..., List[str]], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with socket.create_server(("127.0.0.1", 0)) as squatter:
            busy = squatter.getsockname()[1]
            picks = iter([busy, busy])
            real_free_port = target._free_port
            monkeypatch.setattr(target, "_free_port", lambda host: next(picks, None) or real_free_port(host))
            running = reaper.start(python_spec(prefork(), workers=2))
            assert running.port != busy
            with Client(running.address) as client:
                assert client.call("ping", 1) == 1

    def test_port_taken_every_time_gives_up_with_the_ports_tried(
        self, reaper: Reaper, prefork: Callable[..., List[str]], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with socket.create_server(("127.0.0.1", 0)) as squatter:
            busy = squatter.getsockname()[1]
            monkeypatch.setattr(target, "_free_port", lambda host: busy)
            with pytest.raises(TargetStartupError) as info:
                reaper.start(python_spec(prefork(), workers=1))
        assert info.value.port_in_use
        assert f"ports tried, each reported in use: {busy}, {busy}, {busy}, {busy}" in str(info.value)


class TestStop:
    def test_clean_stop_frees_port_and_leaves_no_process(
        self, reaper: Reaper, prefork: Callable[..., List[str]]
    ) -> None:
        running = reaper.start(python_spec(prefork(), workers=3))
        seen = reaper.track(running.master_pid, *running.worker_pids())
        port = running.port
        with Client(running.address) as client:
            assert client.call("ping", 1) == 1

        result = running.stop()

        assert (result.returncode, result.master_killed, result.survivors_killed) == (0, False, ())
        assert result.clean, result
        assert live(seen) == []
        assert port_refuses(port)
        # The port is usable again, as a restarted server would need.
        with socket.create_server(("127.0.0.1", port)):
            pass

    def test_sigterm_ignored_escalates_to_sigkill(self, reaper: Reaper, prefork: Callable[..., List[str]]) -> None:
        running = reaper.start(python_spec(prefork("--ignore-term"), workers=2))
        workers = running.worker_pids()
        seen = reaper.track(running.master_pid, *workers)

        result = running.stop(grace=0.3)

        assert result.master_killed and result.needed_sigkill
        assert result.returncode == -signal.SIGKILL
        assert sorted(result.survivors_killed) == sorted(workers)
        assert result.seconds >= 0.3
        assert result.nothing_left, result
        assert result.graceful_failure == target.GRACEFUL_SIGKILLED.format(pid=running.master_pid, grace=0.3)
        assert not result.clean
        assert live(seen) == []

    def test_non_zero_exit_after_sigterm_is_not_a_graceful_stop(
        self, reaper: Reaper, prefork: Callable[..., List[str]]
    ) -> None:
        running = reaper.start(python_spec(prefork("--term-exit", "1"), workers=2))
        reaper.track(running.master_pid, *running.worker_pids())

        result = running.stop()

        assert (result.returncode, result.master_killed, result.nothing_left) == (1, False, True), result
        assert result.graceful_failure == target.GRACEFUL_STATUS.format(pid=running.master_pid, status=1)
        assert not result.clean

    @pytest.mark.parametrize("how", ["the test signalled the master", "no grace period"])
    def test_a_stop_that_was_not_asked_to_be_graceful_is_not_judged(
        self, reaper: Reaper, prefork: Callable[..., List[str]], how: str
    ) -> None:
        running = reaper.start(python_spec(prefork("--ignore-term"), workers=1))
        reaper.track(running.master_pid, *running.worker_pids())
        if how == "no grace period":
            result = running.stop(grace=0)
        else:
            os.kill(running.master_pid, signal.SIGTERM)  # ignored, as Cluster.kill_master(SIGTERM) would be
            running.signalled_by_test.append("SIGTERM")
            result = running.stop(grace=0.1)

        assert result.master_killed, result
        assert result.graceful_failure is None
        assert result.clean, result

    def test_workers_in_another_process_group_are_found_by_session(
        self, reaper: Reaper, prefork: Callable[..., List[str]]
    ) -> None:
        running = reaper.start(python_spec(prefork("--new-group", "--abandon-workers"), workers=2))
        workers = running.worker_pids()
        seen = reaper.track(running.master_pid, *workers)
        wait_until(
            lambda: all(os.getpgid(pid) == pid for pid in workers),
            DEADLINE,
            lambda: "the workers to move to their own groups",
        )

        result = running.stop()

        assert result.returncode == 0 and not result.master_killed
        assert sorted(result.survivors_killed) == sorted(workers)
        assert result.clean, result
        assert live(seen) == []

    def test_stop_after_the_master_died(self, reaper: Reaper, prefork: Callable[..., List[str]]) -> None:
        running = reaper.start(python_spec(prefork(), workers=2))
        workers = running.worker_pids()
        seen = reaper.track(running.master_pid, *workers)
        os.kill(running.master_pid, signal.SIGKILL)
        wait_until(lambda: not running.alive(), DEADLINE, lambda: "the master to die")
        # Orphaned workers are still found, through the session.
        assert running.worker_pids() == workers

        result = running.stop()

        assert result.exited_before_stop and result.returncode == -signal.SIGKILL
        assert sorted(result.survivors_killed) == sorted(workers)
        assert result.graceful_failure is None, "a master that died before the stop got no SIGTERM to answer"
        assert result.clean, result
        assert live(seen) == []

    def test_stop_is_idempotent_and_the_context_manager_stops(
        self, reaper: Reaper, prefork: Callable[..., List[str]]
    ) -> None:
        with reaper.start(python_spec(prefork(), workers=1)) as running:
            seen = reaper.track(running.master_pid, *running.worker_pids())
        assert not running.alive()
        assert running.stop() is running.stop()
        assert live(seen) == []

    def test_output_tails_are_kept(self, reaper: Reaper, prefork: Callable[..., List[str]]) -> None:
        running = reaper.start(python_spec(prefork("--ready-line"), workers=1))
        assert running.stdout_tail()[0].startswith("fdcluster-ready ")
        running.stop()
        assert running.stderr_tail() == []


@linux_only
class TestOrphanGuard:
    def test_guard_pipe_is_not_inherited_by_the_target(
        self, reaper: Reaper, prefork: Callable[..., List[str]]
    ) -> None:
        running = reaper.start(python_spec(prefork(), workers=2))
        write_fd = guard_client.link.write_fd
        assert write_fd is not None
        guard_pipe = f"pipe:[{os.fstat(write_fd).st_ino}]"
        for pid in [running.master_pid, *running.worker_pids()]:
            fds = os.listdir(f"/proc/{pid}/fd")
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
            assert guard_pipe not in links, f"pid {pid} holds the guard pipe"

    @pytest.mark.parametrize(
        "kind",
        ["python-prefork", pytest.param("node-cluster", marks=needs_node)],
    )
    def test_sigkilled_pytest_leaves_no_target_behind(
        self, kind: str, reaper: Reaper, prefork: Callable[..., List[str]]
    ) -> None:
        if kind == "node-cluster":
            command = node_spec(workers=2).command
        else:
            command = prefork()
        driver = reaper.popen(
            [sys.executable, "-c", DRIVER, json.dumps(list(command)), "2"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
        )
        assert driver.stdout is not None
        ready, _, _ = select.select([driver.stdout], [], [], 15.0)
        assert ready, "the driver did not report its target within 15 s"
        line = driver.stdout.readline()
        assert line, f"the driver exited with {driver.wait()} before reporting its target"
        report = json.loads(line)
        assert len(report["workers"]) == 2
        doomed = reaper.track(report["master"], *report["workers"])
        guard_proc = reaper.track(report["guard"])
        assert len(doomed) == 3 and guard_proc

        driver.kill()
        driver.wait(DEADLINE)

        wait_until(lambda: not live(doomed), DEADLINE,
                   lambda: f"every target process to die: still live {live(doomed)}")
        wait_until(lambda: not live(guard_proc), DEADLINE, lambda: "the guard to exit")

    def test_guard_kills_watched_and_spares_forgotten_sessions(self, reaper: Reaper) -> None:
        sleeper = [sys.executable, "-c", "import os, time; os.fork(); time.sleep(60)"]
        watched = reaper.popen(sleeper, start_new_session=True)
        forgotten = reaper.popen(sleeper, start_new_session=True)
        watched_procs = wait_until(lambda: session_of_two(watched.pid), DEADLINE,
                                   lambda: "the watched session to fork")
        forgotten_procs = wait_until(lambda: session_of_two(forgotten.pid), DEADLINE,
                                     lambda: "the forgotten session to fork")
        watched_seen = reaper.track(*watched_procs)
        forgotten_seen = reaper.track(*forgotten_procs)

        watchdog = reaper.popen(
            [sys.executable, "-m", "pytest_fdcluster.guard"],
            stdin=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
            start_new_session=True,
        )
        assert watchdog.stdin is not None
        watchdog.stdin.write(f"watch {watched.pid}\nwatch {forgotten.pid}\nforget {forgotten.pid}\n".encode())
        watchdog.stdin.close()
        assert watchdog.wait(DEADLINE) == 0

        wait_until(lambda: not live(watched_seen), DEADLINE, lambda: "the watched session to die")
        assert sorted(live(forgotten_seen)) == sorted(forgotten_procs)

    def test_guard_starts_without_psutil_or_pytest(self) -> None:
        probe = (
            "import importlib.util, sys;"
            f"spec = importlib.util.spec_from_file_location('fdguard', {guard.__file__!r});"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module);"
            "print(sorted(m for m in ('psutil', 'pytest') if m in sys.modules))"
        )
        out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]"
