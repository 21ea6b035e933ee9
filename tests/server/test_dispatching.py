"""Which worker gets which connection, told apart from outside by who holds the socket."""

from __future__ import annotations

from collections import Counter

from conftest import call, connect, wait_for


def open_and_locate(server, count):
    socks, owners = [], []
    for _ in range(count):
        sock = connect(server.address)
        call(sock, "ping")  # served, so the worker has it and the master has let go
        socks.append(sock)
        owners.append(wait_for(lambda sock=sock: server.owner(sock), what="the socket's owner"))
    return socks, owners


class TestRoundRobin:
    def test_sequential_connections_spread_exactly(self, start_server):
        k, m = 3, 4
        server = start_server("--workers", str(k))
        owners = []
        for _ in range(k * m):
            with connect(server.address) as sock:
                call(sock, "ping")
                owners.append(wait_for(lambda: server.owner(sock), what="the socket's owner"))
        counts = Counter(owners)
        assert set(counts) == set(server.workers()), f"owners {counts} vs workers {server.workers()}"
        assert sorted(counts.values()) == [m] * k, f"per-worker connections: {dict(counts)}"

    def test_master_holds_no_client_socket_after_handoff(self, start_server):
        server = start_server("--workers", "2")
        socks, owners = open_and_locate(server, 6)
        try:
            assert server.pid not in owners
            import psutil
            held = [c for c in psutil.Process(server.pid).net_connections("tcp") if c.raddr]
            assert held == [], f"master still holds client sockets: {held}"
        finally:
            for sock in socks:
                sock.close()


class TestLeastConnections:
    def test_new_connections_go_to_the_least_loaded(self, start_server):
        server = start_server("--workers", "2", "--strategy", "least-connections")
        socks, owners = open_and_locate(server, 4)
        first = owners[0]
        try:
            for sock, owner in zip(socks, owners):
                if owner == first:
                    sock.close()
            wait_for(lambda: [w["active"] for w in server.stats()["workers"] if w["pid"] == first] == [0],
                     what="the first worker to report its connections closed")
            more, more_owners = open_and_locate(server, 2)
            socks += more
            assert more_owners == [first, first], "both new connections belong on the emptied worker"
        finally:
            for sock in socks:
                sock.close()


class TestSharedAccept:
    def test_workers_accept_and_master_does_not(self, start_server):
        server = start_server("--workers", "2", "--strategy", "shared-accept")
        socks, owners = open_and_locate(server, 6)
        try:
            assert set(owners) <= set(server.workers())
            stats = server.stats()
            assert stats["master"]["accepted"] == 0
            assert sum(w["accepted"] for w in stats["workers"]) == 6
        finally:
            for sock in socks:
                sock.close()
