"""What a benchmark reports: figures with their baseline and target, the table, the JSON document."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

#: Column headers of the printed table.
COLUMNS = ("benchmark", "figure", "value", "baseline", "ratio", "target", "met")


@dataclass
class Figure:
    """One measured figure, its baseline from the same run, and its target if the issue names one."""

    benchmark: str
    name: str
    value: float
    unit: str
    #: What the value is compared with, measured in the same run (None: no baseline).
    baseline: Optional[float] = None
    baseline_name: str = ""
    #: The target as the table shows it ("<= 1.25x floor"); empty when there is none.
    target: str = ""
    #: Whether the target is met; None when there is no target or it could not be judged.
    met: Optional[bool] = None
    #: Anything a reader needs to interpret the value (what limits it, what was skipped).
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        """value / baseline, when both are there."""
        if self.baseline is None or not self.baseline or _bad(self.value) or _bad(self.baseline):
            return None
        return self.value / self.baseline

    def as_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return {key: (None if isinstance(value, float) and _bad(value) else value) for key, value in data.items()}


def _bad(value: Any) -> bool:
    return isinstance(value, float) and (math.isnan(value) or math.isinf(value))


def at_most(value: float, limit: float) -> Optional[bool]:
    """value <= limit, or None when value is not a number."""
    return None if _bad(value) else value <= limit


def below(value: float, limit: float) -> Optional[bool]:
    """value < limit, or None when value is not a number."""
    return None if _bad(value) else value < limit


def at_least(value: float, limit: float) -> Optional[bool]:
    """value >= limit, or None when value is not a number."""
    return None if _bad(value) else value >= limit


def format_value(value: Optional[float], unit: str = "") -> str:
    """A number with 3 significant digits (no exponent below a million) and its unit."""
    if value is None or _bad(value):
        return "-"
    if abs(value) >= 100 or value == int(value):
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text}x" if unit == "x" else f"{text} {unit}".strip()


def table_rows(figures: Sequence[Figure]) -> List[List[str]]:
    rows = []
    for figure in figures:
        baseline = "-"
        if figure.baseline is not None:
            baseline = f"{format_value(figure.baseline, figure.unit)} ({figure.baseline_name})"
        ratio = figure.ratio
        rows.append([
            figure.benchmark,
            figure.name,
            format_value(figure.value, figure.unit),
            baseline,
            "-" if ratio is None else f"{ratio:.2f}x",
            figure.target or "-",
            {True: "yes", False: "NO", None: "-"}[figure.met],
        ])
    return rows


def format_table(figures: Sequence[Figure], markdown: bool = False) -> str:
    """The table of figures, aligned for a terminal or as Markdown."""
    rows = table_rows(figures)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(COLUMNS[i]), *(len(row[i]) for row in rows)) if rows else len(COLUMNS[i])
              for i in range(len(COLUMNS))]
    lines = ["  ".join(COLUMNS[i].ljust(widths[i]) for i in range(len(COLUMNS)))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(row[i].ljust(widths[i]) for i in range(len(COLUMNS))) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def machine() -> Dict[str, Any]:
    """What the figures were measured on: CPUs, CPU model, Python, kernel, Node, load."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    node = shutil.which("node")
    node_version = None
    if node:
        try:
            version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10)
            node_version = version.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            node_version = None
    return {
        "nproc": usable,
        "cpu_model": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "node": node_version,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "executable": sys.executable,
    }
