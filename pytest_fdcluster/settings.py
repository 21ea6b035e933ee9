"""One place that decides each cluster setting: marker, then command line, then ini, then default.

A bad value names where it came from (``Invalid workers 'x' from --fdcluster-workers``),
so a user knows which of the four places to fix.  No pytest import: the
plugin passes in plain lookups.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from fdcluster_server.dispatch import STRATEGIES

# One help text per setting, shared by addoption and addini so they never drift apart.
HELP_SERVER = (
    "command template of the target server, split like a shell would (never run through one); "
    "{port}, {workers} and {host} are filled in (default: the reference server)"
)
HELP_WORKERS = "worker processes per cluster (default: 2)"
HELP_STARTUP_TIMEOUT = "seconds a cluster may take to become ready (default: 15)"
HELP_STRATEGY = f"reference server's dispatch strategy: {', '.join(STRATEGIES)} (default: round-robin)"
HELP_GRACE = "seconds between SIGTERM and SIGKILL at teardown (default: 5)"
HELP_REPORT = "show per-cluster figures in the terminal summary"
HELP_REPORT_JSON = "write per-cluster figures as JSON to this path"

DEFAULT_WORKERS = 2
DEFAULT_STARTUP_TIMEOUT = 15.0
DEFAULT_GRACE = 5.0
DEFAULT_STRATEGY = STRATEGIES[0]

# Reference-server settings a marker may pass through as flags (name -> flag).
SERVER_FLAGS = {
    "strategy": "--strategy",
    "max_frame": "--max-frame",
    "idle_timeout": "--idle-timeout",
    "graceful_timeout": "--graceful-timeout",
    "handoff_window": "--handoff-window",
    "max_pending": "--max-pending",
    "handlers": "--handlers",
}
MARKER_KEYS = ("workers", "server", "startup_timeout", "grace") + tuple(SERVER_FLAGS)


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its source."""


class ClusterSettings(NamedTuple):
    """Everything needed to start one cluster."""

    command: Tuple[str, ...]  # template, placeholders unfilled
    workers: int
    startup_timeout: float
    grace: float
    strategy: Optional[str]  # None for an external target
    is_reference: bool

    def describe(self) -> str:
        return " ".join(shlex.quote(part) for part in self.command)


def reference_command(strategy: str, extra: Mapping[str, Any]) -> Tuple[str, ...]:
    """The reference server's command template (port 0: it reports the port it got)."""
    command = [sys.executable, "-m", "fdcluster_server", "--host", "{host}", "--port", "0",
               "--workers", "{workers}", "--strategy", strategy, "--log-level", "warning"]
    for name, value in extra.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            command += [SERVER_FLAGS[name], str(item)]
    return tuple(command)


# A source is (label, lookup): lookup returns None when the setting is not given there.
Source = Tuple[str, Callable[[str], Any]]


def _first(name: str, sources: Sequence[Source]) -> Tuple[Any, str]:
    for label, lookup in sources:
        value = lookup(name)
        if value is not None and value != "":
            return value, label
    return None, "default"


def _positive(kind: type, name: str, value: Any, source: str) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"Invalid {name} {value!r} from {source}: expected a positive {kind.__name__}") from None
    if number <= 0:
        raise SettingsError(f"Invalid {name} {value!r} from {source}: expected a positive {kind.__name__}")
    return number


def resolve(
    marker: Mapping[str, Any],
    option: Callable[[str], Any],
    ini: Callable[[str], Any],
    ini_label: str = "ini",
) -> ClusterSettings:
    """Resolve every setting; ``option``/``ini`` look a setting up by its short name.

    ``ini_label`` names the configuration file in messages (``pytest.ini``).
    """
    unknown = sorted(set(marker) - set(MARKER_KEYS))
    if unknown:
        raise SettingsError(f"Invalid setting {unknown[0]!r} from marker: known settings are {', '.join(MARKER_KEYS)}")
    sources: Sequence[Source] = [("marker", marker.get), ("--fdcluster-{dashed}", option), ("{ini} (fdcluster_{name})", ini)]

    def lookup(name: str) -> Tuple[Any, str]:
        value, label = _first(name, sources)
        return value, label.format(dashed=name.replace("_", "-"), name=name, ini=ini_label)

    workers, source = lookup("workers")
    workers = DEFAULT_WORKERS if workers is None else _positive(int, "workers", workers, source)
    timeout, source = lookup("startup_timeout")
    timeout = DEFAULT_STARTUP_TIMEOUT if timeout is None else _positive(float, "startup_timeout", timeout, source)
    grace, source = lookup("grace")
    grace = DEFAULT_GRACE if grace is None else _positive(float, "grace", grace, source)
    server, source = lookup("server")
    strategy, strategy_source = lookup("strategy")

    if server is not None:
        command = tuple(shlex.split(server) if isinstance(server, str) else (str(part) for part in server))
        if not command:
            raise SettingsError(f"Invalid server {server!r} from {source}: the command is empty")
        extra = [k for k in SERVER_FLAGS if k in marker]
        if extra:
            raise SettingsError(
                f"Invalid {extra[0]} from marker: reference-server settings do not apply to the external target {server!r}")
        return ClusterSettings(command, workers, timeout, grace, None, False)

    strategy = DEFAULT_STRATEGY if strategy is None else str(strategy)
    if strategy not in STRATEGIES:
        raise SettingsError(f"Invalid strategy {strategy!r} from {strategy_source}: choose one of {', '.join(STRATEGIES)}")
    extra: Dict[str, Any] = {k: marker[k] for k in SERVER_FLAGS if k in marker and k != "strategy"}
    return ClusterSettings(reference_command(strategy, extra), workers, timeout, grace, strategy, True)

