"""The pytest plugin ``fdcluster``: options, configuration, markers, fixtures.

Reads top to bottom like pytest-timeout: options and ini, configure and the
report header, then the fixtures.  The machinery (targets, observation,
faults, checks) lives in modules usable without pytest; report hooks live in
``report.py``.
"""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import pytest

from . import report, settings
from .cluster import Cluster, ClusterFactory, scm_rights_unavailable
from .settings import ClusterSettings, SettingsError
from .target import StopResult, TargetStartupError

if TYPE_CHECKING:
    from .payloads import Payloads

#: The pytest11 entry point's name: ``-p fdcluster`` loads the plugin, ``-p no:fdcluster`` disables it.
ENTRY_POINT = "fdcluster"
MARKER = "fdcluster"
MARKER_HELP = (
    "fdcluster(workers=None, server=None, **settings): run this test's cluster with these settings "
    f"(settings: {', '.join(k for k in settings.MARKER_KEYS if k not in ('workers', 'server'))})"
)
STARTUP_FAILED = "fdcluster: the cluster did not start"
SETTINGS_INVALID = "fdcluster: invalid settings"
TEARDOWN_UNCLEAN = "fdcluster: teardown left something behind"
#: One line per cluster that ``TEARDOWN_UNCLEAN`` is about.
LEFT_PIDS = "{cluster}: pids {pids} still alive after SIGKILL"
LEFT_PORT = "{cluster}: port {host}:{port} still accepting connections after the target was stopped"
HEADER = ("fdcluster: target {target}, {workers} workers, startup timeout {timeout:g} s, grace {grace:g} s; "
          "payload seed {seed}")
HEADER_REFERENCE = "reference server ({strategy})"
HEADER_SEED = "{seed!r} (a faker_seed fixture overrides it)"
OVERRIDE_INI_LABEL = "-o/--override-ini"
FACTORY_LABEL = "fdcluster_factory.start()"
#: The seed Faker's own pytest plugin uses when no ``faker_seed`` fixture is defined.
DEFAULT_SEED = 0


# -- loading --------------------------------------------------------------------------


def pytest_plugin_registered(plugin: object, manager: pytest.PytestPluginManager) -> None:
    """Block this module's other name, so loading it by both names is harmless.

    The same module can arrive as the ``fdcluster`` entry point (autoload,
    ``-p fdcluster``) and by its module name (``-p pytest_fdcluster.plugin``,
    ``pytest_plugins = [...]`` in a conftest); pluggy refuses a module
    registered twice, so whichever name comes second becomes a no-op.
    """
    if plugin is not sys.modules[__name__]:
        return
    plugin_name = manager.get_name(plugin)  # not an argument: pytest < 8.1 does not pass it
    for alias in (ENTRY_POINT, __name__):
        if alias != plugin_name and manager.get_plugin(alias) is None:
            manager.set_blocked(alias)


# -- options ----------------------------------------------------------------------------


def _ini_type(number: type) -> Any:
    """A number or a string: native TOML numbers pass, and a bad string still reaches our message.

    Union types for ini options arrived in pytest 9.2; before, everything is a string.
    """
    return Union[number, str] if pytest.version_tuple >= (9, 2) else "string"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fdcluster", "fdcluster: prefork clusters as fixtures")
    for name, help_text, ini_type in (
        ("server", settings.HELP_SERVER, "string"),
        ("workers", settings.HELP_WORKERS, _ini_type(int)),
        ("startup_timeout", settings.HELP_STARTUP_TIMEOUT, _ini_type(float)),
        ("strategy", settings.HELP_STRATEGY, "string"),
        ("grace", settings.HELP_GRACE, _ini_type(float)),
        ("ready_line", settings.HELP_READY_LINE, "string"),
    ):
        group.addoption(f"--fdcluster-{name.replace('_', '-')}", dest=f"fdcluster_{name}", default=None,
                        metavar=name.upper(), help=help_text)
        parser.addini(f"fdcluster_{name}", help_text, type=ini_type, default=None)
    group.addoption("--fdcluster-report", action="store_true", default=False, help=settings.HELP_REPORT)
    group.addoption("--fdcluster-report-json", default=None, metavar="PATH", help=settings.HELP_REPORT_JSON)


# -- configuration --------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if not config.pluginmanager.has_plugin(report.PLUGIN_NAME):
        config.pluginmanager.register(report.ClusterReporter(config), report.PLUGIN_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    reporter = config.pluginmanager.get_plugin(report.PLUGIN_NAME)
    if reporter is not None:
        config.pluginmanager.unregister(reporter, report.PLUGIN_NAME)


def _option(config: pytest.Config) -> Callable[[str], Any]:
    return lambda name: config.getoption(f"fdcluster_{name}", None)


def _ini(config: pytest.Config) -> Callable[[str], Any]:
    return lambda name: config.getini(f"fdcluster_{name}")


def _ini_label(config: pytest.Config) -> Callable[[str], str]:
    """Names where an ini value came from: the file, or ``-o`` when it overrode the file."""
    overridden = {entry.split("=", 1)[0].strip() for entry in (config.getoption("override_ini", None) or ())}
    file_label = config.inipath.name if config.inipath else "ini"
    return lambda name: OVERRIDE_INI_LABEL if f"fdcluster_{name}" in overridden else file_label


def resolve_settings(
    config: pytest.Config, marker_kwargs: Optional[Dict[str, Any]] = None, start_kwargs: Sequence[str] = ()
) -> ClusterSettings:
    """Marker, then command line, then ini, then default.

    ``start_kwargs`` names the entries of ``marker_kwargs`` that were passed to
    ``fdcluster_factory.start()`` rather than set by the marker, for messages.
    """

    def marker_label(name: str) -> str:
        return FACTORY_LABEL if name in start_kwargs else settings.SOURCE_MARKER

    return settings.resolve(marker_kwargs or {}, _option(config), _ini(config), ini_label=_ini_label(config),
                            marker_label=marker_label)


def pytest_report_header(config: pytest.Config) -> str:
    try:
        resolved = resolve_settings(config)
    except SettingsError as exc:
        return f"{SETTINGS_INVALID}: {exc}"
    target = HEADER_REFERENCE.format(strategy=resolved.strategy) if resolved.is_reference else resolved.describe()
    return HEADER.format(target=target, workers=resolved.workers, timeout=resolved.startup_timeout,
                         grace=resolved.grace, seed=HEADER_SEED.format(seed=DEFAULT_SEED))


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
        problem = str(exc)
    # Failed outside the except block, so the report does not repeat the message as a chained exception.
    pytest.fail(f"{SETTINGS_INVALID}: {problem}", pytrace=False)


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
def fdcluster_payloads(request: pytest.FixtureRequest) -> "Payloads":
    """Faker-driven request params (many locales, emoji, nested, large), seeded by Faker's ``faker_seed``."""
    from .payloads import Payloads  # Faker takes a while to import: only for tests that use it

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
    def clusters(self) -> List[Cluster]:
        """The clusters started so far, oldest first."""
        return list(self._clusters.clusters)

    def start(self, workers: Optional[int] = None, server: Optional[str] = None, **overrides: Any) -> Cluster:
        """Start one cluster; keywords are the marker's (workers, server, strategy, idle_timeout...)."""
        given = dict(overrides)
        if workers is not None:
            given["workers"] = workers
        if server is not None:
            given["server"] = server
        kwargs = dict(_marker_kwargs(self._request))
        if server is not None:
            for key in settings.SERVER_FLAGS:
                kwargs.pop(key, None)  # the marker's reference settings do not carry over to an external target
        kwargs.update(given)
        failure = None
        try:
            resolved = self._clusters.default
            if kwargs:
                resolved = resolve_settings(self._request.config, kwargs, tuple(given))
        except SettingsError as exc:
            failure = f"{SETTINGS_INVALID}: {exc}"
        else:
            try:
                cluster = self._clusters.start(resolved, name=f"cluster {len(self._clusters.clusters) + 1}")
            except TargetStartupError as exc:
                failure = f"{STARTUP_FAILED}\n{exc}"
        if failure is not None:
            # Outside the except blocks: the message once, not again as a chained exception.
            pytest.fail(failure, pytrace=False)
        report.record_start(self._request.node, cluster)
        return cluster

    def close(self) -> None:
        """Stop every cluster (newest first), record each, then fail if one left something behind.

        Each cluster is stopped even when stopping another raised; the first
        such error is re-raised once all are done.
        """
        problems: List[str] = []
        error: Optional[BaseException] = None
        for cluster in reversed(self._clusters.clusters):
            try:
                result = cluster.stop()
            except BaseException as exc:  # the others must still be stopped
                error = error or exc
                continue
            report.record_stop(self._request.node, cluster, result)
            problems += unclean_teardown(cluster, result)
        if error is not None:
            raise error
        if problems:
            pytest.fail("\n".join([TEARDOWN_UNCLEAN, *problems]), pytrace=False)


def unclean_teardown(cluster: Cluster, result: StopResult) -> List[str]:
    """Lines naming what ``cluster``'s stop left behind (none when it was clean)."""
    name = f"{cluster.name} ({' '.join(shlex.quote(arg) for arg in cluster.target.argv)})"
    lines = []
    if result.remaining:
        lines.append(LEFT_PIDS.format(cluster=name, pids=list(result.remaining)))
    if not result.port_released:
        host, port = cluster.address
        lines.append(LEFT_PORT.format(cluster=name, host=host, port=port))
    return lines
