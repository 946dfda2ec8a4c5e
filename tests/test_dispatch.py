"""ASGI dispatch: real uvicorn+FastAPI, real clients, uprobes on httptools."""

from __future__ import annotations

import socket
import time

import pytest
from acceptrace.demo import ServerProcess, free_port
from acceptrace.loadgen import run_load
from acceptrace.servers import find_dispatch_symbol, inspect, server_pids
from conftest import assert_stage_counts

pytestmark = pytest.mark.root

DISPATCH_STAGES = ("accept_to_dispatch", "read_to_dispatch", "syn_to_dispatch",
                   "dispatch_to_response")
KERNEL_STAGES = ("handshake", "accept_queue", "syn_to_accept", "accept_to_read")


def trace_uvicorn(tracer, n: int, **server_kw):
    port = free_port()
    server_kw.setdefault("env", {"ACCEPTRACE_DEMO_BLOCK_MS": "0"})
    with ServerProcess(port=port, backlog=128, **server_kw) as srv:
        srv.wait_listening()
        time.sleep(0.3)  # uvicorn --workers: let the workers start
        t = tracer(port).start()
        try:
            res = run_load("127.0.0.1", port, duration_s=60, concurrency=4, max_requests=n)
            time.sleep(0.3)
        finally:
            assert t.stop() == 0, t.stderr
        pids = server_pids(port)
    assert res.completed == n, res.summary()
    return t, t.report(), srv, pids


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_dispatch_counts_and_order(tracer, loop):
    n = 40
    t, run, srv, _ = trace_uvicorn(tracer, n, loop=loop)
    assert run["connections"]["accepted"] == n
    assert run["connections"]["dispatched"] == n
    assert run["connections"]["requests"] == n
    assert_stage_counts(run, n, KERNEL_STAGES + DISPATCH_STAGES)
    assert any(h.startswith("uprobe:") and "cb_on_headers_complete" in h
               for h in run["meta"]["hooks"])
    assert run["slowest"]
    for s in run["slowest"]:
        # accepted <= first read <= dispatch <= first response byte, per connection
        for key in ("accept_to_read_us", "read_to_dispatch_us", "dispatch_to_response_us",
                    "accept_to_dispatch_us", "syn_to_dispatch_us"):
            assert s[key] is not None and s[key] >= 0, (key, s)
        assert s["accept_to_dispatch_us"] >= s["accept_to_read_us"]
        assert s["requests"] == 1


def test_keep_alive_counts_requests_once_per_connection(tracer):
    m = 12
    port = free_port()
    with ServerProcess(port=port, backlog=128, env={"ACCEPTRACE_DEMO_BLOCK_MS": "0"}) as srv:
        srv.wait_listening()
        t = tracer(port).start()
        try:
            c = socket.create_connection(("127.0.0.1", port))
            f = c.makefile("rb")
            for _ in range(m):
                c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                status = f.readline()
                assert status.startswith(b"HTTP/1.1 200"), status
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
            c.close()
            time.sleep(0.3)
        finally:
            assert t.stop() == 0, t.stderr
    run = t.report()
    assert run["connections"]["accepted"] == 1
    assert run["connections"]["dispatched"] == 1
    assert run["connections"]["requests"] == m
    assert run["stages"]["accept_to_dispatch"]["count"] == 1
    # A sample leaves the kernel at the connection's first response: one request then.
    assert run["slowest"][0]["requests"] == 1


def test_blocked_event_loop_known_answer(tracer):
    """A request blocks the event loop for BLOCK; connections made meanwhile
    wait in the accept queue until it ends: the longest wait is known."""
    block = 0.5
    port = free_port()
    with ServerProcess(port=port, backlog=128, env={"ACCEPTRACE_DEMO_BLOCK_MS": "0"}) as srv:
        srv.wait_listening()
        t = tracer(port).start()
        try:
            blocker = socket.create_connection(("127.0.0.1", port))
            blocker.sendall(f"GET /slow?ms={block * 1000:.0f} HTTP/1.1\r\nHost: x\r\n"
                            "Connection: close\r\n\r\n".encode())
            t_block = time.monotonic()   # the loop blocks as soon as it parses this
            time.sleep(0.1)
            t_first = time.monotonic()
            waiting = []
            for _ in range(5):
                c = socket.create_connection(("127.0.0.1", port))
                c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                waiting.append(c)
            for c in [blocker, *waiting]:
                c.settimeout(10)
                while c.recv(4096):
                    pass
                c.close()
            time.sleep(0.3)
        finally:
            assert t.stop() == 0, t.stderr
    run = t.report()
    expected_us = (t_block + block - t_first) * 1e6  # the first waiter's remaining block
    aq_max = run["stages"]["accept_queue"]["max"]
    a2d_max = run["stages"]["accept_to_dispatch"]["max"]
    # The block started a little after t_block (parse + dispatch), so the wait is
    # at least the remaining time minus scheduling slack and at most one bucket more.
    assert expected_us - 20_000 <= aq_max <= expected_us * (1 + 1 / 16) + 20_000, (aq_max,
                                                                                   expected_us)
    assert a2d_max < aq_max  # once accepted, the waiters were served quickly
    assert run["connections"]["dispatched"] == 6


def test_two_workers_both_found(tracer):
    n = 40
    t, run, srv, pids = trace_uvicorn(tracer, n, workers=2)
    workers = [p for p in pids if p != srv.pid]
    assert len(workers) == 2, pids
    assert run["connections"]["dispatched"] == n
    assert sum(p["accepted"] for p in run["processes"]) == n
    assert {p["pid"] for p in run["processes"]} <= set(workers)


def test_h11_says_why_and_keeps_kernel_stages(tracer):
    n = 10
    t, run, _, _ = trace_uvicorn(tracer, n, http="h11")
    assert "dispatch: not available — server uses h11; run uvicorn with --http httptools" \
        in t.stderr
    assert t.stderr.count("server uses h11") == 1
    for stage in DISPATCH_STAGES:
        assert run["stages"][stage] is None
    assert run["connections"]["dispatched"] is None
    assert_stage_counts(run, n, KERNEL_STAGES)


def test_server_inspection():
    port = free_port()
    with ServerProcess(port=port, backlog=16, loop="uvloop") as srv:
        srv.wait_listening()
        time.sleep(0.3)
        pids = server_pids(port)
        assert pids == [srv.pid]
        info = inspect(srv.pid)
    assert info.loop == "uvloop" and info.parser == "httptools"
    target = find_dispatch_symbol(info.parser_path)
    assert target is not None and target.exact
    assert target.symbol.endswith("cb_on_headers_complete")
    assert target.file_offset > 0


def test_worker_restart_is_followed(tracer):
    """A process that starts serving the port after acceptrace started is found."""
    port = free_port()
    t = tracer(port).start()
    try:
        with ServerProcess(port=port, backlog=64, env={"ACCEPTRACE_DEMO_BLOCK_MS": "0"}) as srv:
            srv.wait_listening()
            time.sleep(2.5)  # the next rescan (every 2 s) attaches the uprobe
            res = run_load("127.0.0.1", port, duration_s=30, concurrency=2, max_requests=10)
            time.sleep(0.3)
    finally:
        assert t.stop() == 0, t.stderr
    assert res.completed == 10
    run = t.report()
    assert run["connections"]["dispatched"] == 10




def test_stripped_module_falls_back_to_llhttp_execute(tmp_path):
    """A stripped httptools keeps only .dynsym: llhttp_execute, marked approximate."""
    import shutil
    import subprocess

    import httptools.parser.parser as mod

    copy = tmp_path / "parser-stripped.so"
    shutil.copy(mod.__file__, copy)
    subprocess.run(["strip", "--strip-all", str(copy)], check=True)
    exact = find_dispatch_symbol(mod.__file__)
    approx = find_dispatch_symbol(str(copy))
    assert exact is not None and exact.exact
    assert approx is not None and not approx.exact
    assert approx.symbol == "llhttp_execute"
    assert find_dispatch_symbol(str(tmp_path / "missing.so")) is None


def test_doctor_lists_server_processes():
    import subprocess
    import sys

    port = free_port()
    with ServerProcess(port=port, backlog=16, loop="uvloop") as srv:
        srv.wait_listening()
        time.sleep(0.3)
        res = subprocess.run([sys.executable, "-m", "acceptrace", "doctor", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if f"pid {srv.pid}" in ln)
    assert "uvloop" in line and "httptools" in line
    flat = "".join(ch for ch in res.stdout if not ch.isspace() and ch != "│")  # unfold cells
    assert "cb_on_headers_complete" in flat


def test_gunicorn_uvicorn_workers(tracer):
    """gunicorn with two UvicornWorkers: both workers found, every request dispatched."""
    import os
    import signal
    import subprocess
    import sys

    from acceptrace.procnet import listening_sockets
    from conftest import wait_until

    n = 30
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2",
         "-b", f"127.0.0.1:{port}", "--log-level", "warning", "acceptrace.demo_app:app"],
        env={**os.environ, "ACCEPTRACE_DEMO_BLOCK_MS": "0"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: listening_sockets(port), timeout=30), proc.stderr
        assert wait_until(lambda: len(server_pids(port)) == 3, timeout=30)  # arbiter + 2
        time.sleep(0.5)
        t = tracer(port).start()
        try:
            res = run_load("127.0.0.1", port, duration_s=60, concurrency=4, max_requests=n)
            time.sleep(0.3)
        finally:
            assert t.stop() == 0, t.stderr
        pids = server_pids(port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    assert res.completed == n
    run = t.report()
    workers = set(pids) - {proc.pid}
    assert len(workers) == 2
    assert run["connections"]["accepted"] == n
    assert run["connections"]["dispatched"] == n
    assert {p["pid"] for p in run["processes"]} <= workers
