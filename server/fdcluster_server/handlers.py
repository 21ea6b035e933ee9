"""RPC methods: the built-in ones and loading users' own from ``--handlers``.

A handler is a callable taking ``params`` and returning the result; the
response's ``out`` is ``"ok"`` unless the handler returns a ``Reply``.  A user's
module exposes a mapping of method names to handlers, by default as
``HANDLERS``: ``--handlers mypkg.rpc`` or ``--handlers mypkg.rpc:METHODS``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, NamedTuple

Handler = Callable[[Any], Any]
DEFAULT_ATTRIBUTE = "HANDLERS"
OUT_OK = "ok"


class Reply(NamedTuple):
    """A handler's result with an explicit ``out`` field."""

    out: str
    result: Any


class HandlerSpecError(ValueError):
    """A ``--handlers`` value that does not name a usable mapping of handlers."""


def ping(params: Any) -> Reply:
    return Reply("pong", params)


def echo(params: Any) -> Reply:
    return Reply("echo", params)


def whoami(params: Any) -> Reply:
    """Which process answered: lets a test that owns the target tell workers apart."""
    return Reply("whoami", {"pid": os.getpid(), "ppid": os.getppid()})


BUILTINS: Dict[str, Handler] = {"ping": ping, "echo": echo, "whoami": whoami}


def load(spec: str) -> Dict[str, Handler]:
    """Import ``module[:ATTRIBUTE]`` and return its handlers, validated."""
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or DEFAULT_ATTRIBUTE
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import error of the user's module, whatever it is
        raise HandlerSpecError(f"cannot import handlers module {module_name!r}: {exc!r}") from None
    try:
        table = getattr(module, attribute)
    except AttributeError:
        raise HandlerSpecError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(table, dict):
        raise HandlerSpecError(f"{spec}: expected a dict of method name -> callable, got {type(table).__name__}")
    for name, handler in table.items():
        if not isinstance(name, str) or not callable(handler):
            raise HandlerSpecError(f"{spec}: entry {name!r} is not a method name mapped to a callable")
    return dict(table)


def build(specs: list[str]) -> Dict[str, Handler]:
    """The built-ins overlaid with every user module, later ones winning."""
    table = dict(BUILTINS)
    for spec in specs:
        table.update(load(spec))
    return table
