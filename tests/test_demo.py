"""The demo target, server processes, the load generator and the kernel's counters.

Real sockets on loopback, no BPF and no root needed.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from acceptrace import procnet
from acceptrace.demo import ServerProcess, ServerStartError, free_port
from acceptrace.loadgen import LoadResult, main, run_load

NETSTAT_NAMES = (
    "TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtSyncookiesSent",
    "TcpExtTCPReqQFullDrop", "TcpExtTCPReqQFullDoCookies", "TcpPassiveOpens",
)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the demo recipe ----------------------------------------------------------------------------

def test_demo_target_overflows_the_accept_queue():
    """backlog 8, 20 ms of blocked event loop per request, 64 clients on new connections:
    the kernel counts listen overflows, on this very listener too; requests still complete."""
    port = free_port()
    with ServerProcess(port=port, backlog=8, env={"ACCEPTRACE_DEMO_BLOCK_MS": "20"}) as srv:
        srv.wait_listening()
        pid = srv.pid
        (listener,) = procnet.listener_drops(port).values()
        before = procnet.net_netstat()
        res = run_load("127.0.0.1", port, duration_s=3, concurrency=64,
                       connect_timeout_s=3.5, timeout_s=5)
        after = procnet.net_netstat()
        listener_after = procnet.listener_drops(port)[listener.inode]
    summary = res.summary()
    assert res.completed > 0, summary
    deltas = procnet.counter_deltas(before, after, NETSTAT_NAMES)
    assert deltas["TcpExtListenOverflows"] > 0, deltas
    # Counters are per namespace, so other traffic could move them: the listener's own
    # sk_drops proves it was this server's queue.
    assert listener.send_q == 8
    assert listener_after.drops > listener.drops
    # A SYN dropped at the full queue is retransmitted after 1 s: clients' sockets sent
    # their SYN again, or gave up connecting (all their retransmits dropped too), and each
    # of those connects took the retransmit's second.
    assert summary["syn_retransmitted"] > 0 or res.connect_timeouts > 0, summary
    assert summary["slow_connects_1s"] >= summary["syn_retransmitted"], summary
    assert srv.proc is not None and srv.proc.returncode is not None
    assert group_gone(pid)


def test_demo_routes():
    port = free_port()
    with ServerProcess(port=port, backlog=16, env={"ACCEPTRACE_DEMO_BLOCK_MS": "0"}) as srv:
        srv.wait_listening()
        for path in ("/", "/health", "/slow?ms=50"):
            res = run_load("127.0.0.1", port, duration_s=10, concurrency=1, path=path,
                           max_requests=1)
            assert res.completed == 1, (path, res.summary())
        res = run_load("127.0.0.1", port, duration_s=10, concurrency=1, path="/slow?ms=300",
                       max_requests=1)
        assert res.total_s[0] >= 0.3


def test_server_process_exit_reported_with_stderr():
    srv = ServerProcess("acceptrace.no_such_module:app", port=free_port())
    with srv, pytest.raises(ServerStartError, match="exited with .*no_such_module"):
        srv.wait_listening(timeout=30)
    assert group_gone(srv.pid)


def test_server_process_stopped_on_exception():
    port = free_port()
    with pytest.raises(KeyError), ServerProcess(port=port, backlog=16, workers=2) as srv:
        srv.wait_listening()
        pid = srv.pid
        raise KeyError("boom")
    assert group_gone(pid)
    assert not procnet.listening_sockets(port)


def test_server_process_killed_when_sigterm_ignored(tmp_path):
    """A server that ignores SIGTERM is killed after the timeout."""
    mod = tmp_path / "stubborn_app.py"
    # uvicorn installs its SIGTERM handler before the lifespan startup: ignore it there.
    mod.write_text(
        "import signal\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] == 'lifespan':\n"
        "        await receive()\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "        await send({'type': 'lifespan.startup.complete'})\n"
        "        await receive()\n"
    )
    srv = ServerProcess("stubborn_app:app", port=free_port(), backlog=16,
                        env={"PYTHONPATH": str(tmp_path)})
    with srv:
        srv.wait_listening()
        t0 = time.monotonic()
        srv.stop(timeout=1.0)
        assert time.monotonic() - t0 < 8
    assert srv.proc is not None and srv.proc.returncode == -signal.SIGKILL
    assert group_gone(srv.pid)


# --- procnet ------------------------------------------------------------------------------------

def _pair_of_listeners(backlog: int) -> tuple[socket.socket, socket.socket, int]:
    """An IPv4 (127.0.0.1) and an IPv6 (::1, v6only) listener on one port."""
    for _ in range(20):
        s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s6.bind(("::1", port))
        except OSError:
            s4.close()
            s6.close()
            continue
        s4.listen(backlog)
        s6.listen(backlog)
        return s4, s6, port
    pytest.fail("no port free on both 127.0.0.1 and ::1")


@pytest.fixture
def listeners(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket, int]]:
    s4, s6, port = _pair_of_listeners(getattr(request, "param", 5))
    try:
        yield s4, s6, port
    finally:
        s4.close()
        s6.close()


def test_listening_sockets_ipv4_and_ipv6(listeners):
    s4, s6, port = listeners
    found = {(s.family, s.address, s.port, s.inode) for s in procnet.listening_sockets(port)}
    assert found == {
        ("ipv4", "127.0.0.1", port, os.fstat(s4.fileno()).st_ino),
        ("ipv6", "::1", port, os.fstat(s6.fileno()).st_ino),
    }
    s4.close()
    assert [s.family for s in procnet.listening_sockets(port)] == ["ipv6"]


def test_listening_sockets_wildcard_and_not_connected():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        port = s.getsockname()[1]
        assert procnet.listening_sockets(port) == []  # bound is not listening
        s.listen(3)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            (ls,) = procnet.listening_sockets(port)  # the established pair is not listed
        assert (ls.family, ls.address, ls.inode) == ("ipv6", "::", os.fstat(s.fileno()).st_ino)
        (st,) = procnet.listener_drops(port).values()
        assert (st.family, st.address, st.inode, st.send_q) == ("ipv6", "::", ls.inode, 3)


def test_listener_drops_backlog_depth_inode(listeners):
    s4, s6, port = listeners
    stats = procnet.listener_drops(port)
    want = {os.fstat(s.fileno()).st_ino: (fam, addr)
            for s, fam, addr in ((s4, "ipv4", "127.0.0.1"), (s6, "ipv6", "::1"))}
    assert set(stats) == set(want)
    for ino, st in stats.items():
        assert (st.family, st.address) == want[ino]
        assert (st.port, st.inode, st.send_q, st.backlog, st.recv_q, st.drops) == (
            port, ino, 5, 5, 0, 0)
    assert stats == {s.inode: s for s in procnet.sock_diag_listeners(port)}


@pytest.mark.parametrize("listeners", [1], indirect=True)
def test_listener_drops_count_overflow(listeners):
    """20 connects at a listen(1) socket that never accepts: 2 queued, the rest dropped."""
    s4, s6, port = listeners
    before = procnet.listener_drops(port)
    assert {st.send_q for st in before.values()} == {1}
    clients = []
    try:
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for _ in range(20):
                c = socket.socket(family, socket.SOCK_STREAM)
                clients.append(c)
                c.setblocking(False)
                try:
                    c.connect((addr, port))
                except BlockingIOError:
                    pass
        time.sleep(1.5)  # the dropped SYNs are retransmitted at 1 s
        after = procnet.listener_drops(port)
        via_ss = procnet._ss_listeners(port) if shutil.which("ss") else None
    finally:
        for c in clients:
            c.close()
    assert set(after) == set(before)
    for ino, st in after.items():
        # The queue holds backlog + 1; each of the other 18 dropped its SYN and its retransmit.
        assert st.recv_q == 2, st
        assert st.drops - before[ino].drops >= 18, st
    if via_ss is not None:
        assert via_ss == after  # ss reads the same sock_diag figures


def test_parse_ss_listeners():
    text = (
        "LISTEN 2      1      127.0.0.1:54629 0.0.0.0:* ino:17813305 sk:1083 cgroup:/ <->\n"
        "\t skmem:(r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d16)\n"
        "LISTEN 0      4096   [::1]:44799 [::]:* ino:17813306 sk:1084 cgroup:/ v6only:1 <->\n"
        "\t skmem:(r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d0)\n"
        "LISTEN 0      5      *:8000 *:* ino:42 sk:1 cgroup:/ v6only:0 <->\n"
        "\t skmem:(r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d3)\n"
    )
    got = procnet.parse_ss_listeners(text)
    assert got[17813305] == procnet.ListenerStats("ipv4", "127.0.0.1", 54629, 17813305, 16, 2, 1)
    assert got[17813306] == procnet.ListenerStats("ipv6", "::1", 44799, 17813306, 0, 0, 4096)
    assert got[42].drops == 3 and got[42].port == 8000


def test_parse_inet_diag_error_and_done():
    err = procnet._NLMSGHDR.pack(36, procnet.NLMSG_ERROR, 0, 1, 0) + (-1).to_bytes(
        4, "little", signed=True) + bytes(16)
    with pytest.raises(OSError):
        procnet.parse_inet_diag(err)
    done = procnet._NLMSGHDR.pack(20, procnet.NLMSG_DONE, 0, 1, 0) + bytes(4)
    assert procnet.parse_inet_diag(done) == ([], True)
    with pytest.raises(OSError, match="truncated"):
        procnet.parse_inet_diag(procnet._NLMSGHDR.pack(200, 20, 0, 1, 0))


def test_listener_drops_unused_port():
    port = free_port()
    assert procnet.listening_sockets(port) == []
    assert procnet.listener_drops(port) == {}


def test_net_netstat_names():
    counters = procnet.net_netstat()
    for name in NETSTAT_NAMES:
        assert isinstance(counters[name], int), name
    assert counters["TcpMaxConn"] == -1  # a signed field of /proc/net/snmp
    assert counters["IpExtInOctets"] >= 0


def test_parse_netstat_pairs_lines_by_prefix():
    text = (
        "TcpExt: SyncookiesSent ListenOverflows\nTcpExt: 3 7\n"
        "IpExt: InOctets\nIpExt: 99\n"
        "Tcp: RtoAlgorithm MaxConn PassiveOpens\nTcp: 1 -1 12\n"
        "Odd: NoValues\n"
        "Udp: InDatagrams\nUdp: 5\n"
    )
    assert procnet.parse_netstat([text]) == {
        "TcpExtSyncookiesSent": 3, "TcpExtListenOverflows": 7, "IpExtInOctets": 99,
        "TcpRtoAlgorithm": 1, "TcpMaxConn": -1, "TcpPassiveOpens": 12, "UdpInDatagrams": 5,
    }


def test_counter_deltas():
    before = {"A": 1, "B": 5, "C": 2}
    after = {"A": 4, "B": 5, "D": 9}
    assert procnet.counter_deltas(before, after, ["A", "B", "C", "D", "E"]) == {"A": 3, "B": 0}


# --- the load generator ---------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        status = 200 if self.path != "/missing" else 404
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"ok")
        with self.lock:
            type(self).hits += 1

    def log_message(self, *args: object) -> None:
        pass

    hits = 0
    lock = threading.Lock()


@pytest.fixture
def http_server() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"hits": 0})
    server_cls = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 128})
    srv = server_cls(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv.server_address[1], handler
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.mark.parametrize("n, concurrency", [(1, 1), (25, 4), (7, 16)])
def test_loadgen_counts_exactly_max_requests(http_server, n, concurrency):
    port, handler = http_server
    res = run_load("127.0.0.1", port, duration_s=30, concurrency=concurrency, max_requests=n)
    assert (res.attempted, res.completed, res.errors) == (n, n, {}), res.summary()
    assert len(res.connect_s) == len(res.total_s) == n
    assert handler.hits == n
    s = res.summary()
    assert s["connect_p50_ms"] <= s["connect_p99_ms"] <= s["connect_max_ms"] <= s["total_max_ms"]


def test_loadgen_processes_split_clients_and_merge_figures(http_server):
    from acceptrace.loadgen import run_load_processes

    port, handler = http_server
    res = run_load_processes("127.0.0.1", port, processes=3, duration_s=30, concurrency=5,
                             max_requests=11)
    # 11 requests over 3 processes (4 + 4 + 3), every one counted once
    assert (res.attempted, res.completed, res.errors) == (11, 11, {}), res.summary()
    assert len(res.connect_s) == len(res.total_s) == 11 == handler.hits
    assert res.summary()["connected"] == 11


def test_loadgen_stops_at_duration(http_server):
    port, _ = http_server
    t0 = time.monotonic()
    res = run_load("127.0.0.1", port, duration_s=0.5, concurrency=4)
    assert time.monotonic() - t0 < 3
    assert res.completed == res.attempted > 0 and res.duration_s >= 0.5


def test_loadgen_errors_by_kind(http_server):
    port, _ = http_server
    res = run_load("127.0.0.1", port, duration_s=10, concurrency=2, path="/missing",
                   max_requests=3)
    assert (res.completed, res.errors) == (0, {"http": 3})
    res = run_load("127.0.0.1", free_port(), duration_s=10, concurrency=2, max_requests=4)
    assert (res.attempted, res.completed, res.errors) == (4, 0, {"refused": 4})
    assert res.summary()["connect_p50_ms"] is None


def test_loadgen_timeout():
    """A listener that never accepts nor answers: the response read times out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        t0 = time.monotonic()
        res = run_load("127.0.0.1", s.getsockname()[1], duration_s=10, concurrency=2,
                       timeout_s=0.3, max_requests=2)
    assert res.errors == {"timeout": 2} and time.monotonic() - t0 < 3
    assert res.connect_timeouts == 0  # the handshake completed: the read timed out


def test_loadgen_cli_prints_json(http_server, capsys):
    port, _ = http_server
    assert main(["--port", str(port), "--duration", "10", "--concurrency", "2",
                 "--max-requests", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["completed"] == out["attempted"] == 3 and out["errors"] == {}
    assert {"connect_p50_ms", "connect_p99_ms", "connect_max_ms", "total_p50_ms",
            "total_p99_ms", "total_max_ms", "slow_connects_1s"} <= set(out)


def test_percentile_nearest_rank():
    vals = [float(i) for i in range(1, 101)]
    assert LoadResult.percentile(vals, 0.5) == 50.0
    assert LoadResult.percentile(vals, 0.99) == 99.0
    assert LoadResult.percentile(vals, 1.0) == 100.0
    assert LoadResult.percentile([3.0], 0.5) == 3.0
    assert LoadResult.percentile([], 0.5) is None


def test_loadgen_first_connects_are_one_burst():
    """The clients' first connects are all issued before any client's event-loop work:
    once _start_connects returns, a listener that never accepted holds every one of them
    (loopback handshakes complete inside connect()).  A refused one is an error of its own
    kind."""
    from acceptrace.loadgen import _start_connects

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)                  # holds 17
        port = s.getsockname()[1]
        burst = _start_connects("127.0.0.1", port, 12)
        try:
            assert all(b.sock is not None and b.error is None for b in burst)
            s.setblocking(False)
            accepted = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    accepted.append(s.accept()[0])
            assert len(accepted) == 12
            for c in accepted:
                c.close()
        finally:
            for b in burst:
                if b.sock is not None:
                    b.sock.close()
    refused = _start_connects("127.0.0.1", free_port(), 3)
    # a refused loopback connect fails at once or on the socket (SO_ERROR) later
    for b in refused:
        if b.sock is not None:
            time.sleep(0.05)
            assert b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
            b.sock.close()
        else:
            assert isinstance(b.error, ConnectionRefusedError)
