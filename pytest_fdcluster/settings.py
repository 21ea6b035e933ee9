"""One table of cluster settings, and the one function that decides each: marker, command line, ini, default.

Each row of ``SETTINGS`` is everything the plugin knows about a setting: its
parser, its default, its help text (which states the default, so the two
cannot drift), its option flag and ini name, and whether it is a flag of the
reference server.  The plugin's options, ini names and marker keywords are all
generated from the table; ``resolve`` walks it.

A bad value names where it came from (``Invalid workers 'x' from --fdcluster-workers``),
so a user knows which of the four places to fix.  No pytest import: the
plugin passes in plain lookups.
"""

from __future__ import annotations

import functools
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from fdcluster_server.__main__ import build_parser as reference_parser
from fdcluster_server.dispatch import STRATEGIES

from .capabilities import UNKNOWN, Capabilities
from .text import shell_join

#: Every bad value is reported as this, then what was expected; ``source`` is the marker,
#: the option's flag, or the ini file with the ini name (``SOURCE_INI``).
INVALID_VALUE = "Invalid {name} {value!r} from {source}"
SOURCE_MARKER = "marker"
SOURCE_INI = "{ini} ({ini_name})"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: A parser: (setting name, value as given, source label) -> the value to use; raises ``SettingsError``.
Parse = Callable[[str, Any, str], Any]


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its source."""


def invalid(name: str, value: Any, source: str, expected: str) -> SettingsError:
    """The error for a bad value: ``Invalid workers 'x' from marker: expected ...``."""
    return SettingsError(f"{INVALID_VALUE.format(name=name, value=value, source=source)}: {expected}")


# -- parsers ------------------------------------------------------------------------------


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


def positive(kind: type) -> Parse:
    """A parser of positive ints or floats."""
    return functools.partial(_number, kind)


def non_negative(kind: type) -> Parse:
    """A parser of ints or floats that may be zero."""
    return functools.partial(_number, kind, allow_zero=True)


def one_of(choices: Sequence[str]) -> Parse:
    """A parser that accepts only ``choices``."""

    def parse(name: str, value: Any, source: str) -> Any:
        if value not in choices:
            raise invalid(name, value, source, f"choose one of {', '.join(choices)}")
        return value

    return parse


def yes_no(name: str, value: Any, source: str) -> bool:
    """A boolean, or yes/no, true/false, on/off, 1/0 in any case."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise invalid(name, value, source, "expected yes or no")


def command_line(name: str, value: Any, source: str) -> Tuple[str, ...]:
    """A command as a string split like a shell would (never run through one), or a list of arguments."""
    if isinstance(value, str):
        try:
            command = tuple(shlex.split(value))
        except ValueError as exc:
            raise invalid(name, value, source, f"cannot split it like a shell: {exc}") from None
    elif isinstance(value, (list, tuple)):
        command = tuple(str(part) for part in value)
    else:
        raise invalid(name, value, source, "expected a command string or a list of arguments")
    if not command:
        raise invalid(name, value, source, "the command is empty")
    return command


def as_given(name: str, value: Any, source: str) -> Any:
    """No check: the reference server judges the value itself."""
    return value


# -- the table ----------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A default as help text says it: ``2``, ``15``, ``no``, ``round-robin``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Setting:
    """One setting: of each cluster (a keyword of the ``fdcluster`` marker), or of the whole run."""

    name: str
    #: What the value is (int, float, str, bool); the ini type follows from it.
    kind: type
    parse: Parse
    #: Used as is, never parsed; None for "not set".
    default: Any
    #: What it means, without the default: ``help_text`` adds that.
    help: str
    #: It also has a command-line option (``--fdcluster-NAME``) and an ini name (``fdcluster_NAME``).
    option: bool = True
    #: The reference server's flag it becomes; such a setting does not apply to an external target.
    server_flag: Optional[str] = None
    #: How the default reads when its value cannot say it (None).
    default_text: str = ""
    #: Said after the default, in the help's parentheses.
    note: str = ""
    #: A keyword of the ``fdcluster`` marker; the others are settings of the whole run.
    marker: bool = True
    #: The option may be repeated and the ini lists one value per line.
    multiple: bool = False
    #: Something a target has (``fdcluster.capabilities``): the reference server's follows from its flags,
    #: an external target declares it (marker, ``--fdcluster-declare``), else the default applies.
    capability: bool = False

    @property
    def flag(self) -> str:
        return f"--fdcluster-{self.name.replace('_', '-')}"

    @property
    def metavar(self) -> str:
        return self.name.upper()

    @property
    def dest(self) -> str:
        """The option's dest, which is also its ini name."""
        return f"fdcluster_{self.name}"

    @property
    def help_text(self) -> str:
        """Help shared by the option and the ini, with the default: ``worker processes per cluster (default: 2)``."""
        note = f"; {self.note}" if self.note else ""
        return f"{self.help} (default: {self.default_text or _shown(self.default)}{note})"


def _declared_strategy(name: str, value: Any, source: str) -> Any:
    """An external target's strategy: any the reference server has, or unknown."""
    return one_of((*STRATEGIES, UNKNOWN))(name, value, source)


def _declaration(name: str, value: Any, source: str) -> Any:
    """Lines are checked by ``targets.declarations``, which knows the targets."""
    return value


#: The reference server's own defaults, for its capabilities when the marker does not set them.
_REFERENCE_DEFAULTS = reference_parser()
_CAPABILITY_DEFAULTS = Capabilities()
#: What an external target has unless it declares otherwise.
_DECLARED_TEXT = "declared by an external target, else {default}; the reference server's follows from its flags"

#: In the order ``--help`` lists the options.
SETTINGS: Tuple[Setting, ...] = (
    Setting("server", str, command_line, None,
            "target server: a command template split like a shell would (never run through one), {port}, {workers} "
            "and {host} filled in; NAME=COMMAND names it, 'reference' is the bundled server; repeat the option "
            "(ini: one per line) to run every test against each target", default_text="the reference server",
            multiple=True),
    Setting("workers", int, positive(int), 2, "worker processes per cluster"),
    Setting("startup_timeout", float, positive(float), 15.0, "seconds a cluster may take to become ready"),
    Setting("strategy", str, one_of(STRATEGIES), STRATEGIES[0],
            f"reference server's dispatch strategy: {', '.join(STRATEGIES)}; an external target declares its own "
            f"(also {UNKNOWN})", server_flag="--strategy", capability=True),
    Setting("grace", float, non_negative(float), 5.0,
            "seconds between SIGTERM and SIGKILL at teardown; 0 kills at once"),
    Setting("ready_line", bool, yes_no, False,
            "yes: an external target is ready only once it prints 'fdcluster-ready {json}' on stdout, "
            "for servers whose workers register after the port accepts", note="the reference server always does"),
    Setting("declare", str, _declaration, None,
            "declare what an external target has, [TARGET:]CAPABILITY=VALUE (no TARGET: every external target); "
            "capabilities respawns, drains, idle_timeout, max_frame, strategy; repeat the option (ini: one per line)",
            default_text="nothing declared", marker=False, multiple=True),
    Setting("blind_checks", str, one_of(("fail", "skip")), "fail",
            "what a check does when it cannot read a judged process's descriptors (another user's server, a "
            "hardened /proc): fail, or skip naming the pid, user and reason; never pass"),
    Setting("junit_properties", bool, yes_no, False,
            "yes: each cluster's key figures become junit testcase properties, which pytest's default "
            "junit_family xunit2 does not allow (set junit_family = xunit1)", marker=False),
    # Capabilities: marker keywords and declarations.
    Setting("respawns", bool, yes_no, True, "the target replaces dead workers",
            option=False, capability=True),
    Setting("drains", bool, yes_no, True,
            "on SIGTERM the target answers requests already sent, then exits 0", option=False, capability=True),
    # Marker only: passed through to the reference server, whose own defaults apply when absent.
    Setting("max_frame", int, positive(int), None, "largest request frame in bytes",
            option=False, server_flag="--max-frame", capability=True,
            default_text=_DECLARED_TEXT.format(default=f"{_CAPABILITY_DEFAULTS.max_frame}")),
    Setting("idle_timeout", float, positive(float), None,
            "seconds before a connection whose incomplete frame is that old is closed",
            option=False, server_flag="--idle-timeout", capability=True,
            default_text=_DECLARED_TEXT.format(default="unknown")),
    Setting("graceful_timeout", float, positive(float), None,
            "seconds workers may finish in-flight requests after SIGTERM",
            option=False, server_flag="--graceful-timeout", default_text="the server's"),
    Setting("handoff_window", int, positive(int), None, "unacknowledged handoffs per worker before it is skipped",
            option=False, server_flag="--handoff-window", default_text="the server's"),
    Setting("max_pending", int, positive(int), None,
            "accepted connections waiting for a worker before accepting pauses",
            option=False, server_flag="--max-pending", default_text="the server's"),
    Setting("handlers", str, as_given, None, "handler module (MODULE[:NAME]), or a list of them, adding RPC methods",
            option=False, server_flag="--handlers", default_text="none"),
)
BY_NAME: Dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
#: Flags of the reference server that declare nothing: they make an external target's marker invalid.
REFERENCE_ONLY: Tuple[Setting, ...] = tuple(s for s in SETTINGS if s.server_flag is not None and not s.capability)
#: Every setting that becomes a flag of the reference server, in the order its command line gets them.
SERVER_FLAGS: Tuple[Setting, ...] = tuple(s for s in SETTINGS if s.server_flag is not None)
CAPABILITY_SETTINGS: Tuple[Setting, ...] = tuple(s for s in SETTINGS if s.capability)
#: The marker's named parameters; the other settings are its ``**settings``.
MARKER_SIGNATURE = ("workers", "server")
#: The named parameters, then the settings for any target, then the reference server's.
MARKER_KEYS: Tuple[str, ...] = MARKER_SIGNATURE + tuple(
    s.name for s in SETTINGS if s.marker and s.server_flag is None and s.name not in MARKER_SIGNATURE
) + tuple(s.name for s in SERVER_FLAGS)


class ClusterSettings(NamedTuple):
    """Everything needed to start one cluster."""

    command: Tuple[str, ...]  # template, placeholders unfilled
    workers: int
    startup_timeout: float
    grace: float
    strategy: Optional[str]  # None for an external target
    is_reference: bool
    ready_line: bool = False  # wait for the target's fdcluster-ready line
    target: str = "reference"  # the target's name, in test ids of a run with several
    capabilities: Capabilities = _CAPABILITY_DEFAULTS
    blind_checks: str = "fail"  # a check that cannot see: "fail", or "skip" (never a pass)

    def describe(self) -> str:
        """The command template as a shell would show it."""
        return shell_join(self.command)


def reference_command(strategy: str, extra: Mapping[str, Any]) -> Tuple[str, ...]:
    """The reference server's command template (port 0: it reports the port it got)."""
    command = [sys.executable, "-m", "fdcluster_server", "--host", "{host}", "--port", "0",
               "--workers", "{workers}", "--strategy", strategy, "--log-level", "warning"]
    for name, value in extra.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            command += [str(BY_NAME[name].server_flag), str(item)]
    return tuple(command)


# -- resolution ---------------------------------------------------------------------------

Label = Union[str, Callable[[str], str]]


def _unset(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, (list, tuple)) and not value)


def _entries(value: Any) -> Optional[List[Any]]:
    """A repeatable setting's values: a plain lookup may give one string, pytest gives a list."""
    if _unset(value):
        return None
    return [value] if isinstance(value, str) else list(value)


def label_of(label: Label, name: str) -> str:
    """A label, or a label function applied to ``name``."""
    return label(name) if callable(label) else label


def ini_source(ini_label: Label, setting: Setting) -> str:
    """``pytest.ini (fdcluster_workers)``: where an ini value came from."""
    return SOURCE_INI.format(ini=label_of(ini_label, setting.dest), ini_name=setting.dest)


def run_setting(name: str, option: Callable[[str], Any], ini: Callable[[str], Any], ini_label: Label = "ini") -> Any:
    """A setting of the whole run (not a marker keyword): command line, then ini, then default."""
    setting = BY_NAME[name]
    value, source = option(setting.dest), setting.flag
    if _unset(value):
        value, source = ini(setting.dest), ini_source(ini_label, setting)
    return setting.default if _unset(value) else setting.parse(name, value, source)


def resolve(
    marker: Mapping[str, Any],
    option: Callable[[str], Any],
    ini: Callable[[str], Any],
    ini_label: Label = "ini",
    marker_label: Label = SOURCE_MARKER,
    target: Optional[str] = None,
) -> ClusterSettings:
    """Resolve every setting: marker, then command line, then ini, then default.

    ``marker`` maps a setting's name to its value.  ``option`` and ``ini``
    look a setting up by its ``dest`` (``fdcluster_workers``) and return None
    when it is not set there.  ``ini_label`` names the configuration file in
    messages (``pytest.ini``), or is a function of the ini name, for settings
    that came from ``-o`` rather than a file; ``marker_label`` likewise names
    where a ``marker`` entry came from (the marker, or keywords given to
    ``fdcluster_factory.start()``), as a function of the setting's name.
    ``target`` names one of the run's targets (default: the first); the
    marker's ``server`` replaces it.
    """
    from . import targets as run_targets  # it builds on this module's parsers

    unknown = sorted(set(marker) - set(MARKER_KEYS))
    if unknown:
        raise SettingsError(f"Invalid setting {unknown[0]!r} from {label_of(marker_label, unknown[0])}: "
                            f"known settings are {', '.join(MARKER_KEYS)}")

    def given(setting: Setting) -> Tuple[Any, Optional[str]]:
        """The value as given and where from, or (None, None) when nothing gives it."""
        if not setting.option:  # marker only: present means given, whatever the value
            if setting.name in marker:
                return marker[setting.name], label_of(marker_label, setting.name)
            return None, None
        value, source = marker.get(setting.name), label_of(marker_label, setting.name)
        if _unset(value):
            value, source = option(setting.dest), setting.flag
        if _unset(value):
            value, source = ini(setting.dest), ini_source(ini_label, setting)
        return (None, None) if _unset(value) else (value, source)

    def value_of(setting: Setting) -> Any:
        value, source = given(setting)
        return setting.default if source is None else setting.parse(setting.name, value, source)

    # Settings for any target first, so a bad one is reported whichever the target.
    common = {s.name: value_of(s) for s in SETTINGS if s.marker and s.server_flag is None and not s.capability
              and s.name != "server"}
    workers, timeout, grace = common["workers"], common["startup_timeout"], common["grace"]
    server = BY_NAME["server"]
    configured = run_targets.configured_targets(
        _entries(option(server.dest)), _entries(ini(server.dest)), server.flag, ini_source(ini_label, server))
    declare = BY_NAME["declare"]
    declared_by_target = run_targets.declarations(
        configured, _entries(option(declare.dest)), _entries(ini(declare.dest)), ini_source(ini_label, declare))
    if not _unset(marker.get("server")):
        chosen = run_targets.parse_targets([marker["server"]], label_of(marker_label, "server"))[0]
    else:
        by_name = {t.name: t for t in configured}
        if target is not None and target not in by_name:
            raise SettingsError(f"Invalid target {target!r}: the run's targets are {', '.join(by_name)}")
        chosen = by_name[target] if target is not None else configured[0]
    in_marker = {s.name: (marker[s.name], label_of(marker_label, s.name)) for s in CAPABILITY_SETTINGS
                 if s.name in marker}

    if chosen.command is not None:
        misplaced = [s.name for s in REFERENCE_ONLY if s.name in marker]
        if misplaced:
            raise SettingsError(
                f"Invalid {misplaced[0]} from {label_of(marker_label, misplaced[0])}: reference-server settings "
                f"do not apply to the external target {marker.get('server') or shell_join(chosen.command)!r}")
        # Marker, then declarations (for this target, then for all), then what any target is assumed to have.
        sources = {**declared_by_target.get(chosen.name, {}), **in_marker}
        capabilities = Capabilities(**{
            s.name: (_declared_strategy if s.name == "strategy" else s.parse)(s.name, *sources[s.name])
            for s in CAPABILITY_SETTINGS if s.name in sources})
        return ClusterSettings(chosen.command, workers, timeout, grace, None, False, common["ready_line"],
                               chosen.name, capabilities, common["blind_checks"])

    strategy = value_of(BY_NAME["strategy"])
    # The strategy has its own place in the command; the others are passed only when the marker gives them.
    extra = {s.name: value_of(s) for s in SERVER_FLAGS if s.name != "strategy" and s.name in marker}
    declared = {s.name: s.parse(s.name, *in_marker[s.name]) for s in CAPABILITY_SETTINGS
                if s.name in in_marker and s.server_flag is None}
    capabilities = Capabilities(
        strategy=strategy,
        idle_timeout=extra.get("idle_timeout", _REFERENCE_DEFAULTS.get_default("idle_timeout")),
        max_frame=extra.get("max_frame", _REFERENCE_DEFAULTS.get_default("max_frame")),
        **declared)
    return ClusterSettings(reference_command(strategy, extra), workers, timeout, grace, strategy, True, True,
                           chosen.name, capabilities, common["blind_checks"])


def resolve_all(option: Callable[[str], Any], ini: Callable[[str], Any],
                ini_label: Label = "ini") -> Dict[str, ClusterSettings]:
    """Every target of the run by name, resolved without a marker: how the command line and ini are checked."""
    from . import targets as run_targets

    server = BY_NAME["server"]
    configured = run_targets.configured_targets(
        _entries(option(server.dest)), _entries(ini(server.dest)), server.flag, ini_source(ini_label, server))
    return {target.name: resolve({}, option, ini, ini_label, target=target.name) for target in configured}
