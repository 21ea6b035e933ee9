"""Prints the mutation matrix (variant by scenario module) after the mutation tests ran."""

from __future__ import annotations

import ast

from test_matrix import EXPECTED, MODULES

_rows = {}


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == "mutation_row":
            row = value if isinstance(value, dict) else ast.literal_eval(value)
            _rows[row["variant"]] = row["outcome"]


def format_matrix(rows) -> str:
    """Markdown table: FAIL where a module caught the variant (marked * where expected)."""
    short = [m.replace("test_", "") for m in MODULES]
    lines = ["| variant | " + " | ".join(short) + " |", "|---" * (len(MODULES) + 1) + "|"]
    for variant in EXPECTED:
        if variant not in rows:
            continue
        cells = []
        for module in MODULES:
            fails, passes = rows[variant][module]
            mark = "*" if module in EXPECTED[variant] else ""
            cells.append(f"FAIL{mark} ({fails})" if fails else "pass")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if _rows:
        terminalreporter.write_sep("=", "mutation matrix (FAIL* = the module meant to catch it)")
        terminalreporter.write_line(format_matrix(_rows))
