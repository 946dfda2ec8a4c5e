"""The load generator's count of connects that waited for a SYN retransmit, read from
each socket (TCP_INFO), against the kernel's own counters: real loopback listeners
whose accept queue is full, real connects."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

from acceptrace import loadgen
from conftest import read_netstat, wait_until

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def listener(backlog: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)   # backlog 0: the accept queue holds one connection
    return s


def grew(before: dict[str, int], name: str) -> int:
    return read_netstat()[name] - before[name]


def test_a_connect_to_a_listener_with_room_sent_its_syn_once():
    with closing(listener(8)) as srv, \
            closing(socket.create_connection(srv.getsockname(), timeout=5)) as c:
        assert loadgen.syn_retransmits(c) == 0


def test_a_syn_dropped_at_a_full_accept_queue_is_counted_when_sent_again():
    before = read_netstat()
    with closing(listener(0)) as srv, \
            closing(socket.create_connection(srv.getsockname(), timeout=5)), \
            closing(socket.socket()) as c:
        c.setblocking(False)
        c.connect_ex(srv.getsockname())
        # the queue's one place is taken: the kernel drops the SYN
        assert wait_until(lambda: grew(before, "TcpExtListenOverflows") >= 1, timeout=5)
        srv.accept()[0].close()   # room again, for the retransmit a second later
        _, writable, _ = select.select([], [c], [], 10)
        assert writable and c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        n = loadgen.syn_retransmits(c)
    assert n >= 1
    # every one of them is one of the kernel's (which also counts the rest of the host's)
    assert grew(before, "TcpExtTCPSynRetrans") >= n


@contextmanager
def slow_server(backlog: int, pause_s: float) -> Iterator[tuple[str, int]]:
    """A listener that answers one connection, then pauses ``pause_s`` before the next
    accept(): its accept queue (``backlog`` 0: one place) stays full meanwhile."""
    srv = listener(backlog)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(4096)
                conn.sendall(RESPONSE)
            time.sleep(pause_s)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_the_load_counts_the_clients_whose_syn_was_dropped():
    before = read_netstat()
    with slow_server(backlog=0, pause_s=0.3) as (host, port):
        res = loadgen.run_load(host, port, duration_s=20, concurrency=6, max_requests=6,
                               connect_timeout_s=10, timeout_s=10)
    s = res.summary()
    assert s["completed"] == 6, s
    # 6 SYNs at once for one place: some were dropped, and sent again a second later
    assert 1 <= s["syn_retransmitted"] <= grew(before, "TcpExtListenDrops"), s
    assert s["syn_retransmitted"] <= grew(before, "TcpExtTCPSynRetrans"), s
    # ... and each of those connects took the retransmit's second
    assert s["slow_connects_1s"] >= s["syn_retransmitted"], s
