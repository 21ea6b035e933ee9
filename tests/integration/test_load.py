"""Integration tests of pytest_fdcluster.load: counts, percentiles, per-worker spread, processes, checking.

Most tests drive the reference server; the error kinds are provoked by a
small misbehaving server in a thread of this process, which answers some
pings wrongly, some with error frames and one never.  Another small server
answers correctly with Python's default JSON spacing: answers are judged by
value, never by the reference server's bytes.  A share of misbehaving
clients (``fault=``) must never count as the load's errors.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from contextlib import closing
from typing import Any, Iterator, List, Optional

import pytest

from fdcluster_server import protocol
from pytest_fdcluster import faults
from pytest_fdcluster.checks import assert_round_robin
from pytest_fdcluster.faults.misbehaviours import MISBEHAVIOURS, choose_misbehaving
from pytest_fdcluster.load import ERROR_KINDS, MAX_DURATION, LoadResult, check_response, run_load

WORKERS = ["worker 0", "worker 1"]


def unicode_payload(i: int) -> Any:
    """Module-level, so spawned load processes can import it."""
    return {"i": i, "text": f"naïve ✓ 東京 {i}", "nested": [i, {"deep": None}]}


def body_of(frame: bytes) -> bytes:
    return frame[protocol.HEADER_SIZE:]


def assert_monotone_percentiles(result: LoadResult) -> None:
    figures = [result.p50, result.p90, result.p99, result.p999, result.max]
    assert all(value > 0 for value in figures), f"latencies recorded: {figures}"
    assert figures == sorted(figures), f"percentiles monotone (p50 <= p90 <= p99 <= p99.9 <= max): {figures}"


class TestCounting:
    def test_a_request_count_is_met_exactly_on_keepalive_connections(self, fdcluster):
        result = run_load(fdcluster.address, clients=4, requests=1000, cluster=fdcluster)
        assert result.requests_ok == 1000 and not result.errors, str(result)
        assert result.histogram.count == 1000
        assert result.connections == 4
        assert result.throughput > 0 and result.duration > 0
        assert_monotone_percentiles(result)
        assert result.per_worker == {"worker 0": 2, "worker 1": 2}, f"connections spread over all workers:\n{result}"
        assert sum(result.requests_per_worker.values()) == 1000

    def test_a_duration_ends_the_run(self, fdcluster):
        result = run_load(fdcluster.address, clients=2, duration=0.3)
        assert result.requests_ok > 0 and not result.errors, str(result)
        assert 0.3 <= result.duration < 0.3 + 5.0
        assert result.per_worker is None  # no cluster given

    def test_the_first_bound_reached_wins(self, fdcluster):
        result = run_load(fdcluster.address, clients=3, requests=50, duration=60.0)
        assert result.requests_ok == 50 and result.duration < 60.0

    def test_a_connection_per_request(self, fdcluster):
        result = run_load(fdcluster.address, clients=4, requests=100, keepalive=False, cluster=fdcluster)
        assert result.requests_ok == 100 and result.connections == 100 and not result.errors, str(result)
        assert result.per_worker is None, "per-request mode is observed only with observe=True"

    def test_a_connection_per_request_observed(self, fdcluster):
        result = run_load(fdcluster.address, clients=2, requests=40, keepalive=False, cluster=fdcluster, observe=True)
        assert result.requests_ok == 40
        assert sorted(result.per_worker) == WORKERS and sum(result.per_worker.values()) == 40, str(result)
        assert_round_robin(result.per_worker, tolerance=2)

    @pytest.mark.fdcluster(workers=3)
    def test_every_worker_appears_in_the_spread(self, fdcluster):
        result = run_load(fdcluster.address, clients=6, requests=600, cluster=fdcluster)
        assert result.per_worker == {"worker 0": 2, "worker 1": 2, "worker 2": 2}, str(result)

    def test_payloads_fixed_and_computed(self, fdcluster):
        fixed = run_load(fdcluster.address, clients=2, requests=100, payload={"fixed": [1, 2, "✓"]})
        computed = run_load(fdcluster.address, clients=2, requests=100, payload=unicode_payload, method="echo")
        assert fixed.requests_ok == computed.requests_ok == 100, f"{fixed}\n{computed}"

    def test_the_summary_table(self, fdcluster):
        text = str(run_load(fdcluster.address, clients=2, requests=20, cluster=fdcluster))
        for expected in ("2 clients in 1 process", "keep-alive", "20 ok", "req/s", "p50", "p99.9", "max",
                         "connections", "worker 0", "worker 1"):
            assert expected in text, f"{expected!r} in\n{text}"


class TestProcesses:
    def test_clients_spread_over_processes_are_merged(self, fdcluster):
        result = run_load(fdcluster.address, clients=4, requests=2000, processes=2, cluster=fdcluster,
                          payload=unicode_payload)
        assert result.processes == 2
        assert result.requests_ok == 2000 and not result.errors, str(result)
        assert result.histogram.count == 2000
        assert_monotone_percentiles(result)
        assert result.per_worker == {"worker 0": 2, "worker 1": 2}, str(result)
        assert "2 processes" in str(result)

    def test_a_duration_run_over_processes(self, fdcluster):
        result = run_load(fdcluster.address, clients=2, duration=0.3, processes=2)
        assert result.requests_ok > 0 and not result.errors, str(result)
        assert 0.3 <= result.duration < 5.0


class TestValidation:
    @pytest.mark.parametrize("kwargs, message", [
        ({}, "requests or duration"),
        ({"duration": MAX_DURATION + 1}, "duration must be within"),
        ({"duration": 0}, "duration must be within"),
        ({"requests": 0}, "requests must be"),
        ({"requests": 1, "clients": 0}, "clients must be"),
        ({"requests": 1, "processes": 0}, "processes must be"),
    ])
    def test_bad_bounds_are_rejected(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            run_load(("127.0.0.1", 9), **kwargs)


class TestChecker:
    def test_the_exact_answer_passes(self):
        params = {"a": [1, "✓"]}
        body = body_of(protocol.response("pong", params))
        assert check_response(body, params, "ping", expected_body=body) is None
        assert check_response(body, params, "ping") is None

    @pytest.mark.parametrize("frame, params, kind", [
        (protocol.response("pong", 2), 1, "mismatched"),  # another request's answer
        (protocol.response("echo", 1), 1, "mismatched"),  # wrong out for ping
        (protocol.response("pong", True), 1, "mismatched"),  # true is not 1
        (protocol.response("pong", [1]), [1, 2], "mismatched"),
        (protocol.encode({"out": "pong"}), 1, "mismatched"),  # no result at all
        (protocol.encode([1, 2]), 1, "mismatched"),  # not an object
        (protocol.encode_body(b"{not json"), 1, "mismatched"),
        (protocol.encode_body(b"\xff\xfe"), 1, "mismatched"),  # not UTF-8
        (protocol.error("unknown method"), 1, "error-frame"),
    ])
    def test_wrong_answers_are_classified(self, frame, params, kind):
        assert check_response(body_of(frame), params, "ping") == kind

    def test_json_equivalents_pass(self):
        # A tuple goes out as a list; another server may write 1.0 as 1.
        assert check_response(body_of(protocol.response("pong", [1, 2])), (1, 2), "ping") is None
        assert check_response(body_of(protocol.response("pong", 1)), 1.0, "ping") is None

    def test_other_methods_only_need_a_non_error_answer(self):
        assert check_response(body_of(protocol.response("ok", 42)), "anything", "sum") is None
        assert check_response(body_of(protocol.error("boom")), "anything", "sum") == "error-frame"


class MisbehavingServer:
    """Answers ping(i) wrongly when i % 5 == 0, with an error frame when i % 7 == 0, never when i == 3."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = self.listener.getsockname()[:2]
        self.stopped = threading.Event()
        self.connections: List[socket.socket] = []
        self.threads = [threading.Thread(target=self.accept_loop, daemon=True)]
        self.threads[0].start()

    def accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections.append(conn)
            thread = threading.Thread(target=self.serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def serve(self, conn: socket.socket) -> None:
        decoder = protocol.FrameDecoder()
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for body in decoder.feed(data):
                    reply = self.reply(*protocol.parse_request(body))
                    if reply is not None:
                        conn.sendall(reply)
        except OSError:
            return

    def reply(self, method: str, i: Any) -> Optional[bytes]:
        """The frame answering ``method(i)``, or None to stay silent."""
        if i % 5 == 0:
            return protocol.response("pong", i + 1)
        if i % 7 == 0:
            return protocol.error("seven")
        return None if i == 3 else protocol.response("pong", i)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for conn in self.connections:
            conn.close()
        for thread in self.threads:
            thread.join(5.0)


class SpacedJsonServer(MisbehavingServer):
    """A correct server that writes its answers with ``json.dumps``' default spacing and its own key order."""

    def reply(self, method: str, params: Any) -> Optional[bytes]:
        return protocol.encode_body(json.dumps({"result": params, "out": "pong"}).encode("utf-8"))


@pytest.fixture
def misbehaving() -> Iterator[MisbehavingServer]:
    with closing(MisbehavingServer()) as server:
        yield server


@pytest.fixture
def spaced() -> Iterator[SpacedJsonServer]:
    with closing(SpacedJsonServer()) as server:
        yield server


class TestErrorKinds:
    def test_wrong_answers_error_frames_and_silence_are_counted(self, misbehaving):
        result = run_load(misbehaving.address, clients=1, requests=100, timeout=0.5)
        mismatches = sum(1 for i in range(100) if i % 5 == 0)
        error_frames = sum(1 for i in range(100) if i % 7 == 0 and i % 5)
        assert result.errors == {"mismatched": mismatches, "error-frame": error_frames, "timed_out": 1}, str(result)
        assert result.requests_ok == 100 - mismatches - error_frames - 1
        assert result.requests == 100
        assert set(result.errors) <= set(ERROR_KINDS)
        assert "mismatched 20" in str(result)

    def test_a_closed_port_counts_refusals(self):
        with socket.socket() as placeholder:
            placeholder.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
            result = run_load(placeholder.getsockname()[:2], clients=2, requests=6, timeout=1.0)
        assert result.errors == {"refused": 6} and result.requests_ok == 0, str(result)
        assert math.isnan(result.p50)


class TestJudgedByValue:
    def test_spaced_json_is_a_correct_answer(self):
        params = {"storm": 1, "nonce": "n"}
        body = json.dumps({"out": "pong", "result": params}).encode()
        assert body != body_of(protocol.response("pong", params)), "not the reference server's bytes"
        assert check_response(body, params, "ping", expected_body=body_of(protocol.response("pong", params))) is None

    def test_a_storm_and_a_load_against_spaced_json_report_no_mismatch(self, spaced):
        storm = faults.ConnectionStorm(spaced.address, 100, concurrency=20).run()
        assert storm.mismatched == 0 and storm.answered == 100, f"answers judged by JSON value: {storm}"
        result = run_load(spaced.address, clients=2, requests=200, payload=unicode_payload)
        assert result.requests_ok == 200 and not result.errors, f"answers judged by JSON value:\n{result}"


class TestClusterTarget:
    def test_a_cluster_is_its_own_address_and_is_observed(self, fdcluster, caplog):
        with caplog.at_level(logging.INFO, logger="fdcluster"):
            result = run_load(fdcluster, clients=4, requests=400)
        assert result.requests_ok == 400 and not result.errors, str(result)
        assert result.per_worker == {"worker 0": 2, "worker 1": 2}, f"spread observed without cluster=:\n{result}"
        events = [what for _, what in fdcluster.events]
        assert any(e.startswith("load clients=4 requests=400") for e in events), f"the run recorded: {events}"
        assert any(e.startswith("load done ok=400 failed=0") for e in events), f"its end recorded: {events}"
        assert any("load done ok=400" in r.getMessage() for r in caplog.records if r.name == "fdcluster.load")

    def test_an_address_with_cluster_keeps_working(self, fdcluster):
        result = run_load(fdcluster.address, clients=2, requests=20, cluster=fdcluster)
        assert result.per_worker == {"worker 0": 1, "worker 1": 1}, str(result)

    @pytest.mark.parametrize("processes", [1, 2])
    def test_progress_is_logged_once_a_second(self, fdcluster, caplog, processes):
        with caplog.at_level(logging.INFO, logger="fdcluster.load"):
            result = run_load(fdcluster, clients=2, duration=2.6, processes=processes)
        lines = [r.getMessage() for r in caplog.records if "req/s" in r.getMessage()]
        assert 2 <= len(lines) <= 4, f"one progress line a second over {result.duration:.1f} s: {lines}"
        assert all("requests ok" in line and "failed" in line for line in lines), lines


def hold_two_seconds_unless_closed(sock: socket.socket) -> None:
    """A callable fault: sends nothing, reads until the server closes or 2 s pass (module-level, for processes)."""
    sock.settimeout(2.0)
    try:
        sock.recv(1)
    except socket.timeout:
        pass


class TestMisbehavingShare:
    def test_the_share_is_exact_seeded_and_never_everyone(self):
        assert choose_misbehaving(10, 0.2, seed=3) == choose_misbehaving(10, 0.2, seed=3)
        assert len(choose_misbehaving(10, 0.2, seed=3)) == 2
        assert len(choose_misbehaving(4, 0.01)) == 1, "a fault asked for is injected at least once"
        assert len(choose_misbehaving(4, 0.99)) == 3, "at least one client is measured"
        assert {tuple(choose_misbehaving(20, 0.25, seed)) for seed in range(5)} != {tuple(choose_misbehaving(20, 0.25))}

    @pytest.mark.parametrize("kwargs, message", [
        ({"fault": "teleport"}, "fault must be one of"),
        ({"fault": 42}, "fault must be one of"),
        ({"fault": "rst", "fraction": 0}, "fraction must be within"),
        ({"fault": "rst", "fraction": 1.0}, "fraction must be within"),
        ({"fault": "rst", "clients": 1}, "at least 2 clients"),
    ])
    def test_bad_faults_are_rejected(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            run_load(("127.0.0.1", 9), requests=1, **kwargs)

    @pytest.mark.parametrize("fault", MISBEHAVIOURS)
    def test_misbehaving_connections_are_not_the_loads_errors(self, fdcluster, fault):
        result = run_load(fdcluster, clients=10, requests=800, fault=fault, fraction=0.2, seed=3)
        bad = result.misbehaving
        assert bad is not None and bad.clients == choose_misbehaving(10, 0.2, 3) and bad.fault == fault
        assert bad.connections >= 2, f"each misbehaving client opened a connection:\n{result}"
        assert result.requests_ok == 800 and not result.errors, f"the measured clients saw no error:\n{result}"
        assert result.histogram.count == 800
        assert result.connections == 8 and sum(result.per_worker.values()) == 8, \
            f"only the measured connections are placed on workers:\n{result}"
        assert f"misbehaving  2 clients {bad.clients} ({fault}" in str(result)
        events = [what for _, what in fdcluster.events]
        assert any(f"fault='{fault}' fraction=0.2 seed=3" in e for e in events), f"the fault recorded: {events}"

    @pytest.mark.fdcluster(idle_timeout=0.3)
    def test_the_server_closing_held_connections_is_counted(self, fdcluster):
        result = run_load(fdcluster, clients=4, duration=1.5, fault="slowloris", fraction=0.25)
        bad = result.misbehaving
        assert bad is not None and bad.closed_by_server >= 1, f"the idle timeout closed a slowloris:\n{result}"
        assert result.requests_ok > 0 and not result.errors, str(result)

    def test_a_callable_fault_in_spawned_processes(self, fdcluster):
        result = run_load(fdcluster, clients=4, requests=400, processes=2, fault=hold_two_seconds_unless_closed,
                          fraction=0.5, seed=1)
        assert result.requests_ok == 400 and not result.errors, str(result)
        assert result.misbehaving.connections >= 2 and "hold_two_seconds_unless_closed" in result.misbehaving.fault
        assert sum(result.per_worker.values()) == 2, str(result)
