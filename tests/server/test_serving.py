"""A worker serves frames correctly whatever the client does to the byte stream."""

from __future__ import annotations

import socket
import statistics
import time

from conftest import call, closed_by_peer, connect, recv_frame, wait_for

from fdcluster_server import protocol


class TestFraming:
    def test_ping_echoes_params(self, start_server):
        server = start_server("--workers", "2")
        with connect(server.address) as sock:
            params = {"name": "Zoë 日本 🎉", "list": [1, 2.5, None, True]}
            assert call(sock, "ping", params) == {"out": "pong", "result": params}

    def test_byte_by_byte_frame(self, start_server):
        server = start_server("--workers", "1")
        frame = protocol.request("ping", "slow")
        with connect(server.address) as sock:
            for i in range(len(frame)):
                sock.send(frame[i : i + 1])
            assert recv_frame(sock) == {"out": "pong", "result": "slow"}

    def test_pipelined_frames_answered_in_order(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            sock.sendall(b"".join(protocol.request("ping", i) for i in range(200)))
            decoder = protocol.FrameDecoder()
            results = []
            while len(results) < 200:
                results += [protocol.decode_body(b)["result"] for b in decoder.feed(sock.recv(65536))]
            assert results == list(range(200))

    def test_half_close_still_gets_the_answer(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            sock.sendall(protocol.request("ping", "bye"))
            sock.shutdown(socket.SHUT_WR)
            assert recv_frame(sock) == {"out": "pong", "result": "bye"}
            assert closed_by_peer(sock) == "eof"


class TestBadInput:
    def test_malformed_json_and_unknown_method_keep_connection_usable(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            sock.sendall(protocol.encode_body(b"{not json"))
            reply = recv_frame(sock)
            assert reply["out"] == "error" and "malformed JSON" in reply["result"]
            assert call(sock, "nope") == {"out": "error", "result": "unknown method 'nope'"}
            sock.sendall(protocol.encode_body(b"[1]"))
            assert "must be a JSON object" in recv_frame(sock)["result"]
            sock.sendall(protocol.encode_body(b"\xff\xfe"))
            assert "invalid UTF-8" in recv_frame(sock)["result"]
            assert call(sock, "ping", 1) == {"out": "pong", "result": 1}

    def test_oversize_frame_gets_error_then_close(self, start_server):
        server = start_server("--workers", "1", "--max-frame", "1000")
        with connect(server.address) as sock:
            sock.sendall(protocol.HEADER.pack(1001) + b"x" * 10)
            expected = {"out": "error", "result": "frame of 1001 bytes exceeds the maximum of 1000 bytes"}
            assert recv_frame(sock) == expected
            assert closed_by_peer(sock) in ("eof", "reset")
        with connect(server.address) as sock:  # the worker lives on
            assert call(sock, "ping")["out"] == "pong"

    def test_frame_at_the_maximum_is_served(self, start_server):
        server = start_server("--workers", "1", "--max-frame", "200000")
        params = "x" * (200000 - len(protocol.request("ping", "")) + 4)
        with connect(server.address) as sock:
            frame = protocol.request("ping", params)
            assert protocol.HEADER.unpack_from(frame)[0] == 200000
            assert call(sock, "ping", params)["result"] == params

    def test_handler_exception_becomes_error_frame(self, start_server):
        server = start_server("--workers", "1", "--handlers", "handlers_for_tests")
        worker = server.workers()
        with connect(server.address) as sock:
            assert call(sock, "boom", 3) == {"out": "error", "result": "handler 'boom' raised ValueError: boom 3"}
            assert call(sock, "add", {"a": 2, "b": 3}) == {"out": "ok", "result": 5}
        assert server.workers() == worker

    def test_truncated_frame_then_close_leaves_worker_serving(self, start_server):
        server = start_server("--workers", "1")
        with connect(server.address) as sock:
            sock.sendall(protocol.request("ping", "cut")[:-3])
        with connect(server.address) as sock:
            assert call(sock, "ping")["out"] == "pong"


class TestSlowClients:
    def test_incomplete_frame_times_out(self, start_server):
        server = start_server("--workers", "1", "--idle-timeout", "0.3")
        with connect(server.address) as idle, connect(server.address) as partial:
            partial.sendall(protocol.request("ping")[:5])
            reply = recv_frame(partial)
            assert reply["out"] == "error" and "timed out" in reply["result"]
            assert closed_by_peer(partial) == "eof"
            assert call(idle, "ping")["out"] == "pong"  # idle without a partial frame is not a slowloris

    def test_hundred_idle_connections_do_not_slow_others(self, start_server):
        server = start_server("--workers", "2")

        def latencies(n=200):
            samples = []
            with connect(server.address) as sock:
                for i in range(n):
                    start = time.perf_counter()
                    call(sock, "ping", i)
                    samples.append(time.perf_counter() - start)
            return statistics.median(samples)

        baseline = latencies()
        idle = [connect(server.address) for _ in range(100)]
        try:
            for i, sock in enumerate(idle[:50]):
                sock.sendall(protocol.request("ping", i)[:3])  # half of them mid-frame
            wait_for(lambda: sum(w.get("active", 0) for w in server.stats()["workers"]) >= 100,
                     what="100 connections held")
            loaded = latencies()
        finally:
            for sock in idle:
                sock.close()
        assert loaded < baseline * 3 + 0.002, \
            f"median latency {loaded * 1e3:.2f} ms with 100 idle vs {baseline * 1e3:.2f} ms baseline"

    def test_client_that_never_reads_does_not_block_others(self, start_server):
        server = start_server("--workers", "1")
        hog = connect(server.address)
        try:
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            big = "y" * 100000
            hog.setblocking(False)
            sent = 0
            for _ in range(200):  # bounded: ~20 MB of responses requested, never read
                try:
                    sent += hog.send(protocol.request("ping", big))
                except BlockingIOError:
                    break
            with connect(server.address) as other:
                assert call(other, "ping", "still here")["result"] == "still here"
        finally:
            hog.close()
