"""The mutation matrix: the chaos suite against each deliberately broken server.

Each variant of ``mutants.py`` carries one bug; the scenario module meant to
catch it must fail, under the invariant ``mutant_expectations.EXPECTED``
names, in a test that passes on the unbroken server (variant ``none``, run
through the same launcher, which must pass every module).  A variant that
cannot start is BROKEN, not caught.

In CI each variant runs its owner's module plus ``SMOKE``.  Measured on 2
loaded cores with ``-n 2``: that takes about 4 minutes (the baseline ~65 s,
a variant 3-50 s); every module against every variant took 35 minutes, over
the CI budget.  ``FDCLUSTER_MUTANTS_FULL=1`` runs that full table, as
``update_readme.py --full`` does.  The unbroken server's run is shared by
every xdist worker through a file (computed once, under a lock), and the
matrix is printed by conftest.py.
"""

from __future__ import annotations

import fcntl
import json

import pytest
from mutant_expectations import EXPECTED, KNOWN_GAPS, MODULES, ROOT, full_run, selection
from mutant_runs import BASELINE, BROKEN, CAUGHT, NO_OWNER, Outcome, baseline_of, judge, probe, run_suite, timed

ROW_PROPERTY = "mutation_row"


@pytest.fixture(scope="session")
def unbroken(tmp_path_factory, worker_id):
    """A call giving every scenario test's outcome against ``none`` and the seconds it took.

    The run happens once per session, on the first call, shared by the xdist
    workers through a file under a lock; a variant's test calls it after its
    own run, so a worker waits for the baseline only if it is still running.
    """
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # the root all xdist workers' temporary directories share
    path = shared / "mutants-none.json"

    def outcomes():
        with open(shared / "mutants-none.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not path.exists():
                workdir = shared / "mutants-none"
                workdir.mkdir(exist_ok=True)
                ran, seconds = timed(run_suite, "none", selection("none", True), workdir)
                path.write_text(json.dumps({"outcomes": [list(o) for o in ran], "seconds": seconds}))
        data = json.loads(path.read_text())
        return [Outcome(*o) for o in data["outcomes"]], data["seconds"]

    return outcomes


def test_unbroken_server_passes_every_module(unbroken, record_property):
    outcomes, seconds = unbroken()
    row = judge("none", None, outcomes, {})
    row["seconds"] = round(seconds, 1)
    record_property(ROW_PROPERTY, json.dumps(row))
    ran = {o.module for o in outcomes}
    assert ran == set(MODULES), f"mutation matrix: modules that did not run against none: {set(MODULES) - ran}"
    assert row["status"] == BASELINE and not row["failed"], (
        f"mutation matrix: the unbroken server (variant none, same launcher) fails: {row['detail']}")


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[v])) if v in KNOWN_GAPS else v
    for v in EXPECTED])
def test_suite_catches_variant(variant, unbroken, tmp_path, record_property):
    expectation = EXPECTED[variant]
    if expectation.module not in MODULES:
        record_property(ROW_PROPERTY, json.dumps({"variant": variant, "status": NO_OWNER, "owner": expectation.module,
                                                  "modules": {}, "caught_by": [], "detail": ""}))
        pytest.skip(f"mutation matrix: {variant}'s owner scenarios/{expectation.module}.py is not in this checkout")
    failure, probe_seconds = timed(probe, variant)
    outcomes, seconds = ([], 0.0) if failure else timed(run_suite, variant, selection(variant, full_run()), tmp_path)
    row = judge(variant, expectation, outcomes, baseline_of(unbroken()[0]), failure)
    row["seconds"] = round(probe_seconds + seconds, 1)
    record_property(ROW_PROPERTY, json.dumps(row))
    assert row["status"] != BROKEN, f"mutation matrix: {variant} is a BROKEN mutant, not a catch: {row['detail']}"
    assert row["status"] == CAUGHT, (
        f"mutation matrix: {variant} is not caught by {expectation.module} under "
        f"{' or '.join(expectation.invariants)!r}: {row['detail']}; module outcomes: {row['modules']}")


def test_every_variant_has_an_expectation():
    import mutants

    assert set(mutants.VARIANTS) == set(EXPECTED), (
        f"mutation matrix: variants without an owner {set(mutants.VARIANTS) - set(EXPECTED)}, "
        f"owners without a variant {set(EXPECTED) - set(mutants.VARIANTS)}")
    assert (ROOT / "scenarios").is_dir()
