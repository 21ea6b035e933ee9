"""The command line: flags, errors a person can act on, readiness, binding."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
from conftest import call, connect

SERVER = [sys.executable, "-m", "fdcluster_server"]


def run(*args, timeout=20):
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class TestFlags:
    def test_help_lists_every_flag(self):
        out = run("--help").stdout
        for flag in ("--host", "--port", "--workers", "--strategy", "--max-frame", "--idle-timeout",
                     "--graceful-timeout", "--handlers", "--control", "--handoff-window", "--max-pending"):
            assert flag in out

    def test_unknown_flag_exits_2_with_message(self):
        result = run("--bogus")
        assert result.returncode == 2
        assert "unrecognized arguments: --bogus" in result.stderr

    def test_bad_values_exit_2_naming_the_flag(self):
        result = run("--workers", "zero")
        assert result.returncode == 2
        assert "argument --workers: expected a positive integer, got 'zero'" in result.stderr
        result = run("--strategy", "random")
        assert result.returncode == 2 and "argument --strategy: invalid choice: 'random'" in result.stderr

    def test_bad_handlers_module_exits_2(self):
        result = run("--handlers", "no_such_module_xyz")
        assert result.returncode == 2
        assert "cannot import handlers module 'no_such_module_xyz'" in result.stderr


class TestBinding:
    def test_port_in_use_is_a_clear_error(self, start_server):
        server = start_server("--workers", "1")
        result = run("--port", str(server.address[1]), "--workers", "1")
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{server.address[1]}: Address already in use" in result.stderr

    def test_binds_loopback_by_default_and_reports_readiness(self, start_server):
        server = start_server("--workers", "2")
        assert server.info["host"] == "127.0.0.1"
        assert server.info["pid"] == server.pid
        assert sorted(server.info["workers"]) == server.workers()
        listening = [c for c in psutil.Process(server.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]

    def test_workers_do_not_keep_the_listening_socket(self, start_server):
        server = start_server("--workers", "2")
        for pid in server.workers():
            assert [c for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN] == []

    def test_worker_fds_are_not_inheritable(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            call(sock, "ping")
            (worker,) = server.workers()
            for name in os.listdir(f"/proc/{worker}/fd"):
                fd = int(name)
                if fd <= 2:
                    continue
                with open(f"/proc/{worker}/fdinfo/{fd}") as info:
                    flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
                assert flags & 0o2000000, f"worker fd {fd} is inheritable (no O_CLOEXEC)"
