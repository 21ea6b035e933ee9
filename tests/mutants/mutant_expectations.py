"""What the mutation matrix expects: the scenario modules, the owner of each variant's bug, the smoke subset.

``MODULES`` is discovered from ``scenarios/test_*.py``, so a new scenario
module appears in the matrix by itself.  ``EXPECTED`` maps each variant of
``mutants.py`` to the module meant to catch its bug and the invariant names
its failure message must carry (the text before the first ``:``, or a name
the message contains).  The checks of ``pytest_fdcluster.checks`` name their
own invariants (``fd growth``, ``round-robin`` ...), hence several names for
some owners.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
#: ``FDCLUSTER_MUTANTS_FULL=1``: every variant runs every module (the README's table), not owner plus smoke.
FULL_VARIABLE = "FDCLUSTER_MUTANTS_FULL"
#: A path: the matrix is also written there as JSON (``update_readme.py`` reads it).
JSON_VARIABLE = "FDCLUSTER_MUTANTS_JSON"


def discover_modules() -> List[str]:
    """The scenario modules, by name, sorted."""
    return sorted(path.stem for path in SCENARIOS.glob("test_*.py"))


MODULES = discover_modules()


class Expectation(NamedTuple):
    """The module meant to catch a variant's bug, and the invariant names one of its failures must carry."""

    module: str
    invariants: Tuple[str, ...]


EXPECTED: Dict[str, Expectation] = {
    "master-keeps-fds": Expectation("test_descriptor_leaks", ("master holds clients",)),
    "close-wait": Expectation("test_descriptor_leaks", ("close-wait",)),
    "no-respawn": Expectation("test_worker_kills", ("liveness",)),
    "unfair-dispatch": Expectation("test_load_balance", ("load balance", "round-robin", "fairness")),
    "single-recv": Expectation("test_partial_reads", ("framing",)),
    "synchronous-worker": Expectation("test_slow_clients", ("isolation",)),
    "dies-on-bad-json": Expectation("test_bad_input", ("robustness",)),
    "lost-handoff": Expectation("test_worker_kills", ("nothing lost",)),
    "dup-fds": Expectation("test_descriptor_leaks", ("fd growth",)),
    "steal-stalled-handoffs": Expectation("test_ownership", ("exactly one holder",)),
    "stale-turn-deadline": Expectation("test_quiescence", ("quiescence",)),
    "reads-past-high-water": Expectation("test_memory", ("bounded memory",)),
    "no-accept-backoff": Expectation("test_descriptor_exhaustion", ("descriptor exhaustion",)),
    "spawn-failure-crashes": Expectation("test_descriptor_exhaustion", ("descriptor exhaustion",)),
    "truncated-handoff-dropped": Expectation("test_descriptor_exhaustion", ("descriptor exhaustion",)),
    "drain-skips-queued": Expectation("test_graceful_stop", ("graceful stop",)),
    "worker-term-is-fast": Expectation("test_graceful_stop", ("graceful stop",)),
    "graceful-exit-nonzero": Expectation("test_graceful_stop", ("graceful stop",)),
    "sweep-spares-channels": Expectation("test_every_process", ("every process judged",)),
    "master-keeps-dead-channel": Expectation("test_every_process", ("every process judged",)),
    "recursion-escapes": Expectation("test_hostile_input", ("hostile input",)),
    "respawn-budget-never-refilled": Expectation("test_repeated_faults", ("repeated faults",)),
    "random-dispatch": Expectation("test_load_balance", ("load balance", "round-robin", "fairness")),
}

#: Variants the suite detects but does not yet count as caught, with why: their test is a strict xfail, so the
#: day the owner's failure names its invariant the XPASS fails and the entry must go.
KNOWN_GAPS: Dict[str, str] = {}

#: Run against every variant besides its owner's module: cheap tests of plain service, so a mutant that breaks
#: everything shows, and the CI table has a cell per module family.  Node ids, relative to the project root.
SMOKE = (
    "scenarios/test_bad_input.py::test_unknown_method_is_an_error_not_a_result",
    "scenarios/test_partial_reads.py::test_prefix_apart_from_body",
    "scenarios/test_descriptor_leaks.py::test_master_holds_no_client_sockets_after_handoff",
)


def full_run() -> bool:
    return os.environ.get(FULL_VARIABLE, "") not in ("", "0", "no")


def selection(variant: str, full: bool) -> List[str]:
    """What to run against ``variant``: every module for ``none`` or a full run, else its owner's plus the smoke."""
    if variant == "none" or full:
        return [f"scenarios/{module}.py" for module in MODULES]
    owner = f"scenarios/{EXPECTED[variant].module}.py"
    return [owner] + [node for node in SMOKE if not node.startswith(owner + "::")]
