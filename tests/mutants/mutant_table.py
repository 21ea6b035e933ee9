"""The mutation matrix as text: a Markdown table of variant by module, and the failing tests of each cell.

Built from the rows ``test_matrix.py`` records (``mutant_runs.judge``); used
by conftest.py for the terminal summary and by ``update_readme.py`` for the
README, so both show the same table.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from mutant_expectations import EXPECTED, MODULES

NOT_RUN = "·"
DETAIL = 240  # characters of a MISSED or BROKEN row's reason shown
VERDICTS = {"caught": "caught", "missed": "MISSED", "broken": "BROKEN", "baseline": "baseline",
            "owner missing": "owner missing"}


def ordered(rows: Mapping[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``none`` first, then the variants in ``EXPECTED``'s order (then any unknown ones)."""
    order = ["none", *EXPECTED]
    return sorted(rows.values(), key=lambda row: order.index(row["variant"]) if row["variant"] in order else 999)


def cell(row: Dict[str, Any], module: str) -> str:
    """``pass 3``, ``FAIL* 2/5`` (the owner's catch), ``FAIL 1/1`` (collateral), or ``·`` (not run)."""
    outcome = row.get("modules", {}).get(module)
    if outcome is None:
        return NOT_RUN
    failed = len(outcome["failed"])
    ran = failed + outcome["passed"]
    if not failed:
        return f"pass {ran}" if ran else "skip"
    owner = row.get("owner") == module
    mark = "*" if owner and row.get("status") == "caught" else ""
    return f"FAIL{mark} {failed}/{ran}"


def markdown(rows: Mapping[str, Dict[str, Any]]) -> str:
    """The table: one row per variant, one column per scenario module, the verdict and the seconds it took."""
    short = [module.replace("test_", "", 1) for module in MODULES]
    lines = ["| variant | owner | verdict | " + " | ".join(short) + " | s |",
             "|---" * (len(MODULES) + 4) + "|"]
    for row in ordered(rows):
        owner = row.get("owner", "").replace("test_", "", 1) or "—"
        verdict = VERDICTS.get(row.get("status", ""), row.get("status", "?"))
        cells = " | ".join(cell(row, module) for module in MODULES)
        lines.append(f"| {row['variant']} | {owner} | {verdict} | {cells} | {row.get('seconds', '')} |")
    return "\n".join(lines)


def failing_tests(rows: Mapping[str, Dict[str, Any]], owner_only: bool = False) -> List[str]:
    """One line per variant and module with failures: ``variant module: test (invariant), ...``."""
    lines = []
    for row in ordered(rows):
        for module, outcome in sorted(row.get("modules", {}).items()):
            if outcome["failed"] and (not owner_only or module == row.get("owner")):
                lines.append(f"- {row['variant']} / {module}: " + ", ".join(outcome["failed"]))
        if row.get("status") in ("missed", "broken") and row.get("detail"):
            detail = row["detail"] if len(row["detail"]) <= DETAIL else row["detail"][:DETAIL] + " ..."
            lines.append(f"- {row['variant']}: {row['status'].upper()}: {detail}")
    return lines
