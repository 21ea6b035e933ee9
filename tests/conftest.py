"""Prints the mutation matrix (variant by scenario module, with the failing tests) after the mutation tests ran.

Here, not in tests/mutants/, so that the process that prints the summary has
these hooks whatever it was asked to run: under pytest-xdist the controller
loads only the conftest files of its arguments and their parents (CI runs
``pytest -n 2`` over tests/).  With ``FDCLUSTER_MUTANTS_JSON=PATH`` the rows are
also written there as JSON, which ``update_readme.py`` turns into the README's table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent / "mutants"))

from mutant_expectations import JSON_VARIABLE  # noqa: E402
from mutant_table import failing_tests, markdown  # noqa: E402

_rows: Dict[str, Dict[str, Any]] = {}


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    for key, value in report.user_properties:
        if key == "mutation_row":
            row = json.loads(value) if isinstance(value, str) else value
            _rows[row["variant"]] = row


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    terminalreporter.write_sep("=", "mutation matrix (FAIL* = caught by the module meant to catch it; · = not run)")
    terminalreporter.write_line(markdown(_rows))
    for line in failing_tests(_rows):
        terminalreporter.write_line(line)
    path = os.environ.get(JSON_VARIABLE)
    if path:
        with open(path, "w") as out:
            json.dump(_rows, out, indent=1, sort_keys=True)
