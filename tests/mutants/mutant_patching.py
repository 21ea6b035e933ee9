"""How a mutant breaks the reference server: replace one method or one constant, refusing what no longer exists.

Used by the bug modules (``master_bugs``, ``worker_bugs``) before the master
forks, so workers inherit the patches.  A patch point that was renamed or
moved must fail loudly at start-up (a broken mutant), never run the unbroken
server under a broken name.
"""

from __future__ import annotations

from typing import Any, Callable, List

#: References that keep "leaked" sockets and descriptors from being closed by the garbage collector.
kept: List[Any] = []


def replace(owner: type, name: str, replacement: Callable) -> None:
    """Make the server call ``replacement`` where it calls ``owner.name``."""
    if not callable(getattr(owner, name, None)):
        raise AttributeError(f"{owner.__qualname__}.{name} does not exist: this mutant would patch nothing")
    setattr(owner, name, replacement)


def replace_global(module: Any, name: str, replacement: Any) -> None:
    """Rebind ``module.name`` (a function or a constant the module's own code looks up at call time)."""
    if not hasattr(module, name):
        raise AttributeError(f"{module.__name__}.{name} does not exist: this mutant would patch nothing")
    setattr(module, name, replacement)
