"""Handoff cost: the master's CPU time per handed-off connection.

Clients connect, send one ping, read the answer and close, from several
processes so the client is not what limits the rate.  The figure is the
master's CPU time (user + system, from /proc) over the run divided by the
connections, so it does not depend on how fast the clients are.  Measured
in the same run, round-robin and least-connections against:

- the floor: ``benchmarks.floor_server``, a loop that accepts and closes
  (the kernel's own cost of accept and close, plus the smallest Python loop);
- Node's cluster primary (``tests/targets/node_cluster_server.js``, the same
  protocol, ``SCHED_RR``), when ``node`` is installed.

Servers are measured in turn, several rounds, in a rotating order; each
figure is the median of its rounds.  The same is then measured with one
client at a time (how the issue's reference figures were taken), where no
batching hides the cost of each wake-up; those rows have no target.  Every ping carries the same params,
encoded once by the load generator, to keep the clients light.

``--before DIR`` (``python -m benchmarks --only handoff --before /tmp/main/server``) adds the
round-robin master of another checkout's ``server/`` directory to the same rotation, so a change
to the server is judged against the code it replaces in one run, on the same machine state.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Tuple

from pytest_fdcluster import load

from . import processes
from .figures import Figure, at_most

BENCHMARK = "handoff"
WORKERS = 2
MAX_FLOOR_RATIO = 1.25
MAX_NODE_RATIO = 1 / 3
PAYLOAD = 0
BEFORE_ENV = "FDCLUSTER_BENCH_BEFORE"  # set by ``python -m benchmarks --before DIR``
BEFORE = "round-robin, before"


Target = Tuple[str, int, processes.Address]  # (name, pid whose CPU is measured, address)


def measure(targets: List[Target], connections: int, rounds: int, clients: int,
            procs: int) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """CPU seconds per connection of each target, per round, and its failed requests."""
    per_connection: Dict[str, List[float]] = {name: [] for name, _, _ in targets}
    failures: Dict[str, int] = {name: 0 for name, _, _ in targets}
    for round_ in range(rounds):
        order = targets[round_ % len(targets):] + targets[:round_ % len(targets)]
        for name, pid, address in order:
            before = processes.cpu_seconds(pid)
            result = load.run_load(address, clients=clients, processes=procs, requests=connections, keepalive=False,
                                   payload=PAYLOAD)
            per_connection[name].append((processes.cpu_seconds(pid) - before) / connections)
            if name != "floor":  # the floor answers nothing: every ping fails by design
                failures[name] += result.error_count
    return per_connection, failures


def paired_ratio(after: List[float], before: List[float]) -> float:
    """The median of after/before round by round: both were measured within a minute of each other."""
    return processes.median([a / b for a, b in zip(after, before) if b > 0])


def run(quick: bool) -> Tuple[List[Figure], processes.Details]:
    connections = 400 if quick else 15000
    sequential_connections = 200 if quick else 3000
    rounds = 1 if quick else 5
    clients, procs = (4, 1) if quick else (16, 2)
    node = processes.node_settings(WORKERS)

    with contextlib.ExitStack() as stack:
        floor, floor_address = stack.enter_context(processes.baseline_server("floor_server"))
        targets: List[Target] = [("floor", floor.pid, floor_address)]
        for strategy in ("round-robin", "least-connections"):
            cluster = stack.enter_context(processes.cluster(processes.reference_settings(WORKERS, strategy), strategy))
            targets.append((strategy, cluster.master, cluster.address))
        before_dir = os.environ.get(BEFORE_ENV)
        if before_dir:
            before = processes.other_checkout_settings(WORKERS, before_dir)
            cluster = stack.enter_context(processes.cluster(before, "before"))
            targets.append((BEFORE, cluster.master, cluster.address))
        if node is not None:
            cluster = stack.enter_context(processes.cluster(node, "node"))
            targets.append(("node", cluster.master, cluster.address))

        for _, _, address in targets:  # warm up: imports, first allocations, TIME_WAIT reuse
            load.run_load(address, clients=clients, requests=min(connections, 500), keepalive=False, payload=PAYLOAD)
        per_connection, failures = measure(targets, connections, rounds, clients, procs)
        # One client at a time, as the reference figures were taken: no batching anywhere.
        sequential_targets = [target for target in targets if target[0] != "least-connections"]
        sequential, sequential_failures = measure(sequential_targets, sequential_connections, rounds, 1, 1)

    us = {name: processes.median(values) * 1e6 for name, values in per_connection.items()}
    floor_us, node_us = us["floor"], us.get("node")
    no_node = "" if node is not None else "node is not installed: no Node baseline"
    figures = []
    for strategy in ("round-robin", "least-connections"):
        judged = strategy == "round-robin"  # the targets name round-robin
        value = us[strategy]
        figures.append(Figure(
            BENCHMARK, f"master CPU per connection, {strategy}", value, "us", floor_us, "accept-and-close floor",
            target=f"<= {MAX_FLOOR_RATIO:g}x floor" if judged else "",
            met=at_most(value / floor_us, MAX_FLOOR_RATIO) if judged else None,
            note=f"{failures[strategy]} failed requests" if failures[strategy] else "",
            extra={"rounds_us": [round(v * 1e6, 2) for v in per_connection[strategy]],
                   "failed_requests": failures[strategy]},
        ))
        figures.append(Figure(
            BENCHMARK, f"master CPU per connection, {strategy}", value, "us", node_us, "Node cluster primary",
            target="<= 1/3 of Node" if judged else "",
            met=(at_most(value / node_us, MAX_NODE_RATIO) if node_us else None) if judged else None,
            note=no_node,
        ))
    if node_us is not None:
        figures.append(Figure(BENCHMARK, "Node cluster primary CPU per connection", node_us, "us", floor_us,
                              "accept-and-close floor",
                              extra={"rounds_us": [round(v * 1e6, 2) for v in per_connection["node"]],
                                     "failed_requests": failures["node"]}))

    if BEFORE in us:
        paired = paired_ratio(per_connection["round-robin"], per_connection[BEFORE])
        figures.append(Figure(BENCHMARK, "master CPU per connection, round-robin", us["round-robin"], "us",
                              us[BEFORE], f"the same, {before_dir}",
                              note=f"before: {us[BEFORE] / floor_us:.2f}x floor; "
                                   f"after: {us['round-robin'] / floor_us:.2f}x floor; "
                                   f"median of the rounds' after/before: {paired:.2f}",
                              extra={"rounds_us": [round(v * 1e6, 2) for v in per_connection[BEFORE]],
                                     "paired_ratio": round(paired, 3)}))

    seq_us = {name: processes.median(values) * 1e6 for name, values in sequential.items()}
    if BEFORE in seq_us:
        paired = paired_ratio(sequential["round-robin"], sequential[BEFORE])
        figures.append(Figure(BENCHMARK, "master CPU per connection, round-robin, one client at a time",
                              seq_us["round-robin"], "us", seq_us[BEFORE], f"the same, {before_dir}",
                              note=f"median of the rounds' after/before: {paired:.2f}"))
    for name, label in (("round-robin", "master CPU per connection, round-robin"),
                        (BEFORE, "master CPU per connection, round-robin before"),
                        ("node", "Node cluster primary CPU per connection")):
        if name not in seq_us:
            continue
        note = ""
        if name == "round-robin" and "node" in seq_us:
            note = f"{seq_us[name] / seq_us['node']:.2f}x Node's primary ({seq_us['node']:.0f} us) one client at a time"
        figures.append(Figure(BENCHMARK, f"{label}, one client at a time", seq_us[name], "us", seq_us["floor"],
                              "floor, one client at a time", note=note))
    details = {
        "connections_per_round": connections, "rounds": rounds, "clients": clients, "client_processes": procs,
        "workers": WORKERS, "median_us": {name: round(value, 2) for name, value in us.items()},
        "rounds_us": {name: [round(v * 1e6, 2) for v in values] for name, values in per_connection.items()},
        "failed_requests": failures,
        "one_client_at_a_time": {
            "connections_per_round": sequential_connections,
            "median_us": {name: round(value, 2) for name, value in seq_us.items()},
            "rounds_us": {name: [round(v * 1e6, 2) for v in values] for name, values in sequential.items()},
            "failed_requests": sequential_failures,
        },
    }
    return figures, details
