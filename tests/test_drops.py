"""Drops at the kernel's decision points, against the kernel's own counters.

Raw SYNs (no client socket behind them) fill a listener's SYN queue; with
net.ipv4.tcp_syncookies off the overflow is dropped (TcpExtTCPReqQFullDrop),
with it on answered with cookies (TcpExtSyncookiesSent).  The SYNs come from
an address on a veth whose peer has no address: the server's SYN-ACKs leave
through it to a neighbour that does not exist, so nothing ever answers them
with an RST and the requests stay in the SYN queue.

On the fentry and kprobe backends each drop counter must equal the kernel
counter's delta (check_drop_attribution); the tracepoint backend, which cannot
see these decisions, must say null rather than guess.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    assert_counted,
    check_drop_attribution,
    exact_drops_expected,
    read_netstat,
    scaled,
    wait_until,
)
from helpers import listener, syn_packet

pytestmark = pytest.mark.root

VETH, PEER = "at-flood0", "at-flood1"
SERVER_IP, CLIENT_IP = "198.18.7.1", "198.18.7.99"   # RFC 2544 benchmark range
CLIENT_MAC = "02:00:00:00:07:63"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture
def flood_net() -> Iterator[None]:
    """A local address whose peer never answers (see the module docstring)."""
    subprocess.run(["ip", "link", "del", VETH], capture_output=True)
    sh("ip", "link", "add", VETH, "type", "veth", "peer", "name", PEER)
    try:
        sh("ip", "addr", "add", f"{SERVER_IP}/24", "dev", VETH)
        sh("ip", "link", "set", VETH, "up")
        sh("ip", "link", "set", PEER, "up")
        # A fixed neighbour: SYN-ACKs go out at once (no ARP), and the peer drops
        # them (not its MAC).
        sh("ip", "neigh", "replace", CLIENT_IP, "lladdr", CLIENT_MAC, "dev", VETH, "nud",
           "permanent")
        yield
    finally:
        subprocess.run(["ip", "link", "del", VETH], capture_output=True)


@pytest.fixture
def syncookies() -> Iterator[Callable[[int], None]]:
    path = Path("/proc/sys/net/ipv4/tcp_syncookies")
    saved = path.read_text().strip()

    def set_to(value: int) -> None:
        path.write_text(f"{value}\n")

    yield set_to
    path.write_text(saved + "\n")


def send_syns(dport: int, n: int) -> list[int]:
    """n raw SYNs from CLIENT_IP, each from its own port; returns the ports."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    ports = random.sample(range(20000, 60000), n)
    try:
        for sport in ports:
            raw.sendto(syn_packet(CLIENT_IP, SERVER_IP, sport, dport), (SERVER_IP, 0))
    finally:
        raw.close()
    return ports


def flood_listener(backlog: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((SERVER_IP, 0))
    s.listen(backlog)
    return s


def syn_recv_count(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "syn-recv", f"sport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def run_flood(tracer, backlog: int, nsyn: int) -> tuple[dict, dict[str, int], dict[str, int], int]:
    srv = flood_listener(backlog)
    port = srv.getsockname()[1]
    t = tracer(port, "--no-dispatch").start()
    try:
        before = read_netstat()
        send_syns(port, nsyn)
        # Every SYN has been handled once the kernel's counters stop moving.
        wait_until(lambda: read_netstat()["TcpExtListenDrops"] - before["TcpExtListenDrops"]
                   + read_netstat()["TcpExtSyncookiesSent"] - before["TcpExtSyncookiesSent"]
                   + syn_recv_count(port) >= nsyn, timeout=10)
        time.sleep(0.3)
        in_synq = syn_recv_count(port)
        after = read_netstat()
    finally:
        rc = t.stop()
        srv.close()
    assert rc == 0, t.stderr
    return t.report(), before, after, in_synq


def test_syn_queue_flood_without_syncookies(tracer, flood_net, syncookies):
    """SYN queue full, no cookies: each SYN past the backlog is dropped
    (TCPReqQFullDrop); no accept-queue drop, no cookie."""
    syncookies(0)
    backlog, nsyn = 8, 40
    run, before, after, in_synq = run_flood(tracer, backlog, nsyn)
    dropped = after["TcpExtTCPReqQFullDrop"] - before["TcpExtTCPReqQFullDrop"]
    # The SYN queue holds backlog + 1 requests (the kernel's "full" is qlen > backlog)
    assert in_synq == backlog + 1
    assert dropped == nsyn - in_synq     # and the kernel dropped the rest
    assert after["TcpExtSyncookiesSent"] == before["TcpExtSyncookiesSent"]
    check_drop_attribution(run, before, after)
    if exact_drops_expected(run):
        # (what kprobes could not see: at most extra.packets_unseen, see conftest)
        assert_counted(run, run["drops"]["syn_dropped_synq_full"], nsyn - in_synq,
                       "syn_dropped_synq_full")
        assert run["drops"]["syn_dropped_acceptq_full"] == 0
        assert_counted(run, run["extra"]["syns"], nsyn, "syn_dropped_synq_full")
    assert run["kernel_counters"]["TcpExtTCPReqQFullDrop"] == dropped


def test_syn_queue_flood_with_syncookies(tracer, flood_net, syncookies):
    """SYN queue full, cookies on: the SYNs past the backlog get a cookie
    (SyncookiesSent), nothing is dropped."""
    syncookies(1)
    backlog, nsyn = 8, 40
    run, before, after, in_synq = run_flood(tracer, backlog, nsyn)
    cookies = after["TcpExtSyncookiesSent"] - before["TcpExtSyncookiesSent"]
    assert in_synq == backlog + 1
    assert cookies == nsyn - in_synq
    assert after["TcpExtTCPReqQFullDrop"] == before["TcpExtTCPReqQFullDrop"]
    check_drop_attribution(run, before, after)
    if exact_drops_expected(run):
        assert_counted(run, run["drops"]["syncookies_sent"], nsyn - in_synq, "syncookies_sent")
        assert run["drops"]["syn_dropped_synq_full"] == 0
    assert run["kernel_counters"]["TcpExtSyncookiesSent"] == cookies


def test_first_syn_dropped_client_waits_a_second(tracer, syncookies):
    """listen(1) holds two; a third client's SYN is dropped (accept queue full)
    and retransmitted after 1 s, by when the queue was drained.  The report
    counts exactly the clients whose connect() took a retransmit."""
    syncookies(1)
    srv = listener(1)
    port = srv.getsockname()[1]
    t = tracer(port, "--no-dispatch").start()
    took: list[float] = []
    clients: list[socket.socket] = []

    def connect() -> None:
        c = socket.socket()
        t0 = time.monotonic()
        c.connect(("127.0.0.1", port))
        took.append(time.monotonic() - t0)
        c.sendall(b"x")   # the server's first read ends the connection's story
        clients.append(c)

    try:
        before = read_netstat()
        threads = []
        for _ in range(3):
            th = threading.Thread(target=connect)
            th.start()
            threads.append(th)
            time.sleep(0.05)
        time.sleep(0.4)
        accepted = []
        srv.settimeout(scaled(5))
        for _ in range(3):
            conn, _ = srv.accept()   # two at once; the third after its SYN retransmit
            conn.settimeout(scaled(5))
            assert conn.recv(1) == b"x"
            accepted.append(conn)
        for th in threads:
            th.join(5)
        time.sleep(0.2)
        after = read_netstat()
    finally:
        rc = t.stop()
        for s in [*clients, *locals().get("accepted", [])]:
            s.close()
        srv.close()
    assert rc == 0, t.stderr
    run = t.report()
    waited = sum(1 for x in took if x >= 0.9)
    assert waited >= 1, took        # the third client's first SYN was dropped
    assert after["TcpExtListenOverflows"] - before["TcpExtListenOverflows"] >= waited
    check_drop_attribution(run, before, after)
    if not exact_drops_expected(run):
        assert run["connections"]["syn_retried"] is None
        return
    assert run["connections"]["syn_retried"] == waited
    retried = [s for s in run["slowest"] if s["syn_retransmits"]]
    assert len(retried) == waited
    for s in retried:
        # first SYN -> the retransmit that got through: TCP's initial RTO, 1 s
        assert 0.9e6 <= s["syn_retry_us"] <= 1.5e6, s
        assert s["syn_to_accept_us"] >= s["syn_retry_us"]
        assert s["handshake_us"] < 0.5e6   # from the SYN that got through
    text = subprocess.run(
        [sys.executable, "-m", "acceptrace", "report", str(t.json_path)],
        capture_output=True, text=True).stdout
    assert f"{waited} connection" in text and "first SYN was dropped" in text, text


def test_syncookie_connection_gets_a_handshake_time(tracer, syncookies):
    """tcp_syncookies=2 answers every SYN with a cookie: no request is kept, so the
    tracepoint backend (which reads the request's SYN-ACK time) has no SYN time,
    while fentry/kprobe saw the SYN itself and time the handshake like any other."""
    syncookies(2)
    srv = listener(8)
    port = srv.getsockname()[1]
    t = tracer(port, "--no-dispatch").start()
    try:
        before = read_netstat()
        c = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        c.sendall(b"x")
        assert conn.recv(1) == b"x"
        time.sleep(0.2)
        after = read_netstat()
    finally:
        assert t.stop() == 0, t.stderr
        srv.close()
    c.close()
    conn.close()
    assert after["TcpExtSyncookiesSent"] - before["TcpExtSyncookiesSent"] == 1
    assert after["TcpExtSyncookiesRecv"] - before["TcpExtSyncookiesRecv"] == 1
    run = t.report()
    assert run["drops"]["syncookies"] == 1          # the queued connection came by cookie
    (s,) = run["slowest"]
    assert s["syncookie"] is True
    check_drop_attribution(run, before, after)
    if exact_drops_expected(run):
        assert run["drops"]["syncookies_sent"] == 1
        assert run["stages"]["handshake"]["count"] == 1
        assert s["handshake_us"] is not None and s["syn_to_accept_us"] >= s["handshake_us"]
        assert s["syn_retransmits"] == 0
    else:
        assert run["stages"]["handshake"]["count"] == 0
        assert s["handshake_us"] is None and s["syn_to_accept_us"] is None
