"""What the plugin's end-to-end tests share: target commands, process records, a reaper, waits.

The tests run pytest inside pytest.  An inner test records the processes of
its clusters (pid and start time, so a recycled pid is never mistaken for
one of ours) in a JSON file with ``write_pids`` from ``INNER_CONFTEST``; the
outer test checks them after the inner run.  Everything an outer test starts
or learns of goes to a ``Reaper`` (tests/support/reaping.py), which SIGKILLs
and reaps what is still alive at teardown, whatever the outcome.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Iterable, List

import psutil
import pytest

from pytest_fdcluster import wait_until

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SUPPORT = REPO_ROOT / "tests" / "support"
STUBBORN_TARGET = SUPPORT / "stubborn_target.py"
NODE_SERVER = HERE.parent / "targets" / "node_cluster_server.js"

# tests/support is a folder of scripts and helpers, not a package: it goes on the path to be imported.
sys.path.insert(0, str(SUPPORT))
from reaping import ProcessRecord as ProcessRecord  # noqa: E402  (re-exported for this folder's tests)
from reaping import Reaper as Reaper  # noqa: E402

#: Bound on every wait for observed state (a pid gone, a file written).
DEADLINE = 5.0
#: Bound on a whole inner pytest run.
RUN_TIMEOUT = 60.0

needs_node = pytest.mark.skipif(
    shutil.which("node") is None,
    reason="node (Node.js) is not installed; the tests against the Node.js cluster target need it",
)

#: Written as the inner run's conftest: ``write_pids(path, *clusters)`` for inner tests.
INNER_CONFTEST = '''
import json, os
import psutil

def write_pids(path, *clusters):
    """Record [pid, create_time] of every process of ``clusters`` in ``path``, atomically."""
    records = []
    for cluster in clusters:
        for pid in [cluster.master, *cluster.workers]:
            records.append([pid, psutil.Process(pid).create_time()])
    with open(path + ".tmp", "w") as out:
        json.dump(records, out)
    os.replace(path + ".tmp", path)
'''

def stubborn_command(*extra: str) -> str:
    """``--fdcluster-server`` template of the target that ignores SIGTERM."""
    return shlex.join([sys.executable, str(STUBBORN_TARGET), "{port}", "{workers}", *extra])


def node_command() -> str:
    """``--fdcluster-server`` template of the Node.js cluster target."""
    return shlex.join(["node", str(NODE_SERVER), "--port", "{port}", "--workers", "{workers}"])


def literal(text: str) -> str:
    """``text`` as an fnmatch pattern matching only itself."""
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def same_process_alive(pid: int, create_time: float) -> bool:
    """Whether the process recorded as (pid, create_time) still runs (a zombie counts as dead)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_records(path: Path) -> List[ProcessRecord]:
    """The (pid, create_time) records an inner test wrote with ``write_pids``."""
    return [(int(pid), float(created)) for pid, created in json.loads(path.read_text())]


def assert_all_gone(records: Iterable[ProcessRecord], what: str, timeout: float = DEADLINE) -> None:
    """Wait (bounded) until none of the recorded processes is alive; fail naming the survivors."""
    records = sorted(set(records))
    assert records, f"no processes recorded for {what}"
    wait_until(
        lambda: not [pid for pid, created in records if same_process_alive(pid, created)],
        timeout,
        lambda: f"{what} to be gone; still alive: "
        + str([pid for pid, created in records if same_process_alive(pid, created)]),
    )


def run_subprocess(pytester: pytest.Pytester, *args: str, faker: bool = False) -> pytest.RunResult:
    """``runpytest_subprocess`` with the cache off and a bound on the run.

    Faker's own plugin is left out unless asked for: importing Faker costs
    more than most of these runs, and only the payload tests need it.
    """
    extra = () if faker else ("-p", "no:faker")
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *extra, *args, timeout=RUN_TIMEOUT)
