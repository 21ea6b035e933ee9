"""What a target declares it can do, and ``require``: a scenario's way to say what it needs.

A scenario that depends on a capability (an idle timeout, a strategy) calls
``require(fdcluster, "idle_timeout")`` and gets the declared value.  When the
target did not declare it, the test fails (never skips) with the exact
declaration that would state it, so a green run never hides a check that did
not happen.  No pytest import: a plain ``AssertionError`` fails any test.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

# The reference server's default (1 MiB), also what any target is assumed to accept unless it declares otherwise.
from fdcluster_server.protocol import DEFAULT_MAX_FRAME

#: The strategy of a target that did not say how it dispatches.
UNKNOWN = "unknown"

#: How each capability's value is written in a declaration, for messages.
VALUE_HINTS = {
    "respawns": "yes",
    "drains": "yes",
    "idle_timeout": "SECONDS",
    "max_frame": "BYTES",
    "strategy": "STRATEGY",
}
#: Why a test failed: the target's declarations do not give what the scenario needs.
#: It starts with the name the target matrix lists it under: ``idle_timeout not declared``.
CAPABILITY_MISSING = ("{capability} not declared: target {target!r} {state}; this test needs {capability}{wanted}: "
                      "declare it with --fdcluster-declare {target}:{capability}={hint} "
                      "or @pytest.mark.fdcluster({capability}=...)")


@dataclass(frozen=True)
class Capabilities:
    """What one target has, as declared (or, for the reference server, as started)."""

    #: Dead workers are replaced.
    respawns: bool = True
    #: SIGTERM lets in-flight requests finish, and the process exits 0.
    drains: bool = True
    #: Seconds after which an idle or incomplete-frame connection is closed; None: unknown, or never.
    idle_timeout: Optional[float] = None
    #: Largest frame body accepted, in bytes.
    max_frame: int = DEFAULT_MAX_FRAME
    #: How connections reach workers: round-robin, least-connections, shared-accept, or unknown.
    strategy: str = "round-robin"


NAMES = tuple(field.name for field in fields(Capabilities))


class CapabilityMissing(AssertionError):
    """A scenario needs a capability its target did not declare."""


def _lookup(subject: Any) -> tuple:
    """(target name, Capabilities) of a Cluster, the ``fdcluster_factory``, or a ClusterSettings."""
    settings = getattr(subject, "settings", subject)
    capabilities = getattr(settings, "capabilities", None)
    if not isinstance(capabilities, Capabilities):
        raise TypeError(f"require() needs a cluster, the fdcluster_factory or cluster settings, not {subject!r}")
    return getattr(settings, "target", "") or "TARGET", capabilities


def require(subject: Any, capability: str, value: Any = None) -> Any:
    """The declared value of ``capability`` for ``subject``'s target; fails the test when it is not declared.

    ``subject`` is a Cluster, the ``fdcluster_factory`` or ClusterSettings.
    Not declared means: a boolean capability declared ``no``, an unknown idle
    timeout or strategy, or (with ``value``) a declared value other than
    ``value``.
    """
    __tracebackhide__ = True
    if capability not in NAMES:
        raise ValueError(f"unknown capability {capability!r}: choose one of {', '.join(NAMES)}")
    target, capabilities = _lookup(subject)
    declared = getattr(capabilities, capability)
    if value is not None:
        ok, wanted = declared == value, f"={value}"
    elif isinstance(declared, bool):
        ok, wanted = declared, "=yes"
    else:
        ok, wanted = declared is not None and declared != UNKNOWN, ""
    if not ok:
        shown = "no" if declared is False else declared
        state = (f"does not declare {capability}" if declared is None
                 else f"declares {capability}={shown}")
        hint = str(value) if value is not None else VALUE_HINTS[capability]
        raise CapabilityMissing(CAPABILITY_MISSING.format(target=target, state=state, capability=capability,
                                                          wanted=wanted, hint=hint))
    return declared
