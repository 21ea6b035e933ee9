"""Benchmarks of the reference server and the harness, each figure against a baseline from the same run.

Not tests: run on demand with ``python -m benchmarks`` from the repository
root (``--quick`` for the smoke mode, ``--only NAME``, ``--json PATH``).
Each module measures one thing and returns ``Figure`` rows; ``run`` prints
the table and writes the JSON.
"""
