#!/usr/bin/env python3
"""Benchmark: a server's connection rate traced vs untraced, and acceptrace's CPU.

One run alternates untraced and traced phases against the same server and
client pool, in A B B A order (round 1 untraced first, round 2 traced first,
...) so that a drift of the machine's speed cancels out; the figures are
ratios measured side by side, not absolute numbers compared across runs:

  throughput ratio = connections/s traced / connections/s untraced
  acceptrace CPU   = (utime + stime of the acceptrace process) / wall time,
                     during the traced phases only (its start-up compile excluded)
  lost events      = drops.lost_events of each traced run

The server is a plain accept loop (accept, read the request, write a
response, close) in its own process, or uvicorn with --server uvicorn; the
clients are processes opening one new connection per request as fast as they
can, bounded by the phase duration. Everything is on 127.0.0.1.

  sudo .venv/bin/python bench/accept_rate.py [--rounds 3] [--phase 5] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.synchronize import Event as EventT
from pathlib import Path

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def accept_loop_server(port_q: mp.Queue) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    port_q.put(srv.getsockname()[1])
    while True:
        conn, _ = srv.accept()
        try:
            conn.recv(4096)
            conn.sendall(RESPONSE)
        except OSError:
            pass
        conn.close()


def client(port: int, go: EventT, stop: EventT, out: mp.Queue) -> None:
    n = errors = 0
    go.wait()
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(REQUEST)
            while s.recv(4096):
                pass
            s.close()
            n += 1
        except OSError:
            errors += 1
    out.put((n, errors))


def measure(port: int, clients: int, seconds: float) -> tuple[float, int]:
    go, stop = mp.Event(), mp.Event()
    out: mp.Queue[tuple[int, int]] = mp.Queue()
    procs = [mp.Process(target=client, args=(port, go, stop, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    go.set()
    time.sleep(seconds)
    stop.set()
    results = [out.get(timeout=30) for _ in procs]
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join(10)
    return sum(r[0] for r in results) / elapsed, sum(r[1] for r in results)


def emit(result: dict, path: Path | None) -> None:
    """Print a benchmark's result as JSON, and write it to ``path`` (--json) if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def start_tracer(port: int, json_path: Path, extra: list[str]) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "acceptrace", "--port", str(port), "--json", str(json_path),
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert p.stderr is not None
    for line in p.stderr:
        if "tracing port" in line:
            return p
    raise RuntimeError("acceptrace did not start: " + (p.stderr.read() if p.stderr else ""))


def start_server(kind: str) -> tuple[int, object]:
    if kind == "accept-loop":
        q: mp.Queue = mp.Queue()
        proc = mp.Process(target=accept_loop_server, args=(q,), daemon=True)
        proc.start()
        return q.get(timeout=10), proc
    from acceptrace.demo import ServerProcess, free_port

    port = free_port()
    srv = ServerProcess("acceptrace.demo_app:app", port=port, backlog=4096,
                        env={"ACCEPTRACE_DEMO_BLOCK_MS": "0"})
    srv.__enter__()
    srv.wait_listening(30)
    return port, srv


def stop_server(server: object) -> None:
    if isinstance(server, mp.Process):
        server.terminate()
        server.join(5)
    else:
        server.__exit__(None, None, None)  # type: ignore[attr-defined]


def _median(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--phase", type=float, default=4.0, help="seconds per phase")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--server", choices=("accept-loop", "uvicorn"), default="accept-loop")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--no-dispatch", action="store_true",
                    help="trace without the uvicorn dispatch uprobe")
    ap.add_argument("--backend", default="auto", choices=("auto", "fentry", "kprobe", "tracepoint"),
                    help="acceptrace's --backend (compare backends' costs on one kernel)")
    ap.add_argument("--cost-every", type=int, default=None, metavar="N",
                    help="acceptrace's --cost-every (default: its own, 10; 1 times the BPF "
                         "programs all the time, which the throughput then includes)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it runs acceptrace)", file=sys.stderr)
        return 2
    port, server = start_server(args.server)
    rows = []
    try:
        measure(port, args.clients, 1.0)  # warm-up
        for rnd in range(args.rounds):
            base_first = rnd % 2 == 0
            if base_first:
                base, base_err = measure(port, args.clients, args.phase)
            with tempfile.TemporaryDirectory() as tmp:
                jp = Path(tmp) / "run.json"
                tr = start_tracer(port, jp, ["--backend", args.backend,
                                             *(["--no-dispatch"] if args.no_dispatch else []),
                                             *(["--cost-every", str(args.cost_every)]
                                               if args.cost_every is not None else [])])
                time.sleep(0.5)
                cpu0, t0 = cpu_seconds(tr.pid), time.monotonic()
                traced, traced_err = measure(port, args.clients, args.phase)
                cpu = (cpu_seconds(tr.pid) - cpu0) / (time.monotonic() - t0)
                tr.send_signal(signal.SIGINT)
                tr.wait(60)
                run = json.loads(jp.read_text())
            if not base_first:
                base, base_err = measure(port, args.clients, args.phase)
            rows.append({
                "round": rnd + 1, "untraced_cps": round(base), "traced_cps": round(traced),
                "ratio": round(traced / base, 4), "acceptrace_cpu_pct": round(100 * cpu, 2),
                "accepted_seen": run["connections"]["accepted"],
                "lost_events": run["drops"]["lost_events"],
                "client_errors": base_err + traced_err,
                # the kernel's own statistics of acceptrace's programs (the run's cost)
                "kernel_ns_per_connection": (run.get("cost") or {}).get(
                    "kernel_ns_per_connection"),
                "events_per_connection": (run.get("cost") or {}).get("events_per_connection"),
                "missed_runs": (run.get("cost") or {}).get("missed"),
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(server)
    summary = {
        "server": args.server, "clients": args.clients, "phase_s": args.phase,
        "dispatch": not args.no_dispatch,
        "backend": args.backend,
        "cpus": os.cpu_count(), "kernel": os.uname().release,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "min_ratio": min(r["ratio"] for r in rows),
        "max_ratio": max(r["ratio"] for r in rows),
        "throughput_loss_pct": round(100 * (1 - statistics.median(r["ratio"] for r in rows)), 2),
        "max_acceptrace_cpu_pct": max(r["acceptrace_cpu_pct"] for r in rows),
        "lost_events": sum(r["lost_events"] for r in rows),
        "median_kernel_ns_per_connection": _median([r["kernel_ns_per_connection"] for r in rows]),
        "median_events_per_connection": _median([r["events_per_connection"] for r in rows]),
        "rounds": rows,
    }
    emit(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
