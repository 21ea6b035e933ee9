"""The conformance matrix: outcomes of the tests per target and module, the failing invariants named.

Every scenario assertion message starts with its invariant's name
(``liveness: ...``), so the text before the first ``:`` names what broke.
Outcomes arrive as plain (test id, target, phase outcome, invariant) facts,
built wherever the test ran and gathered by the process that reports; the
table and the JSON are built from them.  No pytest import.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

MATRIX_TITLE = "fdcluster: target by module"
#: Column heading of the module column.
MODULE_HEADING = "module"
#: Under the table: one line per target and module with failures.
FAILING_LINE = "{target} {module}: {invariants}"
OUTCOMES = ("passed", "failed", "xfailed", "skipped")
#: How the plugin's own failure messages start; the phrase after it names what failed.
PLUGIN_PREFIX = "fdcluster: "
# An invariant's name is a short phrase: words, spaces, digits, hyphens, parentheses.
_INVARIANT = re.compile(r"^[A-Za-z][\w ()/-]{0,60}$")


def invariant_of(message: str, kind: str) -> str:
    """The invariant a failure message names (the text before its first ':'), else the exception's kind."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    if first.startswith(PLUGIN_PREFIX):  # the plugin's own failures: "fdcluster: the cluster did not start"
        first = first[len(PLUGIN_PREFIX):]
        if ":" not in first:
            return first.strip() or kind
    head, colon, _ = first.partition(":")
    head = head.strip()
    if colon and _INVARIANT.match(head) and not head.startswith("assert "):
        return head
    return kind


class Matrix:
    """Outcomes of the tests that ran against a target, one entry per test."""

    def __init__(self) -> None:
        # test id -> {"target", "module", "outcome", "invariant"}
        self.tests: Dict[str, Dict[str, Any]] = {}

    def add(self, test: str, target: str, outcome: str, invariant: Optional[str] = None) -> None:
        """One phase's outcome: a failure in any phase fails the test; a pass counts only without one."""
        entry = self.tests.setdefault(test, {"target": target, "module": test.split("::")[0], "outcome": None,
                                             "invariant": None})
        if entry["outcome"] == "failed":
            return  # the first failure is the one that names the invariant
        if outcome == "failed":
            entry["outcome"], entry["invariant"] = "failed", invariant
        elif outcome != "passed" or entry["outcome"] is None:
            entry["outcome"] = outcome

    @property
    def targets(self) -> List[str]:
        """Targets in the order their first test ran."""
        return list(dict.fromkeys(entry["target"] for entry in self.tests.values()))

    def as_json(self) -> Dict[str, Any]:
        """``{"targets": [...], "modules": {module: {target: {"passed": n, ..., "failing": {invariant: [test]}}}}}``."""
        modules: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for test, entry in self.tests.items():
            if entry["outcome"] is None:
                continue
            cell = modules.setdefault(entry["module"], {}).setdefault(
                entry["target"], {**{outcome: 0 for outcome in OUTCOMES}, "failing": {}})
            cell[entry["outcome"]] += 1
            if entry["outcome"] == "failed":
                cell["failing"].setdefault(entry["invariant"] or "error", []).append(test)
        return {"targets": self.targets, "modules": {module: modules[module] for module in sorted(modules)}}

    def format(self) -> str:
        """The table: a row per module, a column per target; then the failing invariants per target and module."""
        data = self.as_json()
        targets = data["targets"]
        rows = [[MODULE_HEADING, *targets]]
        failing = []
        for module, cells in data["modules"].items():
            row = [module]
            for target in targets:
                cell = cells.get(target)
                row.append(", ".join(f"{cell[o]} {o}" for o in OUTCOMES if cell[o]) if cell else "-")
                if cell and cell["failing"]:
                    invariants = ", ".join(f"{name} ({len(tests)})" for name, tests in cell["failing"].items())
                    failing.append(FAILING_LINE.format(target=target, module=module, invariants=invariants))
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in rows]
        if failing:
            lines += ["failing invariants (tests):", *("  " + line for line in failing)]
        return "\n".join(lines)
