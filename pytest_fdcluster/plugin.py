"""The pytest plugin ``fdcluster``: options, configuration, markers, fixtures.

Reads top to bottom like pytest-timeout: options and ini, configure and the
report header, then the fixtures.  The machinery (targets, observation,
faults, checks) lives in modules usable without pytest; report hooks live in
``report.py``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

import pytest

from . import report, settings
from .cluster import Cluster, ClusterFactory, scm_rights_unavailable
from .payloads import DEFAULT_SEED, Payloads
from .settings import ClusterSettings, SettingsError
from .target import TargetStartupError

MARKER = "fdcluster"
MARKER_HELP = (
    "fdcluster(workers=None, server=None, **settings): run this test's cluster with these settings "
    f"(settings: {', '.join(k for k in settings.MARKER_KEYS if k not in ('workers', 'server'))})"
)
STARTUP_FAILED = "fdcluster: the cluster did not start"
SETTINGS_INVALID = "fdcluster: invalid settings"


# -- options ----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fdcluster", "fdcluster: prefork clusters as fixtures")
    for name, help_text, kind in (
        ("server", settings.HELP_SERVER, "string"),
        ("workers", settings.HELP_WORKERS, "string"),
        ("startup_timeout", settings.HELP_STARTUP_TIMEOUT, "string"),
        ("strategy", settings.HELP_STRATEGY, "string"),
        ("grace", settings.HELP_GRACE, "string"),
    ):
        group.addoption(f"--fdcluster-{name.replace('_', '-')}", dest=f"fdcluster_{name}", default=None,
                        metavar=name.upper(), help=help_text)
        parser.addini(f"fdcluster_{name}", help_text, type=kind, default=None)
    group.addoption("--fdcluster-report", action="store_true", default=False, help=settings.HELP_REPORT)
    group.addoption("--fdcluster-report-json", default=None, metavar="PATH", help=settings.HELP_REPORT_JSON)


# -- configuration --------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.pluginmanager.register(report.ClusterReporter(config), report.PLUGIN_NAME)


def _option(config: pytest.Config):
    return lambda name: config.getoption(f"fdcluster_{name}", None)


def _ini(config: pytest.Config):
    return lambda name: config.getini(f"fdcluster_{name}")


def _ini_label(config: pytest.Config) -> str:
    return config.inipath.name if config.inipath else "ini"


def resolve_settings(config: pytest.Config, marker_kwargs: Optional[Dict[str, Any]] = None) -> ClusterSettings:
    """Marker, then command line, then ini, then default."""
    return settings.resolve(marker_kwargs or {}, _option(config), _ini(config), ini_label=_ini_label(config))


def pytest_report_header(config: pytest.Config) -> str:
    try:
        resolved = resolve_settings(config)
    except SettingsError as exc:
        return f"fdcluster: {exc}"
    target = f"reference server ({resolved.strategy})" if resolved.is_reference else resolved.describe()
    return (f"fdcluster: target {target}, {resolved.workers} workers, startup timeout {resolved.startup_timeout:g} s; "
            f"payload seed: faker_seed fixture (default {DEFAULT_SEED})")


# -- fixtures -------------------------------------------------------------------------


def _marker_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    merged: Dict[str, Any] = {}
    # Closest marker wins: iter_markers yields the function's first, then class, module.
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        if marker.args:
            raise SettingsError(f"Invalid marker arguments {marker.args!r} from marker: use keywords, e.g. fdcluster(workers=3)")
        merged.update(marker.kwargs)
    return merged


@pytest.fixture
def fdcluster_settings(request: pytest.FixtureRequest) -> ClusterSettings:
    """The settings this test's cluster starts with (marker > command line > ini > default)."""
    try:
        return resolve_settings(request.config, _marker_kwargs(request))
    except SettingsError as exc:
        pytest.fail(f"{SETTINGS_INVALID}: {exc}", pytrace=False)


@pytest.fixture
def fdcluster_factory(request: pytest.FixtureRequest, fdcluster_settings: ClusterSettings) -> Iterator["Factory"]:
    """Start clusters inside a test: ``fdcluster_factory.start(workers=3, strategy=...)``; all stopped at its end."""
    reason = scm_rights_unavailable()
    if reason:
        pytest.skip(reason)
    factory = Factory(request, fdcluster_settings)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def fdcluster(fdcluster_factory: "Factory") -> Cluster:
    """A running cluster for this test, configured by the fdcluster marker and options."""
    return fdcluster_factory.start()


@pytest.fixture
def fdcluster_payloads(request: pytest.FixtureRequest) -> Payloads:
    """Faker-driven request params (many locales, emoji, nested, large), seeded by Faker's ``faker_seed``."""
    try:
        seed = request.getfixturevalue("faker_seed")
    except pytest.FixtureLookupError:
        seed = DEFAULT_SEED
    request.node.stash[report.PAYLOAD_SEED] = seed
    return Payloads(seed)


class Factory:
    """What ``fdcluster_factory`` yields: starts clusters, reports and stops them."""

    def __init__(self, request: pytest.FixtureRequest, default: ClusterSettings) -> None:
        self._request = request
        self._clusters = ClusterFactory(default)

    @property
    def is_reference(self) -> bool:
        """True when this test's clusters run the reference server (its settings apply)."""
        return self._clusters.default.is_reference

    @property
    def clusters(self):
        return list(self._clusters.clusters)

    def start(self, workers: Optional[int] = None, server: Optional[str] = None, **overrides: Any) -> Cluster:
        """Start one cluster; keywords are the marker's (workers, server, strategy, idle_timeout...)."""
        kwargs = dict(_marker_kwargs(self._request))
        if workers is not None:
            kwargs["workers"] = workers
        if server is not None:
            kwargs["server"] = server
            for key in settings.SERVER_FLAGS:
                kwargs.pop(key, None)  # the marker's reference settings do not carry over to an external target
        kwargs.update(overrides)
        try:
            resolved = resolve_settings(self._request.config, kwargs) if kwargs else self._clusters.default
        except SettingsError as exc:
            pytest.fail(f"{SETTINGS_INVALID}: {exc}", pytrace=False)
        try:
            cluster = self._clusters.start(resolved, name=f"cluster {len(self._clusters.clusters) + 1}")
        except TargetStartupError as exc:
            pytest.fail(f"{STARTUP_FAILED}\n{exc}", pytrace=False)
        report.record_start(self._request.node, cluster)
        return cluster

    def close(self) -> None:
        for cluster, result in self._clusters.close():
            report.record_stop(self._request.node, cluster, result)
