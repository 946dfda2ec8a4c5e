#!/usr/bin/env python3
"""Benchmark: tracing 1 listener against tracing 50, under the same load.

One loaded accept loop (bench/accept_rate.py's server and clients) and 49
idle listeners.  Each round traces the loaded port alone (`--port P`) and
then the loaded port with the 49 others (`--port P --port I1 ... --port I49`:
50 targets, 50 rows of counters and histograms), in A B B A order so that a
drift of the machine's speed cancels out.  Figures, as ratios within the run:

  throughput ratio   = connections/s with 50 targets / with 1 target
  acceptrace CPU     = (utime + stime of acceptrace) / wall time, for each

  sudo .venv/bin/python bench/listeners.py [--rounds 4] [--phase 4] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept_rate import cpu_seconds, emit, measure, start_server, stop_server  # noqa: E402


def start_tracer(ports: list[int], json_path: Path, backend: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "acceptrace", "--json", str(json_path), "--no-tui",
            "--backend", backend]
    for p in ports:
        argv += ["--port", str(p)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "acceptrace: tracing " in line:
            return proc
    raise RuntimeError("acceptrace did not start: " + proc.stderr.read())


def traced_phase(ports: list[int], port: int, clients: int, seconds: float,
                 backend: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        jp = Path(tmp) / "run.json"
        tr = start_tracer(ports, jp, backend)
        time.sleep(0.5)
        cpu0, t0 = cpu_seconds(tr.pid), time.monotonic()
        cps, errors = measure(port, clients, seconds)
        cpu = (cpu_seconds(tr.pid) - cpu0) / (time.monotonic() - t0)
        tr.send_signal(signal.SIGINT)
        tr.wait(60)
        run = json.loads(jp.read_text())
    return {"cps": cps, "cpu_pct": 100 * cpu, "errors": errors,
            "targets": len(run.get("targets", [])), "accepted": run["connections"]["accepted"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--phase", type=float, default=4.0, help="seconds per phase")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--idle", type=int, default=49, help="idle listeners beside the loaded one")
    ap.add_argument("--backend", default="auto", choices=("auto", "fentry", "kprobe", "tracepoint"))
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it runs acceptrace)", file=sys.stderr)
        return 2
    idle = []
    for _ in range(args.idle):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        idle.append(s)
    port, server = start_server("accept-loop")
    many = [port] + [s.getsockname()[1] for s in idle]
    rows = []
    try:
        measure(port, args.clients, 1.0)  # warm-up
        for rnd in range(args.rounds):
            order = [[port], many] if rnd % 2 == 0 else [many, [port]]
            got = {len(ports): traced_phase(ports, port, args.clients, args.phase, args.backend)
                   for ports in order}
            one, fifty = got[1], got[len(many)]
            rows.append({
                "round": rnd + 1, "one_cps": round(one["cps"]), "many_cps": round(fifty["cps"]),
                "ratio": round(fifty["cps"] / one["cps"], 4),
                "one_cpu_pct": round(one["cpu_pct"], 2), "many_cpu_pct": round(fifty["cpu_pct"], 2),
                "many_targets": fifty["targets"], "client_errors": one["errors"] + fifty["errors"],
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(server)
        for s in idle:
            s.close()
    ratios = [r["ratio"] for r in rows]
    summary = {
        "listeners": len(many), "clients": args.clients, "phase_s": args.phase,
        "backend": args.backend, "cpus": os.cpu_count(), "kernel": os.uname().release,
        "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_one_cpu_pct": statistics.median(r["one_cpu_pct"] for r in rows),
        "median_many_cpu_pct": statistics.median(r["many_cpu_pct"] for r in rows),
        "max_many_cpu_pct": max(r["many_cpu_pct"] for r in rows),
        "rounds": rows,
    }
    emit(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
