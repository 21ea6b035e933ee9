"""The benchmark runner: ``python -m benchmarks [--quick] [--only NAME] [--json PATH]``, from the repository root.

Runs the selected benchmarks in order, prints one table (figure, value,
baseline, ratio, target, met?) and writes it as JSON with the machine it was
measured on.  A missed target is a figure, not a failure: the exit code is 0
unless a benchmark crashed or left a process behind.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

from . import processes
from .figures import Figure, format_table, machine

#: name -> module of this package with ``run(quick) -> (figures, details)``, in the order they run.
BENCHMARKS = {
    "handoff": "benchmarks.handoff",
    "throughput": "benchmarks.throughput",
    "isolation": "benchmarks.isolation",
    "memory": "benchmarks.memory",
    "harness": "benchmarks.harness",
}
DEFAULT_JSON = os.path.join(processes.REPO, "benchmarks", "results", "latest.json")
EXIT_OK = 0
EXIT_BENCHMARK_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smallest sizes, scenario suite skipped: proves the benchmarks still run (seconds)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these benchmarks (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", default=DEFAULT_JSON, metavar="PATH",
                        help="where to write the results (default: benchmarks/results/latest.json)")
    parser.add_argument("--before", metavar="DIR",
                        help="handoff: also measure the reference server of another checkout's server/ directory "
                             "(the code a change replaces), in the same rotation")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    return parser


def selected(only: Sequence[str], parser: argparse.ArgumentParser) -> List[str]:
    names = [name.strip() for item in only for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    return [name for name in BENCHMARKS if name in names] if names else list(BENCHMARKS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = selected(args.only, parser)
    if args.before:
        from .handoff import BEFORE_ENV

        os.environ[BEFORE_ENV] = os.path.abspath(args.before)
    started = datetime.datetime.now(datetime.timezone.utc)
    document: Dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "benchmarks": {},
        "figures": [],
        "errors": {},
    }
    figures: List[Figure] = []
    status = EXIT_OK
    for name in names:
        print(f"benchmark {name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            module = importlib.import_module(BENCHMARKS[name])
            found, details = module.run(args.quick)
        except Exception:  # one crashed benchmark must not hide the others' figures
            document["errors"][name] = traceback.format_exc()
            print(f"benchmark {name} failed:\n{document['errors'][name]}", file=sys.stderr, flush=True)
            status = EXIT_BENCHMARK_FAILED
            continue
        seconds = time.monotonic() - began
        print(f"benchmark {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        figures += found
        document["benchmarks"][name] = {"seconds": round(seconds, 2), **details}

    left = processes.live_descendants()
    if left:
        document["errors"]["leftovers"] = [f"pid {p.pid}: {' '.join(p.cmdline())}" for p in left]
        for proc in left:
            proc.kill()
        status = EXIT_BENCHMARK_FAILED
        print(f"processes left behind (killed): {document['errors']['leftovers']}", file=sys.stderr)

    document["machine"]["loadavg_after"] = os.getloadavg()
    document["figures"] = [figure.as_json() for figure in figures]
    print(format_table(figures, markdown=args.markdown))
    notes = [f"  {f.benchmark} / {f.name}: {f.note}" for f in figures if f.note]
    if notes:
        print("\nnotes:\n" + "\n".join(notes))
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        print(f"\nwrote {args.json}")
    return status
