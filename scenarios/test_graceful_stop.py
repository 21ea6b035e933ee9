"""Graceful stop: SIGTERM lets every request already sent be answered, then the process exits 0.

Invariant checked (graceful stop, 5), on a worker and on the master.  The
target is frozen first (``pause_worker``; the master with SIGSTOP), so the
requests clients send sit in the kernel's receive queues when SIGTERM
arrives; then it resumes.  A correct server must then:

- answer every request sent on a connection it accepted, and only then close
  that connection with a clean EOF (FIN), never a reset: closing a socket
  with unread data in its receive queue makes the kernel send RST, and a
  client that sees ECONNRESET cannot tell which of its requests were served;
- drop nothing it accepted.  *Accepted* means accept()ed by a process of the
  target: seen from outside as a descriptor some process of the tree holds
  (the master between accept and handoff, a worker afterwards).  The kernel
  completes a client's handshake on its own and queues it in the listen
  backlog before any process has seen it, so a client whose ``connect``
  succeeded is not yet accepted by the *server*: a server that stops
  listening cannot answer what it never saw, and closing a listener resets
  its backlog.  Such a client (here: one that connected while every process
  of the target was frozen) must be either answered and then closed cleanly,
  or closed without any answer (RST or EOF); it must never hang, and must
  never lose a connection after some of its answers;
- exit within the grace period: the plugin's ``grace`` setting, the time a
  test run grants a target between SIGTERM and SIGKILL.  A worker's exit
  status is not observable from outside (its master reaps it), so a worker is
  judged by exiting in time and, if the target respawns, being replaced.  The
  master's exit status is its ``StopResult.returncode``: 0, not killed, no
  worker left behind.

A target that declares ``drains=no`` fails these tests with the declaration
named (``require``): draining is their whole point.
"""

from __future__ import annotations

import signal
import time
from typing import Dict, List

import psutil
import pytest

from pytest_fdcluster import (
    Client,
    ClientError,
    ClientTimeout,
    ClusterError,
    process_alive,
    protocol,
    require,
    wait_until,
)

ANSWER_TIMEOUT = 5.0
RESPAWN_TIMEOUT = 10.0
HELD_TIMEOUT = 2.0
PER_WORKER = 2  # keep-alive connections per worker, each served once before the stop
# Requests sent in one burst on each of them while its process is frozen: 128 KiB, more than one read of a
# typical server, in frames of exactly 16 KiB, so a read of any power-of-two size from 16 KiB up ends on a frame
# boundary: a server that checks for idle connections between two reads sees one with nothing buffered.
PIPELINED = 8
FRAME_SIZE = 16 << 10


def held_by_workers(cluster, clients):
    """{label: [clients]} once a worker (not the master) holds every client's connection."""

    def grouped():
        snap = cluster.snapshot()
        groups: Dict[str, List[Client]] = {}
        for client in clients:
            owner = snap.owner_of(client.local_address)
            if owner is None or owner.pid == snap.master_pid:
                return None
            groups.setdefault(owner.label, []).append(client)
        return groups

    try:
        return wait_until(grouped, HELD_TIMEOUT, lambda: "a worker to hold every keep-alive connection")
    except ClusterError as exc:
        pytest.fail(f"graceful stop: cannot tell which worker serves which connection: {exc}")


def keepalive_clients(cluster, count):
    """``count`` open connections, each answered once, so a worker holds it with nothing in flight."""
    clients = [cluster.client(ANSWER_TIMEOUT) for _ in range(count)]
    for number, client in enumerate(clients):
        assert client.call("ping", number) == number, f"graceful stop: warm-up ping {number} not echoed"
    return clients


def sized_ping(tag, number):
    """A ping whose frame is exactly FRAME_SIZE bytes, and its params."""
    params = {"stop": tag, "n": number, "pad": ""}
    params["pad"] = "x" * (FRAME_SIZE - len(protocol.request("ping", params)))
    return protocol.request("ping", params), params


def send_pipelined(client, tag):
    """PIPELINED pings of FRAME_SIZE bytes each in one write; returns their params in order."""
    frames, params = zip(*(sized_ping(tag, n) for n in range(PIPELINED)))
    client.send_raw(b"".join(frames))
    return list(params)


def next_reply(client, deadline):
    """The next frame from ``client`` before ``deadline``, or the exception that ended the wait."""
    try:
        return client.recv_frame(max(0.05, deadline - time.monotonic()))
    except (ClientError, OSError) as exc:
        return exc


def is_echo(reply, params):
    return isinstance(reply, dict) and reply.get("out") == "pong" and reply.get("result") == params


def answered_then_closed(client, sent, deadline):
    """Why ``client`` did not get an echo of every one of ``sent``, then a clean EOF; None when it did."""
    where = f"client {client.local_address[0]}:{client.local_address[1]}"
    for number, params in enumerate(sent):
        reply = next_reply(client, deadline)
        if isinstance(reply, ClientTimeout):
            return f"{where}: request {number + 1} of {len(sent)} not answered before the grace period ended"
        if isinstance(reply, Exception):
            return f"{where}: connection ended before request {number + 1} of {len(sent)} was answered: {reply!r:.120}"
        if not is_echo(reply, params):
            return f"{where}: request {number + 1} answered with {reply!r:.120}, expected the echo of {params!r:.80}"
    try:
        how = client.expect_eof(max(0.05, deadline - time.monotonic()))
    except ClientTimeout:
        return f"{where}: answered, but the connection was still open when the grace period ended"
    except (ClientError, OSError) as exc:
        return f"{where}: answered, then {exc!r:.120} instead of a clean EOF"
    return None if how == "eof" else f"{where}: answered, then reset (RST) instead of a clean EOF"


def answered_or_never_accepted(client, params, deadline):
    """A client queued in the listen backlog: answered then a clean EOF, or closed unanswered; never a hang."""
    reply = next_reply(client, deadline)
    if isinstance(reply, ClientTimeout):
        return (f"backlog client {client.local_address[0]}:{client.local_address[1]}: neither answered nor closed "
                "before the grace period ended (it hangs)")
    if isinstance(reply, Exception):
        return None  # never accepted: the listener closed with it in its queue
    if not is_echo(reply, params):
        return f"backlog client answered with {reply!r:.120}, expected the echo of {params!r}"
    return answered_then_closed(client, [], deadline)


def close_all(clients):
    for client in clients:
        client.close()


def test_worker_sigterm_answers_requests_already_sent(fdcluster):
    require(fdcluster, "drains")
    grace = fdcluster.settings.grace
    clients = keepalive_clients(fdcluster, PER_WORKER * len(fdcluster.workers))
    fresh = []
    try:
        groups = held_by_workers(fdcluster, clients)
        victim_label = max(sorted(groups), key=lambda label: len(groups[label]))
        victim = fdcluster.pause_worker(victim_label)
        sent = {client: send_pipelined(client, n) for n, client in enumerate(groups[victim_label])}
        # Accepted by the master while the victim is frozen: some may be handed to it and never acknowledged.
        fresh = [fdcluster.client(ANSWER_TIMEOUT) for _ in fdcluster.workers]
        for number, client in enumerate(fresh):
            client.send_frame({"in": "ping", "params": {"fresh": number}})
        # SIGTERM while frozen, then continued (kill_worker does both); it drains while our clients read.
        fdcluster.kill_worker(victim, signal.SIGTERM, wait=False)
        stopped_at = time.monotonic()
        deadline = stopped_at + grace
        wrong = [why for client, params in sent.items() if (why := answered_then_closed(client, params, deadline))]
        assert not wrong, (
            f"graceful stop: {victim_label} (pid {victim}) got SIGTERM with {PIPELINED} requests "
            f"({PIPELINED * FRAME_SIZE >> 10} KiB) sent on each of "
            f"its {len(sent)} keep-alive connections: " + "; ".join(wrong))
        replies = [next_reply(client, deadline) for client in fresh]
        lost = [f"fresh client {number}: {reply!r:.100}" for number, reply in enumerate(replies)
                if not is_echo(reply, {"fresh": number})]
        assert not lost, (f"graceful stop: connections accepted while {victim_label} (pid {victim}) was frozen and "
                          f"then told to stop were not answered: " + "; ".join(lost))
        for label, group in groups.items():
            if label != victim_label:
                for client in group:
                    assert client.call("ping", "after") == "after", (
                        f"graceful stop: {label}'s client was not served while {victim_label} drained")
        try:
            wait_until(lambda: not process_alive(victim), max(0.0, deadline - time.monotonic()),
                       lambda: f"{victim_label} pid {victim} to exit")
        except ClusterError:
            pytest.fail(f"graceful stop: {victim_label} (pid {victim}) still running {grace:g} s (the grace period) "
                        f"after SIGTERM, with its connections answered")
        if fdcluster.capabilities.respawns:
            try:
                fdcluster.wait_for_workers(timeout=RESPAWN_TIMEOUT, gone=[victim])
            except ClusterError as exc:
                pytest.fail(f"graceful stop: {victim_label} (pid {victim}) stopped on SIGTERM was not replaced: {exc}")
        for number in range(2 * len(fdcluster.workers)):
            assert fdcluster.call("ping", number, timeout=ANSWER_TIMEOUT) == number, (
                f"graceful stop: new connection {number} not served after {victim_label} (pid {victim}) drained")
    finally:
        close_all(clients + fresh)


def freeze(pid):
    """SIGSTOP a process that is no worker (the master) and wait until the kernel shows it stopped."""
    psutil.Process(pid).suspend()
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 5.0, lambda: f"pid {pid} to stop")


def stopped_listening(cluster):
    """Wait (bounded, never failing) until the master holds no listening socket: it has acted on SIGTERM."""
    try:
        wait_until(lambda: not getattr(cluster.snapshot().master, "listening", None), HELD_TIMEOUT,
                   lambda: "the master to close its listening socket")
    except ClusterError:
        pass  # a target may keep its listener until it exits; its workers are then resumed all the same


def exits_0(cluster, deadline, grace):
    """graceful stop: the master exits before ``deadline``, with status 0, and leaves no worker behind."""
    try:
        wait_until(lambda: not cluster.target.alive(), max(0.0, deadline - time.monotonic()),
                   lambda: f"the master pid {cluster.master} to exit")
    except ClusterError:
        pytest.fail(f"graceful stop: the master (pid {cluster.master}) still running {grace:g} s (the grace "
                    f"period) after SIGTERM, with every accepted connection answered")
    result = cluster.stop()
    assert result.returncode == 0 and not result.survivors_killed, (
        f"graceful stop: the master (pid {cluster.master}) exited "
        + (f"with status {result.returncode}" if result.returncode is not None else "unreaped")
        + " after SIGTERM, expected 0"
        + (f"; its workers {list(result.survivors_killed)} outlived it and were SIGKILLed"
           if result.survivors_killed else ""))


def test_master_sigterm_answers_requests_already_sent_and_exits_0(fdcluster_factory):
    cluster = fdcluster_factory.start()
    require(cluster, "drains")
    grace = cluster.settings.grace
    workers = list(cluster.workers)
    clients = keepalive_clients(cluster, PER_WORKER * len(workers))
    try:
        held_by_workers(cluster, clients)
        for pid in workers:
            cluster.pause_worker(pid)
        sent = {client: send_pipelined(client, n) for n, client in enumerate(clients)}
        cluster.kill_master(signal.SIGTERM)
        deadline = time.monotonic() + grace
        # Workers resume once the master acted on SIGTERM: a stop it passes on finds their requests unread.
        stopped_listening(cluster)
        for pid in workers:
            cluster.resume_worker(pid)
        wrong = [why for client, params in sent.items() if (why := answered_then_closed(client, params, deadline))]
        assert not wrong, (
            f"graceful stop: the master (pid {cluster.master}) got SIGTERM with {PIPELINED} requests "
            f"({PIPELINED * FRAME_SIZE >> 10} KiB) sent on each of {len(sent)} keep-alive connections of its frozen "
            f"workers: " + "; ".join(wrong))
        exits_0(cluster, deadline, grace)
    finally:
        close_all(clients)


def test_master_sigterm_drops_nothing_accepted_and_exits_0(fdcluster_factory):
    cluster = fdcluster_factory.start()
    require(cluster, "drains")
    grace = cluster.settings.grace
    workers = list(cluster.workers)
    fresh, backlog, master_frozen = [], [], False
    try:
        for pid in workers:
            cluster.pause_worker(pid)
        # More than the workers' handoff windows: the master holds some itself, accepted but not handed off.
        fresh = [cluster.client(ANSWER_TIMEOUT) for _ in range(3 * len(workers) + 4)]
        for number, client in enumerate(fresh):
            client.send_frame({"in": "ping", "params": {"fresh": number}})
        try:
            wait_until(lambda: all(cluster.snapshot().owner_of(c.local_address) for c in fresh), HELD_TIMEOUT,
                       lambda: "the target to accept every fresh connection")
        except ClusterError:
            pass  # whatever it did not accept is judged as a backlog client below
        snap = cluster.snapshot()
        accepted = {client: [{"fresh": n}] for n, client in enumerate(fresh) if snap.owner_of(client.local_address)}
        unaccepted = {client: {"fresh": n} for n, client in enumerate(fresh) if client not in accepted}
        freeze(cluster.master)
        master_frozen = True
        # Every process of the target is frozen: these connect through the kernel's backlog alone.
        backlog = [cluster.client(ANSWER_TIMEOUT) for _ in range(len(workers))]
        for number, client in enumerate(backlog):
            client.send_frame({"in": "ping", "params": {"backlog": number}})
            unaccepted[client] = {"backlog": number}
        cluster.kill_master(signal.SIGTERM)
        deadline = time.monotonic() + grace
        psutil.Process(cluster.master).resume()
        master_frozen = False
        for pid in workers:
            cluster.resume_worker(pid)
        wrong = [why for client, params in accepted.items() if (why := answered_then_closed(client, params, deadline))]
        assert not wrong, (
            f"graceful stop: the master (pid {cluster.master}) got SIGTERM holding {len(accepted)} accepted "
            f"connections its frozen workers had not taken yet: " + "; ".join(wrong))
        hung = [why for client, params in unaccepted.items()
                if (why := answered_or_never_accepted(client, params, deadline))]
        assert not hung, "graceful stop: after SIGTERM to the master: " + "; ".join(hung)
        exits_0(cluster, deadline, grace)
    finally:
        if master_frozen:
            psutil.Process(cluster.master).resume()
        close_all(fresh + backlog)
