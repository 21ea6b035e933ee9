"""One place that decides each cluster setting: marker, then command line, then ini, then default.

A bad value names where it came from (``Invalid workers 'x' from --fdcluster-workers``),
so a user knows which of the four places to fix.  No pytest import: the
plugin passes in plain lookups.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from fdcluster_server.dispatch import STRATEGIES

# One help text per setting, shared by addoption and addini so they never drift apart.
HELP_SERVER = (
    "command template of the target server, split like a shell would (never run through one); "
    "{port}, {workers} and {host} are filled in (default: the reference server)"
)
HELP_WORKERS = "worker processes per cluster (default: 2)"
HELP_STARTUP_TIMEOUT = "seconds a cluster may take to become ready (default: 15)"
HELP_STRATEGY = f"reference server's dispatch strategy: {', '.join(STRATEGIES)} (default: round-robin)"
HELP_GRACE = "seconds between SIGTERM and SIGKILL at teardown; 0 kills at once (default: 5)"
HELP_READY_LINE = (
    "yes: an external target is ready only once it prints 'fdcluster-ready {json}' on stdout, "
    "for servers whose workers register after the port accepts (default: no; the reference server always does)"
)
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
MARKER_KEYS = ("workers", "server", "startup_timeout", "grace", "ready_line") + tuple(SERVER_FLAGS)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


#: Every bad value is reported as this, then what was expected; ``source`` is one of the
#: labels below, so the user knows which of the four places to fix.
INVALID_VALUE = "Invalid {name} {value!r} from {source}"
SOURCE_MARKER = "marker"
SOURCE_OPTION = "--fdcluster-{dashed}"
SOURCE_INI = "{ini} (fdcluster_{name})"

# The numeric reference-server settings a marker may give, and their kind.
_SERVER_FLAG_KINDS = {
    "max_frame": int,
    "idle_timeout": float,
    "graceful_timeout": float,
    "handoff_window": int,
    "max_pending": int,
}


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
    ready_line: bool = False  # wait for the target's fdcluster-ready line

    def describe(self) -> str:
        """The command template as a shell would show it."""
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


def invalid(name: str, value: Any, source: str, expected: str) -> SettingsError:
    """The error for a bad value: ``Invalid workers 'x' from marker: expected ...``."""
    return SettingsError(f"{INVALID_VALUE.format(name=name, value=value, source=source)}: {expected}")


def _number(kind: type, name: str, value: Any, source: str, allow_zero: bool = False) -> Any:
    """``value`` as a positive (or, with ``allow_zero``, non-negative) int or float."""
    expected = f"expected a {'non-negative' if allow_zero else 'positive'} {'integer' if kind is int else 'number'}"
    # bool is an int, and int(2.5) is 2: neither may pass silently.
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise invalid(name, value, source, expected)
    try:
        number = kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise invalid(name, value, source, expected) from None
    if number != number or number in (float("inf"), float("-inf")) or number < 0 or (number == 0 and not allow_zero):
        raise invalid(name, value, source, expected)
    return number


def _flag(name: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise invalid(name, value, source, "expected yes or no")


def resolve(
    marker: Mapping[str, Any],
    option: Callable[[str], Any],
    ini: Callable[[str], Any],
    ini_label: Union[str, Callable[[str], str]] = "ini",
    marker_label: Union[str, Callable[[str], str]] = SOURCE_MARKER,
) -> ClusterSettings:
    """Resolve every setting: marker, then command line, then ini, then default.

    ``option``/``ini`` look a setting up by its short name (``workers``) and
    return None when it is not set there.  ``ini_label`` names the
    configuration file in messages (``pytest.ini``), or is a function of the
    setting's name, for settings that came from ``-o`` rather than a file;
    ``marker_label`` likewise names where a ``marker`` entry came from (the
    marker, or keywords given to ``fdcluster_factory.start()``).
    """

    def label_of(label: Union[str, Callable[[str], str]], name: str) -> str:
        return label(name) if callable(label) else label

    unknown = sorted(set(marker) - set(MARKER_KEYS))
    if unknown:
        raise SettingsError(f"Invalid setting {unknown[0]!r} from {label_of(marker_label, unknown[0])}: "
                            f"known settings are {', '.join(MARKER_KEYS)}")
    sources: Sequence[Source] = [(SOURCE_MARKER, marker.get), (SOURCE_OPTION, option), (SOURCE_INI, ini)]

    def lookup(name: str) -> Tuple[Any, str]:
        value, label = _first(name, sources)
        if label == SOURCE_MARKER:
            return value, label_of(marker_label, name)
        return value, label.format(dashed=name.replace("_", "-"), name=name, ini=label_of(ini_label, name))

    workers, source = lookup("workers")
    workers = DEFAULT_WORKERS if workers is None else _number(int, "workers", workers, source)
    timeout, source = lookup("startup_timeout")
    timeout = DEFAULT_STARTUP_TIMEOUT if timeout is None else _number(float, "startup_timeout", timeout, source)
    grace, source = lookup("grace")
    grace = DEFAULT_GRACE if grace is None else _number(float, "grace", grace, source, allow_zero=True)
    ready_line, source = lookup("ready_line")
    ready_line = False if ready_line is None else _flag("ready_line", ready_line, source)
    server, source = lookup("server")
    strategy, strategy_source = lookup("strategy")

    if server is not None:
        if isinstance(server, str):
            try:
                command = tuple(shlex.split(server))
            except ValueError as exc:
                raise invalid("server", server, source, f"cannot split it like a shell: {exc}") from None
        elif isinstance(server, (list, tuple)):
            command = tuple(str(part) for part in server)
        else:
            raise invalid("server", server, source, "expected a command string or a list of arguments")
        if not command:
            raise invalid("server", server, source, "the command is empty")
        extra = [k for k in SERVER_FLAGS if k in marker]
        if extra:
            raise SettingsError(
                f"Invalid {extra[0]} from {label_of(marker_label, extra[0])}: reference-server settings do not apply "
                f"to the external target {server!r}")
        return ClusterSettings(command, workers, timeout, grace, None, False, ready_line)

    strategy = DEFAULT_STRATEGY if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise invalid("strategy", strategy, strategy_source, f"choose one of {', '.join(STRATEGIES)}")
    extra: Dict[str, Any] = {}
    for name in SERVER_FLAGS:
        if name == "strategy" or name not in marker:
            continue
        value = marker[name]
        kind = _SERVER_FLAG_KINDS.get(name)
        if kind is not None:
            value = _number(kind, name, value, label_of(marker_label, name))
        extra[name] = value
    return ClusterSettings(reference_command(strategy, extra), workers, timeout, grace, strategy, True, True)
