"""Fixtures for the plugin's end-to-end tests: pytester, a clean environment, a reaper of processes."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from plugin_test_support import REPO_ROOT, Reaper


def pytest_configure(config: pytest.Config) -> None:
    """Load pytester, as ``pytest_plugins = ["pytester"]`` would.

    pytest refuses ``pytest_plugins`` in a conftest below the rootdir once
    configuration is done, which is the case when the whole suite runs
    (``pytest`` from the repository root).  This hook is historic, so it runs
    when this conftest is registered, however late.
    """
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")


@pytest.fixture(autouse=True)
def inner_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment inner pytest runs inherit.

    The repository goes first on PYTHONPATH, so an inner run imports this
    checkout whatever its working directory (an editable install made before
    a package gained its ``__init__.py`` maps it as a namespace package).  An
    outer xdist worker's variables must not make an inner run think it is one.
    """
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Kill and reap, at teardown, every process the test registered."""
    with Reaper() as tracked:
        yield tracked
