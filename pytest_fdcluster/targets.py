"""The targets of a run and what each declares: ``--fdcluster-server`` entries and ``--fdcluster-declare`` lines.

A target entry is ``NAME=COMMAND``, a bare ``COMMAND`` (named from its
executable and script: ``node x/node_handoff_server.js ...`` is
``node_handoff_server``, ``python -m fdcluster_server`` is
``fdcluster_server``), or the word ``reference`` for the bundled server.  A
declaration is ``[TARGET:]CAPABILITY=VALUE``; without a target it is for every
external target.  No pytest import: the plugin passes in plain values and
their sources, and turns a ``SettingsError`` into a usage error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .capabilities import NAMES as CAPABILITY_NAMES
from .settings import SettingsError, command_line

#: The word that names the bundled reference server, alone or as ``NAME=reference``.
REFERENCE = "reference"
_NAMED = re.compile(r"^([A-Za-z0-9_.-]+)=(.*)$", re.S)
_DECLARATION = re.compile(r"^(?:([A-Za-z0-9_.-]+):)?([A-Za-z_]+)=(.*)$", re.S)
# An executable that runs a script: the script (or -m module) names the target, not the interpreter.
_INTERPRETER = re.compile(r"^(python|pypy|node|nodejs|deno|bun|ruby|perl|php|lua|bash|sh|java)[\d.]*$")
#: A declaration's source when it came from the command line; the ini's is ``SOURCE_INI`` with ``fdcluster_declare``.
DECLARE_FLAG = "--fdcluster-declare"


@dataclass(frozen=True)
class Target:
    """One server the tests run against."""

    name: str
    #: The command template; None for the bundled reference server.
    command: Optional[Tuple[str, ...]]
    #: Where it was given, for messages.
    source: str

    @property
    def is_reference(self) -> bool:
        return self.command is None


#: The target of a run that names none.
DEFAULT_TARGET = Target(REFERENCE, None, "default")


def name_from_command(command: Sequence[str]) -> str:
    """A name from the script, module or executable: ``node x/node_handoff_server.js`` is ``node_handoff_server``."""
    executable = os.path.basename(command[0])
    if _INTERPRETER.match(executable):
        args = list(command[1:])
        for index, arg in enumerate(args):
            if arg == "-m" and index + 1 < len(args):
                return args[index + 1]
            if not arg.startswith("-"):
                return os.path.splitext(os.path.basename(arg))[0] or executable
    return os.path.splitext(executable)[0] or "target"


def parse_entry(value: Any, source: str) -> Tuple[Optional[str], Optional[Tuple[str, ...]]]:
    """(explicit name or None, command or None for the reference server) of one entry."""
    if isinstance(value, str):
        text = value.strip()
        named = _NAMED.match(text)
        name = None
        if named:
            name, text = named.group(1), named.group(2).strip()
        if text == REFERENCE:
            return name, None
        return name, command_line("server", text, source)
    return None, command_line("server", value, source)


def parse_targets(entries: Sequence[Any], source: str) -> Tuple[Target, ...]:
    """The targets of ``entries``, every one named, no two alike; raises ``SettingsError`` naming ``source``."""
    parsed = [(value, *parse_entry(value, source)) for value in entries]
    explicit = [name for _, name, _ in parsed if name is not None]
    for name in explicit:
        if explicit.count(name) > 1:
            raise SettingsError(f"Invalid server {name!r} from {source}: two targets are named {name!r}")
    taken = set(explicit)
    targets: List[Target] = []
    for _, given, command in parsed:
        if given is not None:
            targets.append(Target(given, command, source))
            continue
        base = REFERENCE if command is None else name_from_command(command)
        name, n = base, 1
        while name in taken:  # several bare commands with the same script: node_server, node_server-2
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        targets.append(Target(name, command, source))
    return tuple(targets)


def configured_targets(option_entries: Optional[Sequence[Any]], ini_entries: Optional[Sequence[Any]],
                       option_source: str, ini_source: str) -> Tuple[Target, ...]:
    """The run's targets: the command line's entries, else the ini's, else the reference server."""
    if option_entries:
        return parse_targets(option_entries, option_source)
    if ini_entries:
        return parse_targets(ini_entries, ini_source)
    return (DEFAULT_TARGET,)


Declared = Dict[str, Tuple[Any, str]]


def declarations(targets: Sequence[Target], option_lines: Optional[Sequence[str]],
                 ini_lines: Optional[Sequence[str]], ini_source: str) -> Dict[str, Declared]:
    """Target name -> {capability: (value as written, source)}; the command line's lines win over the ini's.

    A line for one target wins over a line for every target.  Values are parsed
    later, by the setting's parser, so a bad one is reported with its source.
    """
    by_name = {target.name: target for target in targets}
    result: Dict[str, Declared] = {target.name: {} for target in targets if not target.is_reference}
    for lines, source in ((ini_lines or (), ini_source), (option_lines or (), DECLARE_FLAG)):
        general: Declared = {}
        specific: Dict[str, Declared] = {}
        for line in lines:
            text = line.strip()
            match = _DECLARATION.match(text)
            if not match:
                raise SettingsError(f"Invalid declaration {text!r} from {source}: expected [TARGET:]CAPABILITY=VALUE, "
                                    f"e.g. node:idle_timeout=5")
            name, capability, value = match.group(1), match.group(2), match.group(3).strip()
            if capability not in CAPABILITY_NAMES:
                raise SettingsError(f"Invalid declaration {text!r} from {source}: capabilities are "
                                    f"{', '.join(CAPABILITY_NAMES)}")
            if name is not None and name not in by_name:
                raise SettingsError(f"Invalid declaration {text!r} from {source}: no target named {name!r}; "
                                    f"targets are {', '.join(by_name)}")
            if name is not None and by_name[name].is_reference:
                raise SettingsError(f"Invalid declaration {text!r} from {source}: the reference server's capabilities "
                                    "follow from its settings (the marker's idle_timeout=..., --fdcluster-strategy)")
            (specific.setdefault(name, {}) if name is not None else general)[capability] = (value, source)
        for target_name, declared in result.items():
            declared.update(general)
            declared.update(specific.get(target_name, {}))
    return result
