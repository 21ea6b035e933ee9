"""Integration tests of pytest_fdcluster.faults against the reference server, with real processes and sockets.

Each test is a scenario: one fault call, then the invariant the server must
keep, each asserted with a message that names it.  Waits for the server's
reaction are bounded polls of what the kernel or the server's counters show.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any, Iterable, List, Optional, Tuple

import pytest

from fdcluster_server import protocol
from pytest_fdcluster import faults
from pytest_fdcluster.checks import assert_master_holds_no_clients, assert_no_close_wait, assert_round_robin
from pytest_fdcluster.client import Client
from pytest_fdcluster.cluster import Cluster, wait_until
from pytest_fdcluster.observe import Snapshot, format_address

#: Bound on every wait for the server to react.
DEADLINE = 10.0

#: A request whose params hold multi-byte UTF-8, so some splits fall inside a character.
PARAMS = {"text": "naïve café – 東京 ✓ 🚀", "n": [1, 2.5, None, True]}


def pong(params: Any) -> dict:
    return {"out": protocol.OUT_PONG, "result": params}


def wait_clean(cluster: Cluster, addresses: Iterable[Tuple[str, int]] = ()) -> Snapshot:
    """Poll until no socket is in CLOSE_WAIT, the master holds no client, and none of ``addresses`` is held."""
    addresses = list(addresses)

    def clean() -> Optional[Snapshot]:
        snap = cluster.snapshot()
        if snap.close_wait or snap.master_client_sockets:
            return None
        if any(snap.owner_of(address) is not None for address in addresses):
            return None
        return snap

    def describe() -> str:
        snap = cluster.snapshot()
        held = [format_address(a) for a in addresses if snap.owner_of(a) is not None]
        return (f"{cluster.name} to close its side: {len(snap.close_wait)} in CLOSE_WAIT, "
                f"master holds {len(snap.master_client_sockets)}, still held: {held[:5]}")

    return wait_until(clean, DEADLINE, describe)


def worker_stats_total(cluster: Cluster, key: str) -> int:
    stats = cluster.stats()
    assert stats is not None, "the reference server answers stats"
    return sum(w.get(key, 0) for w in stats["workers"])


class TestSplitFrames:
    def test_pieces_rejoin_into_the_frame(self):
        frame = protocol.request("ping", PARAMS)
        assert b"".join(faults.split_frame(frame, 3)) == frame
        pieces = faults.split_frame(frame, [9, 2, 2, 5])
        assert [len(p) for p in pieces] == [2, 3, 4, len(frame) - 9]
        assert b"".join(pieces) == frame

    @pytest.mark.parametrize("offset", [0, -1, 10**6])
    def test_an_offset_outside_the_frame_is_rejected(self, offset):
        with pytest.raises(ValueError, match="split offset"):
            faults.split_frame(protocol.request("ping", 1), offset)

    def test_a_frame_split_at_every_position_is_answered(self, fdcluster):
        frame = protocol.request("ping", PARAMS)
        with fdcluster.client() as client:
            for offset in range(1, len(frame)):
                faults.send_in_pieces(client, frame, [offset])
                assert client.recv_frame() == pong(PARAMS), f"split at byte {offset} of {len(frame)} answered"

    def test_a_frame_sent_byte_by_byte_with_pauses_is_answered(self, fdcluster):
        frame = protocol.request("ping", PARAMS)
        with fdcluster.client() as client:
            faults.byte_by_byte(client, frame, delay=0.001)
            assert client.recv_frame() == pong(PARAMS), "byte-by-byte frame answered"

    def test_pieces_by_count_by_bytes_and_on_a_raw_socket(self, fdcluster):
        frame = protocol.request("ping", PARAMS)
        with fdcluster.client() as client:
            assert len(faults.send_in_pieces(client, frame, 7)) == 7
            faults.send_in_pieces(client, frame, faults.split_frame(frame, [1, 4, 30]))
            assert [client.recv_frame(), client.recv_frame()] == [pong(PARAMS)] * 2
        # Two frames glued and re-split across their boundary, on a plain socket.
        two = protocol.request("ping", 1) + protocol.request("ping", 2)
        raw = Client(fdcluster.address)
        with raw:
            faults.send_in_pieces(raw, two, [3, len(two) // 2 + 1], delay=0.005)
            assert [raw.recv_frame(), raw.recv_frame()] == [pong(1), pong(2)], \
                "pipelined split frames answered in order"


class TestEndingBadly:
    def test_truncated_frames_leave_nothing_behind(self, fdcluster):
        frame = protocol.request("ping", PARAMS)
        addresses = [faults.truncate_and_close(fdcluster.address, frame, keep)
                     for keep in (0, 1, protocol.HEADER_SIZE, protocol.HEADER_SIZE + 3, len(frame) - 1)]
        snap = wait_clean(fdcluster, addresses)
        assert_no_close_wait(snap)
        assert fdcluster.call("ping", "after") == "after", "server still serves after truncated frames"

    def test_a_half_closed_request_is_answered_then_closed(self, fdcluster):
        assert faults.half_close_request(fdcluster.address, "ping", PARAMS) == pong(PARAMS)

    def test_rst_close_of_a_client_and_a_socket(self, fdcluster):
        client = fdcluster.client()
        client.send_raw(protocol.request("ping", 1)[:6])
        faults.rst_close(client)
        assert client.closed
        with fdcluster.client() as other:
            address = other.local_address
            other.call("ping", 2)
        wait_clean(fdcluster, [client.local_address, address])

    def test_an_rst_storm_leaves_no_close_wait(self, fdcluster):
        with faults.RstStorm(fdcluster.address, 150, concurrency=50) as storm:
            result = storm.run()
        assert result.connected == result.aborted == 150, f"every storm connection connected and reset: {result}"
        snap = wait_clean(fdcluster, result.local_addresses)
        assert_no_close_wait(snap)
        assert_master_holds_no_clients(snap)
        assert fdcluster.call("ping", "alive") == "alive", "server serves after an RST storm"


@pytest.mark.fdcluster(workers=2, idle_timeout=0.5)
class TestSlowloris:
    def test_stalled_partial_frames_are_closed_while_others_are_served(self, fdcluster):
        with faults.Slowloris(fdcluster.address, 30) as slow:
            assert len(slow.sockets) == len(slow.local_addresses) == 30
            for n in range(5):
                assert fdcluster.call("ping", n, timeout=2.0) == n, "normal client served during a slowloris"
            slow.wait_closed(DEADLINE)
            assert slow.alive() == 0
        wait_clean(fdcluster, slow.local_addresses)
        assert worker_stats_total(fdcluster, "timeouts") >= 30, "the idle timeout closed the slowloris connections"

    def test_trickling_one_byte_at_a_time_does_not_reset_the_timeout(self, fdcluster):
        with faults.Slowloris(fdcluster.address, 10, trickle_interval=0.05) as slow:
            assert fdcluster.call("ping", "x", timeout=2.0) == "x", "normal client served during a trickle"
            slow.wait_closed(DEADLINE)
        wait_clean(fdcluster, slow.local_addresses)

    def test_a_slowloris_closes_its_sockets_when_the_test_body_fails(self, fdcluster):
        with pytest.raises(ZeroDivisionError):
            with faults.Slowloris(fdcluster.address, 5, trickle_interval=0.05) as slow:
                raise ZeroDivisionError("the test body fails inside the slowloris")
        assert all(sock.fileno() == -1 for sock in slow.sockets), "every slowloris socket closed on exit"


@pytest.mark.fdcluster(workers=1)
class TestSlowReader:
    def test_a_client_that_never_reads_stalls_alone(self, fdcluster):
        with faults.SlowReader(fdcluster.address, requests=2000, payload_size=64 * 1024) as reader:
            written = reader.fill(timeout=DEADLINE)
            assert reader.blocked, \
                f"the slow reader's sends stalled (wrote {written} bytes, {reader.requests_sent} requests)"
            assert written > 1 << 20
            # The same (only) worker keeps serving everyone else.
            for n in range(5):
                assert fdcluster.call("ping", n, timeout=2.0) == n, "others served while a client never reads"
            address = reader.local_address
        snap = wait_clean(fdcluster, [address])
        assert_no_close_wait(snap)


class TestStorms:
    def test_a_storm_of_300_connections_is_all_answered(self, fdcluster):
        result = faults.ConnectionStorm(fdcluster.address, 300, concurrency=300).run()
        assert result.answered == result.connected == 300, f"every storm connection answered: {result}"
        assert result.refused == result.reset == result.timed_out == result.mismatched == 0
        assert len(set(result.local_addresses)) == 300
        wait_clean(fdcluster, result.local_addresses)

    def test_held_storm_connections_are_spread_round_robin(self, fdcluster):
        # One at a time: a worker's acknowledgement leaves before its answer, so its
        # handoff window (4) never fills and round-robin never has to skip it.
        with faults.ConnectionStorm(fdcluster.address, 40, concurrency=1, hold=True) as storm:
            result = storm.run()
            assert result.answered == 40
            counts = fdcluster.connections_per_worker(result.local_addresses)
            assert_round_robin(counts, tolerance=1)
        wait_clean(fdcluster, result.local_addresses)

    def test_a_storm_without_ping_only_connects(self, fdcluster):
        with faults.ConnectionStorm(fdcluster.address, 50, concurrency=50, ping=False) as storm:
            result = storm.run()
        assert result.connected == 50 and result.answered == 0
        wait_clean(fdcluster, result.local_addresses)

    def test_a_storm_against_a_closed_port_is_refused(self):
        with socket.socket() as placeholder:
            placeholder.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
            result = faults.ConnectionStorm(placeholder.getsockname(), 20, concurrency=5, timeout=5.0).run()
        assert result.refused == 20 and result.connected == 0, str(result)


class TestKillDuringHandoff:
    @pytest.mark.fdcluster(workers=2)
    def test_unacknowledged_connections_of_a_killed_worker_are_all_answered(self, fdcluster):
        with faults.kill_during_handoff(fdcluster, worker=0, connections=4) as kill:
            assert kill.confirmed_by_stats and len(kill.clients) == 4
            answers = kill.answers(timeout=DEADLINE)
            lost = [(index, answer) for index, answer in answers if answer != pong(kill.params[index])]
            assert not lost, f"no connection lost to the worker's death: unanswered {lost}"
            stats = fdcluster.stats()
            assert stats["master"]["redistributed"] - kill.redistributed_before == 4, (
                f"redistributed == connections: {stats['master']}")
            fdcluster.wait_for_workers(gone=[kill.frozen_pid])
        assert fdcluster.call("ping", "after") == "after"
        assert event_names(fdcluster)[-3:] == ["kill_during_handoff", "SIGSTOP", "SIGKILL"], \
            f"the fault, then the pause and kill it made, in the cluster's events: {fdcluster.events}"

    def test_a_target_without_stats_is_observed_from_outside(self, fdcluster_factory):
        command = (f"{sys.executable} -m fdcluster_server --host {{host}} --port {{port}} --workers {{workers}} "
                   "--control none --log-level error")
        cluster = fdcluster_factory.start(workers=2, server=command)
        assert cluster.stats() is None
        with faults.kill_during_handoff(cluster, worker=1, connections=4) as kill:
            assert not kill.confirmed_by_stats and len(kill.clients) == 4
            answers = kill.answers(timeout=DEADLINE)
            lost = [(index, answer) for index, answer in answers if answer != pong(kill.params[index])]
            assert not lost, f"no connection lost to the worker's death: unanswered {lost}"
            cluster.wait_for_workers(gone=[kill.frozen_pid])

    @pytest.mark.fdcluster(workers=2)
    def test_asking_for_more_than_the_handoff_window_fails_cleanly(self, fdcluster):
        with pytest.raises(faults.FaultError, match="handoff window"):
            faults.kill_during_handoff(fdcluster, connections=5, timeout=3.0)
        assert not fdcluster.paused, "the frozen worker resumed after the failed fault"
        assert fdcluster.call("ping", "ok", timeout=DEADLINE) == "ok"


def event_names(cluster: Cluster) -> List[str]:
    return [what.split(" ")[0] for _, what in cluster.events]


class TestOneShape:
    """Every injector takes a Cluster, is one call or a context manager, and records itself."""

    def test_every_injector_records_itself_with_its_parameters(self, fdcluster, caplog):
        frame = protocol.request("ping", PARAMS)
        with caplog.at_level(logging.INFO, logger="fdcluster.faults"):
            with fdcluster.client() as client:
                faults.send_in_pieces(client, frame, 3, delay=0.001, cluster=fdcluster)
                faults.byte_by_byte(client, frame, cluster=fdcluster)
                assert [client.recv_frame(), client.recv_frame()] == [pong(PARAMS)] * 2
            faults.rst_close(fdcluster.client(), cluster=fdcluster)
            faults.truncate_and_close(fdcluster, frame, keep=5)
            assert faults.half_close_request(fdcluster, "ping", 1) == pong(1)
            with faults.Slowloris(fdcluster, 3):
                pass
            with faults.SlowReader(fdcluster, requests=64) as reader:
                assert reader.requests_sent > 0, "entering a slow reader fills it"
            with faults.ConnectionStorm(fdcluster, 10, concurrency=5) as storm:
                assert storm.result is not None and storm.result.answered == 10, "entering a storm runs it"
            faults.RstStorm(fdcluster, 10).run()
        expected = ["send_in_pieces", "byte_by_byte", "rst_close", "truncate_and_close", "half_close_request",
                    "slowloris", "slow_reader", "connection_storm", "rst_storm"]
        assert event_names(fdcluster)[-len(expected):] == expected, f"every injection recorded: {fdcluster.events}"
        text = "\n".join(what for _, what in fdcluster.events)
        for detail in (f"sizes=[{len(frame) // 3}", "delay=0.001", "keep=5", "count=3 partial=5",
                       "requests=64 payload_size=65536", "count=10 concurrency=5", "hold=False", "partial=True"):
            assert detail in text, f"{detail!r} among the recorded parameters:\n{text}"
        logged = [r.getMessage() for r in caplog.records if r.name == "fdcluster.faults" and r.levelno == logging.INFO]
        for name in expected:
            assert any(f"{fdcluster.name}: {name}" in line for line in logged), f"{name} logged at INFO: {logged}"

    def test_a_plain_address_is_logged_not_recorded(self, fdcluster, caplog):
        before = list(fdcluster.events)
        with caplog.at_level(logging.INFO, logger="fdcluster.faults"):
            faults.truncate_and_close(fdcluster.address, protocol.request("ping", 1), keep=2)
        assert fdcluster.events == before, "no cluster, nothing recorded in one"
        line = f"{format_address(fdcluster.address)}: truncate_and_close frame=<28 bytes> keep=2 local=127.0.0.1:"
        assert any(r.getMessage().startswith(line) for r in caplog.records), [r.getMessage() for r in caplog.records]

    def test_a_held_storm_as_a_context_manager(self, fdcluster):
        with faults.ConnectionStorm(fdcluster, 12, concurrency=4, hold=True) as storm:
            assert storm.result.answered == 12 and len(storm.held) == 12
            assert storm.run() is storm.result, "a storm runs once: run() again returns its counts"
            assert sum(fdcluster.connections_per_worker(storm.result.local_addresses).values()) == 12
        assert not storm.held, "held connections closed on exit"
        wait_clean(fdcluster, storm.result.local_addresses)

    def test_anything_else_is_refused_by_name(self):
        with pytest.raises(TypeError, match="a Cluster or a \\(host, port\\) address"):
            faults.Slowloris("127.0.0.1", 1)
