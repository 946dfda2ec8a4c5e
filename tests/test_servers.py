"""Any TCP server: nginx, gunicorn, hypercorn, granian, uvicorn, node and a Python
socketserver, run for real in a network namespace each test makes, with real
clients inside it and acceptrace attached with --netns.

- Known answer: each serves a handler that waits DELAY_S before answering (nginx
  proxies to an upstream that does), so every connection's read_to_response (its
  first read -> the first byte written back) is at least that, its p50 within
  one bucket (docs/histograms.md) of it plus the server's own overhead, and its
  count is the requests made.
- uvicorn: read_to_response = read_to_dispatch + dispatch_to_response, per
  connection and in total.
- The accepting processes are recognised (processes[].server), and the diagnosis
  of an overflowing nginx names its `backlog=`, of gunicorn its `--backlog`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from acceptrace.demo import free_port
from acceptrace.diagnose import diagnose
from acceptrace.model import Run
from acceptrace.netns import open_netns
from acceptrace.servers import identify, pids_with_sockets
from conftest import assert_listen_overflow, assert_stage_counts, scaled, wait_until
from test_netns import in_ns, network_namespace, ns_netstat, wait_listening

pytestmark = pytest.mark.root

DELAY_S = 0.1
DELAY_US = DELAY_S * 1e6
N = 12
CONCURRENCY = 4
# What a server adds between its read and its write besides the handler's wait
# (parsing, scheduling; nginx: the upstream connection) -- a harness bound,
# scaled on a slow machine; p50 must be within one bucket (1/16) of DELAY + this.
OVERHEAD_US = 10_000

# The handler of every Python server: waits DELAY_S (at least: asyncio may wake a
# timer early by its loop's cached clock), then answers "ok".
APP = r'''
import asyncio, os, time
DELAY = float(os.environ.get("AT_TEST_DELAY", "0"))

async def _wait():
    end = time.monotonic() + DELAY
    while end - time.monotonic() > 0:
        await asyncio.sleep(end - time.monotonic())

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await _wait()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

def wsgi(environ, start_response):
    time.sleep(DELAY)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''

# nginx's upstream: answers each request DELAY after reading it (a thread each).
UPSTREAM = r'''
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, delay = int(sys.argv[1]), float(sys.argv[2])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        location / {{ {location} }}
    }}
}}
"""


class Served:
    """A server started inside a namespace: its process group, killed on exit."""

    def __init__(self, ns: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.log = tempfile.TemporaryFile()
        self.argv = argv
        self.proc = subprocess.Popen(in_ns(ns, *argv), cwd=cwd, env={**os.environ, **env},
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(scaled(10))
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


@contextmanager
def serve(ns: str, argv: list[str], cwd: Path, port: int,
          env: dict[str, str] | None = None) -> Iterator[Served]:
    """``argv`` running in ``ns`` until it listens on ``port``; stopped afterwards."""
    srv = Served(ns, argv, cwd, {"PYTHONPATH": str(cwd), "AT_TEST_DELAY": str(DELAY_S),
                                 **(env or {})})
    try:
        inside = open_netns(path=ns)
        try:
            end = time.monotonic() + scaled(30)
            while not inside.listening_sockets(port):
                assert srv.proc.poll() is None, f"{argv} exited:\n{srv.output()}"
                assert time.monotonic() < end, f"{argv} not listening:\n{srv.output()}"
                time.sleep(0.05)
        finally:
            inside.close()
        yield srv
    finally:
        srv.stop()


def load(ns: str, port: int, n: int = N, concurrency: int = CONCURRENCY,
         connect_timeout: float = 10.0) -> dict:
    """n requests, each on a new connection, from inside the namespace."""
    out = subprocess.run(
        in_ns(ns, sys.executable, "-m", "acceptrace.loadgen", "--port", str(port),
              "--duration", "60", "--concurrency", str(concurrency), "--max-requests", str(n),
              "--connect-timeout", str(connect_timeout)),
        capture_output=True, text=True, timeout=scaled(120))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def listener_pids(ns: str, port: int) -> list[int]:
    inside = open_netns(path=ns)
    try:
        inodes = {s.inode for s in inside.listening_sockets(port)}
    finally:
        inside.close()
    return pids_with_sockets(inodes)


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                out.append(int(d.name))
    return out


@contextmanager
def nginx(ns: str, tmp: Path, port: int, backlog: int = 511,
          location: str | None = None) -> Iterator[Served]:
    """nginx (Debian's nginx-light) in ``ns``; by default proxying to an upstream that
    answers DELAY_S after each request."""
    upstream_port = free_port()
    with serve(ns, [sys.executable, "-c", UPSTREAM, str(upstream_port), str(DELAY_S)], tmp,
               upstream_port) if location is None else _nothing() as _up:
        loc = location or f"proxy_pass http://127.0.0.1:{upstream_port};"
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, port=port, backlog=backlog, location=loc))
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        with serve(ns, [exe, "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(conf)],
                   tmp, port) as srv:
            yield srv


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def write_app(tmp: Path) -> None:
    (tmp / "at_app.py").write_text(APP)


def server_argv(name: str, port: int, extra: list[str] | None = None) -> list[str]:
    py = [sys.executable, "-m"]
    bind = f"127.0.0.1:{port}"
    return {
        "gunicorn": py + ["gunicorn", "-w", "1", "-b", bind, "--log-level", "warning",
                          *(extra or []), "at_app:wsgi"],
        "hypercorn": py + ["hypercorn", "-w", "1", "-b", bind, *(extra or []), "at_app:app"],
        "granian": py + ["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port",
                         str(port), "--workers", "1", "--log-level", "warning", *(extra or []),
                         "at_app:app"],
    }[name]


def check_known_delay(run: dict, server: str) -> None:
    """read_to_response: N connections, each answered at least DELAY after its first
    read, the p50 within one bucket of DELAY plus the server's overhead."""
    c = run["connections"]
    assert c["accepted"] == c["read"] == c["responded"] == N, c
    assert_stage_counts(run, N, ("accept_to_read", "read_to_response", "syn_to_response"))
    st = run["stages"]["read_to_response"]
    assert st["min"] >= DELAY_US, st
    assert DELAY_US <= st["p50"] <= (DELAY_US + scaled(OVERHEAD_US)) * (1 + 1 / 16), st
    assert run["stages"]["syn_to_response"]["min"] >= DELAY_US
    for s in run["slowest"]:
        assert s["read_to_response_us"] >= DELAY_US, s
        assert s["syn_to_response_us"] >= s["read_to_response_us"], s
    servers = {p["server"] for p in run["processes"]}
    assert servers == {server}, run["processes"]
    assert "tokio-rt-worker" not in {p["comm"] for p in run["processes"]}
    assert "tokio-rt-worker" not in {s["comm"] for s in run["slowest"]}
    # not a dispatch server: those stages are null, and say nothing
    assert run["stages"]["read_to_dispatch"] is None


@pytest.mark.parametrize("server", ["nginx", "gunicorn", "hypercorn", "granian"])
def test_read_to_response_known_delay(tracer, tmp_path, server):
    port = free_port()
    write_app(tmp_path)
    with network_namespace() as ns:
        started = (nginx(ns, tmp_path, port) if server == "nginx" else
                   serve(ns, server_argv(server, port), tmp_path, port))
        with started:
            t = tracer(port, "--netns", f"/run/netns/{ns}").start()
            try:
                res = load(ns, port)
                time.sleep(0.3)
            finally:
                assert t.stop() == 0, t.stderr
    assert res["completed"] == N, res
    run = t.report()
    check_known_delay(run, server)
    found = {f.rule: f.text for f in diagnose(Run.from_json(run))}
    if server == "gunicorn":
        # one sync worker serves one request at a time: the other clients wait in
        # the accept queue (~3 x DELAY at p99), and gunicorn is told its options
        assert {p["worker_class"] for p in run["processes"]} == {"sync"}
        assert {"accept_queue_slow", "server_options"} <= set(found), found
        assert "accept_queue_overflow" not in found, found
        assert "-w/--workers" in found["server_options"]
        assert "-k gthread" in found["server_options"]
    else:
        # nothing queued behind a busy worker: no overflow, and (but on a machine slow
        # enough to queue connections for 100 ms) no advice
        assert "accept_queue_overflow" not in found, found
        assert "server_options" not in found or "accept_queue_slow" in found, found


def test_uvicorn_response_is_dispatch_plus_its_two_parts(tracer):
    """The server-agnostic stage beside uvicorn's dispatch stages: for every connection
    read_to_response = read_to_dispatch + dispatch_to_response (the same three kernel
    times), so their sums agree to rounding, and each slowest connection's parts add up.
    (Not the p50s: a median of sums is not the sum of medians -- a busy TCG guest had
    47.1 ms against 43.4 ms.)"""
    from acceptrace.demo import ServerProcess

    n, port = 16, free_port()
    with network_namespace() as ns:
        srv = ServerProcess(port=port, backlog=128, env={"ACCEPTRACE_DEMO_BLOCK_MS": "0"})
        srv.argv = in_ns(ns, *srv.argv)
        with srv:
            wait_listening(ns, port, srv)
            time.sleep(0.3)
            t = tracer(port, "--netns", f"/run/netns/{ns}").start()
            try:
                out = subprocess.run(
                    in_ns(ns, sys.executable, "-m", "acceptrace.loadgen", "--port", str(port),
                          "--duration", "60", "--concurrency", "2", "--max-requests", str(n),
                          "--path", "/slow?ms=20"),
                    capture_output=True, text=True, timeout=scaled(120))
                time.sleep(0.3)
            finally:
                assert t.stop() == 0, t.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["completed"] == n, out.stdout
    run = t.report()
    assert run["connections"]["dispatched"] == run["connections"]["responded"] == n
    st = run["stages"]
    for name in ("read_to_response", "read_to_dispatch", "dispatch_to_response"):
        assert st[name]["count"] == n, (name, st[name])
    assert st["read_to_response"]["min"] >= 20_000
    # the sums are exact (ns in the kernel): per connection the two parts add up
    parts = st["read_to_dispatch"]["sum"] + st["dispatch_to_response"]["sum"]
    assert abs(st["read_to_response"]["sum"] - parts) <= 0.01 * n, (st["read_to_response"],
                                                                     parts)
    assert run["slowest"]
    for s in run["slowest"]:
        assert abs(s["read_to_response_us"] - s["read_to_dispatch_us"]
                   - s["dispatch_to_response_us"]) <= 0.002, s
        assert s["syn_to_response_us"] >= s["syn_to_dispatch_us"]
    assert {p["server"] for p in run["processes"]} == {"uvicorn"}


@pytest.mark.parametrize("server", ["nginx", "gunicorn"])
def test_overflow_advice_names_the_servers_backlog_option(tracer, tmp_path, server):
    """A stopped worker behind a backlog of 4: the accept queue overflows (the
    namespace's own counter says so), and the diagnosis speaks the server's words."""
    port, backlog = free_port(), 4
    write_app(tmp_path)
    with network_namespace() as ns:
        somaxconn = int(subprocess.run(in_ns(ns, "sysctl", "-n", "net.core.somaxconn"),
                                       capture_output=True, text=True, check=True).stdout)
        started = (nginx(ns, tmp_path, port, backlog, location='return 200 "ok";')
                   if server == "nginx" else
                   serve(ns, server_argv(server, port, ["--backlog", str(backlog)]), tmp_path,
                         port, env={"AT_TEST_DELAY": "0"}))
        with started as srv:
            workers = children(srv.pid)
            assert len(workers) == 1, workers
            t = tracer(port, "--netns", f"/run/netns/{ns}").start()
            before = ns_netstat(ns)
            try:
                clients = subprocess.Popen(
                    in_ns(ns, sys.executable, "-m", "acceptrace.loadgen", "--port", str(port),
                          "--duration", "60", "--concurrency", "16", "--max-requests", "16",
                          "--connect-timeout", "30"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                os.kill(workers[0], signal.SIGSTOP)
                try:
                    # the queue is full and SYNs are dropped (the kernel says when)
                    assert wait_until(lambda: ns_netstat(ns)["TcpExtListenOverflows"]
                                      > before["TcpExtListenOverflows"], 30, 0.2)
                finally:
                    os.kill(workers[0], signal.SIGCONT)
                out, errs = clients.communicate(timeout=scaled(120))
                time.sleep(0.5)       # the last FINs
            finally:
                assert t.stop() == 0, t.stderr
            after = ns_netstat(ns)
    assert json.loads(out.strip().splitlines()[-1])["completed"] == 16, (out, errs)
    run = t.report()
    overflows = after["TcpExtListenOverflows"] - before["TcpExtListenOverflows"]
    assert overflows > 0
    assert_listen_overflow(run, overflows)
    assert run["queues"]["backlog"] == backlog
    assert {p["server"] for p in run["processes"]} == {server}
    found = {f.rule: f.text for f in diagnose(Run.from_json(run))}
    option = "listen ... backlog=N" if server == "nginx" else "--backlog"
    default = 511 if server == "nginx" else 2048
    assert f"{server}'s default is {default} ({option})" in found["small_backlog"], found
    advice = found["server_options"]
    assert option in advice and f"{backlog} here" in advice, advice
    assert f"net.core.somaxconn ({somaxconn} in the namespace" in advice, advice
    assert "uvicorn" not in found["small_backlog"]
    # the report command says the same
    text = subprocess.run([sys.executable, "-m", "acceptrace", "report", str(t.json_path)],
                          capture_output=True, text=True, timeout=scaled(60)).stdout
    assert option in text and f"served by {server}" in text


def test_servers_recognised_from_their_processes(tmp_path):
    """Every process holding each server's listening socket, running for real: the
    master and the workers (nginx, gunicorn), spawned workers through their parent
    (uvicorn --workers, hypercorn), granian's workers, node, python -m http.server."""
    write_app(tmp_path)
    py = [sys.executable, "-m"]
    node = shutil.which("node") or shutil.which("nodejs")  # make setup installs it
    # (server, its command for a port, the worker class, how many processes hold the
    # socket: parent + 2 workers, or the workers alone, or one)
    cases: list[tuple[str, Callable[[int], list[str]] | None, str | None, int]] = [
        ("nginx", None, None, 2),
        ("gunicorn", lambda p: py + ["gunicorn", "-w", "2", "-k", "uvicorn.workers.UvicornWorker",
                                     "-b", f"127.0.0.1:{p}", "at_app:app"],
         "uvicorn.workers.UvicornWorker", 3),
        ("uvicorn", lambda p: py + ["uvicorn", "--workers", "2", "--port", str(p),
                                    "at_app:app"], None, 3),
        ("hypercorn", lambda p: py + ["hypercorn", "-w", "2", "-b", f"127.0.0.1:{p}",
                                      "at_app:app"], None, 3),
        ("granian", lambda p: py + ["granian", "--interface", "asgi", "--port", str(p),
                                    "--workers", "2", "at_app:app"], None, 2),
        ("socketserver", lambda p: py + ["http.server", "--bind", "127.0.0.1", str(p)],
         None, 1),
    ]
    if node:
        cases.append(("node", lambda p: [node, "-e", "require('http').createServer((q, s) => "
                                         f"s.end('ok')).listen({p}, '127.0.0.1')"], None, 1))
    with network_namespace() as ns:
        for name, command, worker_class, holders in cases:
            port = free_port()
            started = (nginx(ns, tmp_path, port, location='return 200 "ok";') if command is None
                       else serve(ns, command(port), tmp_path, port))
            with started:
                end = time.monotonic() + scaled(30)
                while len(pids := listener_pids(ns, port)) < holders:
                    assert time.monotonic() < end, (name, pids)
                    time.sleep(0.1)
                for pid in pids:
                    comm, server = identify(pid)
                    assert server.name == name, (name, pid, comm, server)
                    assert server.worker_class == worker_class, (name, server)
                    assert comm and comm != "tokio-rt-worker"
