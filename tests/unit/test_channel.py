"""The channel's records over a real socketpair: descriptors arrive once, strays are closed."""

from __future__ import annotations

import array
import ast
import os
import socket
import subprocess
import sys

import pytest

from fdcluster_server import channel as ch


def open_fds():
    """This process's descriptors, less the one listdir() used to list them (closed by then)."""
    listed = set(int(n) for n in os.listdir("/proc/self/fd"))
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pair():
    master_end, worker_end = ch.socketpair()
    yield ch.Channel(master_end), ch.Channel(worker_end)
    master_end.close()
    worker_end.close()


def test_handoff_carries_one_close_on_exec_fd(pair):
    master, worker = pair
    a, b = socket.socketpair()
    try:
        master.send_handoff(42, a.fileno())
        (record,) = list(worker.receive())
        assert (record.kind, record.truncated) == (ch.HANDOFF, False)
        ((conn_id, fd),) = record.handoffs()
        assert conn_id == 42 and not os.get_inheritable(fd)
        received = socket.socket(fileno=fd)
        received.send(b"hi")
        assert b.recv(2) == b"hi"
        received.close()
    finally:
        a.close()
        b.close()


def test_a_batch_is_one_record_pairing_each_id_with_its_descriptor(pair):
    master, worker = pair
    pairs = [socket.socketpair() for _ in range(ch.MAX_FDS)]
    try:
        master.send_handoffs(list(range(100, 100 + ch.MAX_FDS)), [a.fileno() for a, _ in pairs])
        (record,) = list(worker.receive())
        handoffs = record.handoffs()
        assert [conn_id for conn_id, _ in handoffs] == list(range(100, 100 + ch.MAX_FDS))
        for (conn_id, fd), (_, b) in zip(handoffs, pairs):
            with socket.socket(fileno=fd) as received:
                received.send(b"%d" % conn_id)
                assert b.recv(8) == b"%d" % conn_id, f"conn {conn_id} arrived with another connection's fd {fd}"
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_more_than_max_fds_in_one_handoff_is_refused_before_sending(pair):
    master, _ = pair
    with pytest.raises(AssertionError, match="in one handoff"):
        master.send_handoffs(list(range(ch.MAX_FDS + 1)), [0] * (ch.MAX_FDS + 1))


def test_truncated_control_message_keeps_the_first_pairs_and_rejects_the_rest(pair):
    master, worker = pair
    socks = [socket.socket() for _ in range(ch.MAX_FDS + 8)]  # more fds than the receiver makes room for
    ids = list(range(7, 7 + len(socks)))
    try:
        master.sock.sendmsg([ch.HEADER.pack(ch.HANDOFF, len(ids)) + array.array(ch.IDS, ids).tobytes()],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno() for s in socks]))])
        before = open_fds()
        (record,) = list(worker.receive())
        assert record.truncated
        handoffs = record.handoffs()
        kept = [(conn_id, fd) for conn_id, fd in handoffs if fd is not None]
        assert [conn_id for conn_id, _ in handoffs] == ids
        assert [conn_id for conn_id, _ in kept] == ids[:len(kept)], "a descriptor was paired with a later id"
        if sys.platform.startswith("linux"):
            assert len(kept) == ch.MAX_FDS + 4, "the descriptors that fit were not delivered"
        for conn_id, fd in kept:
            assert os.fstat(fd).st_ino == os.fstat(socks[conn_id - 7].fileno()).st_ino, f"conn {conn_id}: wrong fd"
            os.close(fd)
        assert open_fds() == before, "received descriptors of a truncated message were not closed"
    finally:
        for s in socks:
            s.close()


RECEIVER_OUT_OF_DESCRIPTORS = """
import array, os, resource, socket, sys
from fdcluster_server import channel as ch
master_end, worker_end = ch.socketpair()
socks = [socket.socket() for _ in range(6)]
highest = max(int(n) for n in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
ch.Channel(master_end).send_handoffs([11, 12, 13, 14, 15, 16], [s.fileno() for s in socks])
(record,) = list(ch.Channel(worker_end).receive())
print(record.truncated, [(i, fd is not None and os.fstat(fd).st_ino == os.fstat(socks[i - 11].fileno()).st_ino)
                         for i, fd in record.handoffs()])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the order of a truncated delivery is Linux's")
def test_a_receiver_out_of_descriptors_gets_the_first_sockets_of_a_batch_each_with_its_id():
    out = subprocess.run([sys.executable, "-c", RECEIVER_OUT_OF_DESCRIPTORS], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    truncated, pairs = out.stdout.strip().split(" ", 1)
    assert truncated == "True", f"the batch was not reported truncated: {out.stdout}"
    delivered = [ok for _, ok in ast.literal_eval(pairs)]
    k = delivered.count(True)
    assert 0 < k < 6 and delivered == [True] * k + [False] * (6 - k), (
        f"expected the descriptors that fit, each paired with its own id (the first ones), the rest rejected: {pairs}")


def test_descriptors_beyond_the_ids_are_closed(pair):
    master, worker = pair
    socks = [socket.socket() for _ in range(3)]
    try:
        master.sock.sendmsg([ch.HEADER.pack(ch.HANDOFF, 1) + array.array(ch.IDS, [9]).tobytes()],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno() for s in socks]))])
        before = open_fds()
        (record,) = list(worker.receive())
        ((conn_id, fd),) = record.handoffs()
        assert conn_id == 9 and fd is not None
        assert open_fds() - before == {fd}, "descriptors beyond the record's ids stayed open"
        os.close(fd)
    finally:
        for s in socks:
            s.close()


def test_ids_round_trip_and_eof(pair):
    master, worker = pair
    worker.send_ids(ch.ACK, [1, 2, 3])
    (record,) = list(master.receive())
    assert record.kind == ch.ACK and record.ids() == [1, 2, 3]
    worker.close()
    with pytest.raises(EOFError):
        list(master.receive())


def test_record_over_max_record_raises_and_the_next_one_still_arrives(pair):
    master, worker = pair
    worker.sock.send(ch.HEADER.pack(ch.ACK, 0) + bytes(ch.MAX_RECORD + 1024))  # ids the master would lose
    worker.send_ids(ch.ACK, [5])
    with pytest.raises(ch.TruncatedRecord, match="kind 11"):
        list(master.receive())
    (record,) = list(master.receive())
    assert record.kind == ch.ACK and record.ids() == [5]


def test_long_id_lists_are_split_into_records_that_fit(pair):
    master, worker = pair
    ids = list(range(1, 3 * ch.MAX_IDS))
    worker.send_ack(ids, closed=7)
    records = list(master.receive())
    assert [r.ids() for r in records] == [ids[i:i + ch.MAX_IDS] for i in range(0, len(ids), ch.MAX_IDS)]
    assert [r.arg for r in records] == [7, 0, 0], "the closed count must be reported once"
