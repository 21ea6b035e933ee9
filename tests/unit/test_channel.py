"""The channel's records over a real socketpair: descriptors arrive once, strays are closed."""

from __future__ import annotations

import array
import os
import socket

import pytest

from fdcluster_server import channel as ch


def open_fds():
    return set(int(n) for n in os.listdir("/proc/self/fd"))


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
        assert (record.kind, record.arg, record.truncated) == (ch.HANDOFF, 42, False)
        assert not os.get_inheritable(record.fd)
        received = socket.socket(fileno=record.fd)
        received.send(b"hi")
        assert b.recv(2) == b"hi"
        received.close()
    finally:
        a.close()
        b.close()


def test_truncated_control_message_leaks_nothing(pair):
    master, worker = pair
    socks = [socket.socket() for _ in range(8)]  # more fds than the receiver makes room for
    try:
        master.sock.sendmsg([ch.HEADER.pack(ch.HANDOFF, 7)],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno() for s in socks]))])
        before = open_fds()
        (record,) = list(worker.receive())
        assert record.truncated and record.fd is None and record.arg == 7
        assert open_fds() == before, "received descriptors of a truncated message were not closed"
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
