"""The pytest plugin ``fdcluster``: options, configuration, markers, fixtures.

Reads top to bottom like pytest-timeout: options and ini, configure and the
report header, then the fixtures.  The machinery (targets, observation,
faults, checks) lives in modules usable without pytest; report hooks live in
``report.py``.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

from . import report, settings
from .capabilities import Capabilities
from .cluster import Cluster, ClusterFactory, GracefulStopError, scm_rights_unavailable
from .settings import ClusterSettings, SettingsError
from .target import StopResult, TargetStartupError
from .text import shell_join

if TYPE_CHECKING:
    from .payloads import Payloads

#: The pytest11 entry point's name: ``-p fdcluster`` loads the plugin, ``-p no:fdcluster`` disables it.
ENTRY_POINT = "fdcluster"
MARKER = "fdcluster"
MARKER_HELP = (
    f"{MARKER}({', '.join(f'{name}=None' for name in settings.MARKER_SIGNATURE)}, **settings): "
    "run this test's cluster with these settings "
    f"(settings: {', '.join(k for k in settings.MARKER_KEYS if k not in settings.MARKER_SIGNATURE)})"
)
STARTUP_FAILED = "fdcluster: the cluster did not start"
SETTINGS_INVALID = "fdcluster: invalid settings"
TEARDOWN_UNCLEAN = "fdcluster: teardown left something behind"
#: One line per cluster that ``TEARDOWN_UNCLEAN`` is about.
LEFT_PIDS = "{cluster}: pids {pids} still alive after SIGKILL"
LEFT_PORT = "{cluster}: port {host}:{port} still accepting connections after the target was stopped"
HEADER = ("fdcluster: {target}, {workers} workers, startup timeout {timeout:g} s, grace {grace:g} s; "
          "payload seed {seed}")
HEADER_REFERENCE = "reference server ({strategy})"
#: The target part of the header in a run with one target.
HEADER_TARGET = "target {target}"
#: The target part of the header in a run with several targets: ``NAME: TARGET`` joined by "; ".
HEADER_TARGETS = "targets {targets}"
HEADER_SEED = "{seed!r} ({source}; a faker_seed fixture overrides it)"
SEED_FAKER = "Faker's default"
SEED_RANDOMLY = "pytest-randomly's --randomly-seed"
#: Printed after collection when tests' own ``faker_seed`` fixtures decide the seed.
SEED_PER_TEST = ("fdcluster: payload seed per test, from the faker_seed fixture in {where}: "
                 "a failed test's seed is in its '{replay}' section, every test's in the JSON report")
OVERRIDE_INI_LABEL = "-o/--override-ini"
FACTORY_LABEL = "fdcluster_factory.start()"
#: The seed Faker's own pytest plugin uses when no ``faker_seed`` fixture is defined.
DEFAULT_SEED = 0
#: The run's targets, resolved once at configure time.
TARGETS = pytest.StashKey[Tuple[str, ...]]()


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


def _ini_type(kind: type, multiple: bool = False) -> Any:
    """A number or a string for numeric settings: native TOML numbers pass, and a bad string still reaches our message.

    Union types for ini options arrived in pytest 9.2; before, everything is a string.  A repeatable
    setting lists one value per line.
    """
    if multiple:
        return "linelist"
    return Union[kind, str] if kind in (int, float) and pytest.version_tuple >= (9, 2) else "string"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fdcluster", "fdcluster: prefork clusters as fixtures")
    for setting in settings.SETTINGS:
        if not setting.option:
            continue  # a marker keyword only
        group.addoption(setting.flag, dest=setting.dest, default=None, metavar=setting.metavar,
                        action="append" if setting.multiple else "store", help=setting.help_text)
        parser.addini(setting.dest, setting.help_text,
                      type=_ini_type(setting.kind, setting.multiple), default=None)
    group.addoption("--fdcluster-report", action="store_true", default=False, help=report.HELP_REPORT)
    group.addoption("--fdcluster-report-json", default=None, metavar="PATH", help=report.HELP_REPORT_JSON)


# -- configuration --------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Check every setting of the command line and ini now, so a bad one stops the run (exit code 4)."""
    config.addinivalue_line("markers", MARKER_HELP)
    if config.getoption("help", False) or config.getoption("version", False):
        return  # --help must work whatever the settings
    try:
        targets = settings_by_target(config)
        junit_properties = settings.run_setting("junit_properties", *_lookups(config))
    except SettingsError as exc:
        raise pytest.UsageError(f"{SETTINGS_INVALID}: {exc}") from None
    config.stash[TARGETS] = tuple(targets)
    if not config.pluginmanager.has_plugin(report.PLUGIN_NAME):
        config.pluginmanager.register(report.ClusterReporter(config, junit_properties), report.PLUGIN_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    reporter = config.pluginmanager.get_plugin(report.PLUGIN_NAME)
    if reporter is not None:
        config.pluginmanager.unregister(reporter, report.PLUGIN_NAME)


def _ini_label(config: pytest.Config) -> Callable[[str], str]:
    """Names where an ini value came from: the file, or ``-o`` when it overrode the file."""
    overridden = {entry.split("=", 1)[0].strip() for entry in (config.getoption("override_ini", None) or ())}
    file_label = config.inipath.name if config.inipath else "ini"
    return lambda ini_name: OVERRIDE_INI_LABEL if ini_name in overridden else file_label


def _lookups(config: pytest.Config) -> Tuple[Callable[[str], Any], Callable[[str], Any], Callable[[str], str]]:
    """The command-line and ini lookups ``settings`` takes, and the ini's label."""
    return (lambda dest: config.getoption(dest, None)), config.getini, _ini_label(config)


def resolve_settings(
    config: pytest.Config, marker_kwargs: Optional[Dict[str, Any]] = None, start_kwargs: Sequence[str] = (),
    target: Optional[str] = None,
) -> ClusterSettings:
    """Marker, then command line, then ini, then default, for ``target`` (default: the run's first).

    ``start_kwargs`` names the entries of ``marker_kwargs`` that were passed to
    ``fdcluster_factory.start()`` rather than set by the marker, for messages.
    """

    def marker_label(name: str) -> str:
        return FACTORY_LABEL if name in start_kwargs else settings.SOURCE_MARKER

    option, ini, ini_label = _lookups(config)
    return settings.resolve(marker_kwargs or {}, option, ini, ini_label=ini_label, marker_label=marker_label,
                            target=target)


def settings_by_target(config: pytest.Config) -> Dict[str, ClusterSettings]:
    """Every target of the run with its settings before any marker; raises ``SettingsError`` for a bad value."""
    return settings.resolve_all(*_lookups(config))


def payload_seed(config: pytest.Config) -> Tuple[Any, str]:
    """The seed every test's payloads use unless a ``faker_seed`` fixture of the tests' own says otherwise."""
    seed = config.getoption("randomly_seed", None)
    # pytest-randomly's autouse faker_seed fixture returns its session seed.
    if config.pluginmanager.has_plugin("randomly") and isinstance(seed, int):
        return seed, SEED_RANDOMLY
    return DEFAULT_SEED, SEED_FAKER


def describe_target(resolved: ClusterSettings) -> str:
    return HEADER_REFERENCE.format(strategy=resolved.strategy) if resolved.is_reference else resolved.describe()


def pytest_report_header(config: pytest.Config) -> str:
    try:
        by_target = settings_by_target(config)
    except SettingsError as exc:
        return f"{SETTINGS_INVALID}: {exc}"
    first = next(iter(by_target.values()))
    if len(by_target) == 1:
        target = HEADER_TARGET.format(target=describe_target(first))
    else:
        target = HEADER_TARGETS.format(targets="; ".join(f"{name}: {describe_target(resolved)}"
                                                          for name, resolved in by_target.items()))
    seed, source = payload_seed(config)
    return HEADER.format(target=target, workers=first.workers, timeout=first.startup_timeout,
                         grace=first.grace, seed=HEADER_SEED.format(seed=seed, source=source))


def pytest_report_collectionfinish(config: pytest.Config, items: Sequence[pytest.Item]) -> List[str]:
    """Say when the tests' own ``faker_seed`` fixtures, not the header's seed, decide the payloads."""
    where = set()
    for item in items:
        manager = getattr(item.session, "_fixturemanager", None)  # no public way to ask which faker_seed applies
        if manager is None or "fdcluster_payloads" not in getattr(item, "fixturenames", ()):
            continue
        try:
            definitions = manager.getfixturedefs("faker_seed", item) or ()
        except TypeError:  # pytest < 8 took a node id
            definitions = manager.getfixturedefs("faker_seed", item.nodeid) or ()
        func = definitions[-1].func if definitions else None
        if func is not None and func.__module__ != "pytest_randomly":  # its seed is the header's
            where.add(os.path.relpath(inspect.getfile(func), config.rootpath))
    if not where:
        return []
    return [SEED_PER_TEST.format(where=", ".join(sorted(where)), replay=report.REPLAY_TITLE)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """With several targets, a test of a cluster runs once per target, the target's name in its id."""
    targets = metafunc.config.stash.get(TARGETS, ())
    if len(targets) < 2 or TARGET_FIXTURE not in metafunc.fixturenames:
        return
    if any("server" in marker.kwargs for marker in metafunc.definition.iter_markers(MARKER)):
        return  # the marker chose its own server
    metafunc.parametrize(TARGET_FIXTURE, targets, indirect=True, ids=list(targets))


# -- fixtures -------------------------------------------------------------------------


def _marker_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    merged: Dict[str, Any] = {}
    # Closest marker wins: iter_markers yields the function's first, then class, module.
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        if marker.args:
            raise SettingsError(f"Invalid marker arguments {marker.args!r} from marker: "
                                "use keywords, e.g. fdcluster(workers=3)")
        merged.update(marker.kwargs)
    return merged


TARGET_FIXTURE = "fdcluster_target"


@pytest.fixture
def fdcluster_target(request: pytest.FixtureRequest) -> str:
    """The name of the target this test runs against: one per test id in a run with several."""
    return getattr(request, "param", None) or request.config.stash.get(TARGETS, (None,))[0] or "reference"


@pytest.fixture
def fdcluster_settings(request: pytest.FixtureRequest, fdcluster_target: str) -> ClusterSettings:
    """The settings this test's cluster starts with (marker > command line > ini > default)."""
    try:
        resolved = resolve_settings(request.config, _marker_kwargs(request), target=fdcluster_target)
    except SettingsError as exc:
        problem = str(exc)
    else:
        # The test's row of the target matrix (the marker's server, if it names one).
        request.node.user_properties.append((report.TARGET_KEY, resolved.target))
        return resolved
    # Failed outside the except block, so the report does not repeat the message as a chained exception.
    pytest.fail(f"{SETTINGS_INVALID}: {problem}", pytrace=False)


@pytest.fixture
def fdcluster_factory(
    request: pytest.FixtureRequest, fdcluster_settings: ClusterSettings
) -> Iterator[FixtureClusters]:
    """Start clusters inside a test: ``fdcluster_factory.start(workers=3, strategy=...)``; all stopped at its end."""
    reason = scm_rights_unavailable()
    if reason:
        pytest.skip(reason)
    factory = FixtureClusters(request, fdcluster_settings)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def fdcluster(fdcluster_factory: FixtureClusters) -> Cluster:
    """A running cluster for this test, configured by the fdcluster marker and options."""
    return fdcluster_factory.start()


@pytest.fixture
def fdcluster_payloads(request: pytest.FixtureRequest) -> Payloads:
    """Faker-driven request params (many locales, emoji, nested, large), seeded by Faker's ``faker_seed``."""
    from .payloads import Payloads  # Faker takes a while to import: only for tests that use it

    try:
        seed = request.getfixturevalue("faker_seed")
    except pytest.FixtureLookupError:
        seed = DEFAULT_SEED
    request.node.stash[report.PAYLOAD_SEED] = seed
    return Payloads(seed)


class FixtureClusters:
    """What ``fdcluster_factory`` yields: starts clusters with the test's settings, reports and stops them.

    A ``ClusterFactory`` does the starting and stopping; this adds what only a
    test has: its marker, ``pytest.fail`` messages and the report records.
    """

    def __init__(self, request: pytest.FixtureRequest, default: ClusterSettings) -> None:
        self._request = request
        self._factory = ClusterFactory(default)

    @property
    def is_reference(self) -> bool:
        """True when this test's clusters run the reference server (its settings apply)."""
        return self._factory.default.is_reference

    @property
    def settings(self) -> ClusterSettings:
        """The settings ``start()`` uses when given no keywords."""
        return self._factory.default

    @property
    def capabilities(self) -> Capabilities:
        """What this test's target has, as declared (the reference server's: as started)."""
        return self._factory.default.capabilities

    @property
    def clusters(self) -> List[Cluster]:
        """The clusters started so far, oldest first."""
        return list(self._factory.clusters)

    def start(self, workers: Optional[int] = None, server: Optional[str] = None, **overrides: Any) -> Cluster:
        """Start one cluster; keywords are the marker's (workers, server, strategy, idle_timeout...)."""
        given = dict(overrides)
        if workers is not None:
            given["workers"] = workers
        if server is not None:
            given["server"] = server
        kwargs = dict(_marker_kwargs(self._request))
        if server is not None:
            # The marker's reference-server flags do not carry over to another server.
            for setting in settings.SERVER_FLAGS:
                kwargs.pop(setting.name, None)
        kwargs.update(given)
        failure = None
        try:
            resolved = self._factory.default
            if kwargs:
                resolved = resolve_settings(self._request.config, kwargs, tuple(given), target=resolved.target)
        except SettingsError as exc:
            failure = f"{SETTINGS_INVALID}: {exc}"
        else:
            try:
                cluster = self._factory.start(resolved)  # named "cluster N", N counting from 1
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
        such error is re-raised once the others are recorded.
        """
        error: Optional[BaseException] = None
        try:
            self._factory.close()
        except BaseException as exc:  # the clusters that did stop are still recorded
            error = exc
        problems: List[str] = []
        for cluster in reversed(self._factory.clusters):
            if cluster.stop_result is None:
                continue  # its stop raised: nothing to record
            report.record_stop(self._request.node, cluster, cluster.stop_result)
            problems += unclean_teardown(cluster, cluster.stop_result)
        if self._request.session.exitstatus == pytest.ExitCode.INTERRUPTED:
            # After Ctrl-C every cluster was still stopped and recorded; an error raised now would crash
            # pytest's session finish instead of reaching the user, and a user who interrupted wants out.
            if error is not None and not isinstance(error, GracefulStopError):
                raise error
            return
        if error is not None:
            raise error
        if problems:
            pytest.fail("\n".join([TEARDOWN_UNCLEAN, *problems]), pytrace=False)


def unclean_teardown(cluster: Cluster, result: StopResult) -> List[str]:
    """Lines naming what ``cluster``'s stop left behind (none when it was clean)."""
    name = f"{cluster.name} ({shell_join(cluster.target.argv)})"
    lines = []
    if result.remaining:
        lines.append(LEFT_PIDS.format(cluster=name, pids=list(result.remaining)))
    if not result.port_released:
        host, port = cluster.address
        lines.append(LEFT_PORT.format(cluster=name, host=host, port=port))
    return lines
