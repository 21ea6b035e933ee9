"""The built wheel carries the plugin and the server, and the server runs from it alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (path,) = out.glob("pytest_fdcluster-*.whl")
    return path


def test_wheel_contains_plugin_server_and_entry_points(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "pytest_fdcluster/plugin.py" in names
    assert "pytest_fdcluster/faults/__init__.py" in names
    assert "pytest_fdcluster/py.typed" in names
    assert "fdcluster_server/master.py" in names
    assert not any(n.startswith(("server/", "tests/", "scenarios/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fdcluster = pytest_fdcluster.plugin" in text
    assert "fdcluster-server = fdcluster_server.__main__:main" in text


def test_server_starts_from_the_installed_wheel_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.Popen([sys.executable, "-s", "-m", "fdcluster_server", "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fdcluster-ready "), proc.stderr.read() if proc.poll() is not None else line
        info = json.loads(line.split(" ", 1)[1])
        probe = ("import sys, fdcluster_server; "
                 "assert fdcluster_server.__file__.startswith(sys.argv[1]), fdcluster_server.__file__")
        subprocess.run([sys.executable, "-s", "-c", probe, str(site)], cwd=tmp_path, env=env, check=True, timeout=30)
        assert info["pid"] == proc.pid
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_wheel_carries_the_standard_suite(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "pytest_fdcluster/scenarios/__init__.py" in names
    assert "pytest_fdcluster/scenarios/test_worker_kills.py" in names


def test_standard_suite_runs_from_the_wheel_in_a_fresh_venv(wheel, tmp_path):
    """What a user does after `pip install`: the whole chaos suite against their server, in an empty directory."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert install.returncode == 0, (
        f"pip install of the wheel failed:\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PYTEST_")}
    server = f"{python} -m fdcluster_server --port {{port}} --workers {{workers}} --log-level warning"
    result = subprocess.run(
        # As a user with their own server: the command, and what it has (the server's default idle timeout).
        [str(python), "-m", "pytest", "-p", "fdcluster", "--pyargs", "pytest_fdcluster.scenarios",
         "--fdcluster-server", server, "--fdcluster-declare", "idle_timeout=10",
         "-q", "-p", "no:cacheprovider", "-W", "error::pytest.PytestConfigWarning"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"the installed suite failed against the installed server:\n{tail}"
    assert " passed" in result.stdout.splitlines()[-1], tail
    assert str(ROOT) not in result.stdout, f"the run reached into the checkout:\n{tail}"
