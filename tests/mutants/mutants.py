"""Deliberately broken variants of the reference server, one bug each, for the mutation matrix.

``python tests/mutants/mutants.py VARIANT [server flags...]`` applies one
variant's patch to ``fdcluster_server`` and runs it; ``none`` runs it
unbroken through the same launcher.  The bugs live in ``master_bugs`` and
``worker_bugs``; the chaos suite must catch every one of them, each in the
scenario module ``mutant_expectations.EXPECTED`` names.

Patches go on the classes before the master forks, so workers inherit them.
A patch point that no longer exists raises at start-up: a broken mutant,
reported as such, never the unbroken server under a broken name.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict

import master_bugs
import worker_bugs

from fdcluster_server import __main__ as server_main

VARIANTS: Dict[str, Callable[[], None]] = {
    # the first nine
    "master-keeps-fds": master_bugs.master_keeps_fds,
    "close-wait": worker_bugs.close_wait,
    "no-respawn": master_bugs.no_respawn,
    "unfair-dispatch": master_bugs.unfair_dispatch,
    "single-recv": worker_bugs.single_recv,
    "synchronous-worker": worker_bugs.synchronous_worker,
    "dies-on-bad-json": worker_bugs.dies_on_bad_json,
    "lost-handoff": master_bugs.lost_handoff,
    "dup-fds": worker_bugs.dup_fds,
    # on the paths the reference server was hardened on
    "steal-stalled-handoffs": master_bugs.steal_stalled_handoffs,
    "stale-turn-deadline": master_bugs.stale_turn_deadline,
    "reads-past-high-water": worker_bugs.reads_past_high_water,
    "no-accept-backoff": master_bugs.no_accept_backoff,
    "spawn-failure-crashes": master_bugs.spawn_failure_crashes,
    "truncated-handoff-dropped": worker_bugs.truncated_handoff_dropped,
    "drain-skips-queued": worker_bugs.drain_skips_queued,
    "worker-term-is-fast": worker_bugs.worker_term_is_fast,
    "graceful-exit-nonzero": master_bugs.graceful_exit_nonzero,
    "sweep-spares-channels": worker_bugs.sweep_spares_channels,
    "master-keeps-dead-channel": master_bugs.master_keeps_dead_channel,
    "recursion-escapes": worker_bugs.recursion_escapes,
    "respawn-budget-never-refilled": master_bugs.respawn_budget_never_refilled,
    "random-dispatch": master_bugs.random_dispatch,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS and sys.argv[1] != "none":
        print(f"usage: mutants.py VARIANT [server flags]; variants: none, {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    variant = sys.argv[1]
    if variant != "none":
        VARIANTS[variant]()
    return server_main.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
