"""Exactly one holder: once a client has its answer, exactly one worker process holds its connection.

Invariant checked (exactly one holder): after handoff every accepted
connection is held by exactly one worker: never by two, never by the master,
never by nobody while it is open.  Judged from outside, on the descriptors
/proc shows in every process of the target, after plain connects, after a
connection storm, after a worker is killed and respawned, and while a worker
is frozen with its share of connections waiting.

What is legitimate before the answer: a handoff target keeps its copy of an
accepted socket until the worker acknowledges it, and a connection still in
the kernel's backlog is held by nobody.  So a connection not yet answered may
be held by the master alone, by the master and the one worker it is being
handed to, or by nobody; never by two workers.  Once the client got its
answer, the worker has the socket: within ``SETTLE`` seconds (the master may
read the acknowledgement just after the answer left) exactly one worker
holds it and nobody else does.
"""

from __future__ import annotations

import selectors
import time

import pytest

from pytest_fdcluster import ClientTimeout, ClusterError, faults, resources, wait_until

SETTLE = 3.0
ANSWER_TIMEOUT = 5.0
RESPAWN_TIMEOUT = 10.0
#: How long clients of a frozen worker's share are given to be answered by others before they count as waiting.
WAITING_AFTER = 0.6
SHOWN = 5


def address_text(address):
    return f"{address[0]}:{address[1]}"


def assert_exactly_one_holder(cluster, addresses, after):
    """exactly one holder: every connection of ``addresses`` held by one worker alone, within ``SETTLE`` s."""
    wrong = {}

    def settled():
        nonlocal wrong
        wrong = resources.not_held_by_one_worker(cluster.snapshot(), addresses)
        return not wrong

    try:
        wait_until(settled, SETTLE, lambda: "every answered connection to be held by one worker")
    except ClusterError:
        pass  # judged below, each connection with its holders
    except resources.Unobservable as exc:
        pytest.fail(f"exactly one holder: {exc}")
    lines = [f"{address_text(a)} is held by {resources.describe_holders(views)}; expected one worker"
             for a, views in list(wrong.items())[:SHOWN]]
    more = f"; ... and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else ""
    assert not wrong, (f"exactly one holder: {'; '.join(lines)}{more} ({len(wrong)} of {len(addresses)} "
                       f"answered connections, {SETTLE:g} s after {after})")


def answered_clients(cluster, count, params="hello"):
    """``count`` keep-alive clients, each answered once."""
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(count)]
    for client in clients:
        assert client.call("ping", params) == params
    return clients


def answers_within(clients, seconds):
    """The clients among ``clients`` whose one awaited answer arrives within ``seconds``, with the answer."""
    answered = {}
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client.fileno(), selectors.EVENT_READ, client)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                selector.unregister(key.fd)
                answered[key.data] = key.data.recv_frame(ANSWER_TIMEOUT)
    return answered


def test_one_holder_after_plain_connects(fdcluster):
    clients = answered_clients(fdcluster, 4 * len(fdcluster.workers))
    try:
        assert_exactly_one_holder(fdcluster, [c.local_address for c in clients], "one ping each")
    finally:
        for client in clients:
            client.close()


def test_one_holder_after_connection_storm(fdcluster):
    with faults.ConnectionStorm(fdcluster.address, count=200, concurrency=200, hold=True, timeout=15.0) as storm:
        result = storm.run()
        assert result.answered == 200, f"exactly one holder: the storm itself was not answered in full: {result}"
        assert_exactly_one_holder(fdcluster, [s.getsockname()[:2] for s in storm.held], "a storm of 200")


def test_one_holder_after_worker_killed_and_respawned(fdcluster):
    clients = answered_clients(fdcluster, 3 * len(fdcluster.workers))
    try:
        victim = fdcluster.kill_worker(0)
        try:
            fdcluster.wait_for_workers(timeout=RESPAWN_TIMEOUT, gone=[victim])
        except ClusterError as exc:
            pytest.fail(f"exactly one holder: worker pid {victim} was not replaced (does the target respawn?): {exc}")
        survivors = []
        for client in clients:
            try:
                client.call("ping", "after")
            except (ClientTimeout, ConnectionError, OSError):
                client.close()  # a client of the killed worker: its connection is over, not open
                continue
            survivors.append(client)
        newcomers = answered_clients(fdcluster, 3 * len(fdcluster.workers), "new")
        clients += newcomers
        assert_exactly_one_holder(fdcluster, [c.local_address for c in survivors + newcomers],
                                  f"worker pid {victim} was killed and replaced")
    finally:
        for client in clients:
            client.close()


def test_one_holder_while_a_worker_is_frozen(fdcluster):
    clients = answered_clients(fdcluster, 2 * len(fdcluster.workers))
    try:
        frozen = fdcluster.pause_worker(0)
        arrivals = [fdcluster.client(ANSWER_TIMEOUT) for _ in range(6 * len(fdcluster.workers))]
        clients += arrivals
        for number, client in enumerate(arrivals):
            client.send_frame({"in": "ping", "params": number})
        answered = answers_within(arrivals, WAITING_AFTER)
        waiting = [c for c in arrivals if c not in answered]
        # A waiting connection's worker cannot have taken it: frozen, it reads nothing.
        snap = fdcluster.snapshot()
        doubled = {}
        for client in waiting:
            try:
                views = resources.holders(snap, client.local_address)
            except resources.Unobservable as exc:
                pytest.fail(f"exactly one holder: {exc}")
            if len([v for v in views if v.pid != snap.master_pid]) > 1:
                doubled[client.local_address] = views
        assert not doubled, "exactly one holder: " + "; ".join(
            f"{address_text(a)} is held by {resources.describe_holders(v)}; expected at most one worker "
            f"while worker pid {frozen} is frozen" for a, v in doubled.items())
        live = [c for c in clients if c not in waiting]
        assert_exactly_one_holder(fdcluster, [c.local_address for c in live],
                                  f"worker pid {frozen} was frozen with {len(waiting)} connections waiting")
        fdcluster.resume_worker(frozen)
        for client in waiting:
            reply = client.recv_frame(ANSWER_TIMEOUT)
            assert reply.get("out") == "pong", f"exactly one holder: a waiting client got {reply!r} after the resume"
        assert_exactly_one_holder(fdcluster, [c.local_address for c in clients],
                                  f"worker pid {frozen} resumed and its waiting clients were answered")
    finally:
        for client in clients:
            client.close()
