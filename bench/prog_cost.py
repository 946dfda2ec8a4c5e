#!/usr/bin/env python3
"""Benchmark: the kernel's own time per run of each acceptrace BPF program.

Loads one backend (tracepoint by default: the only one this development host
can load), traces a plain accept loop (accept, read, write, close) on
127.0.0.1, and runs `--conns` new connections from `--clients` processes,
`--repeats` times.  For each repeat it reads each program's run_cnt and
run_time_ns (BPF_ENABLE_STATS, as acceptrace's `cost` does) before and after,
and prints per hook: runs per connection and ns per run, median over the
repeats (min-max), and the BPF time per connection.  It also checks the
counters the programs kept against the connections made (created, queued,
accepted, read, responded must each equal the number made; lost events and
untracked accepts must stay 0).

  sudo .venv/bin/python bench/prog_cost.py [--conns 3000] [--repeats 5]
        [--no-dispatch] [--empty] [--sample-min-us 1000] [--json out.json]

The tracepoints fire for every socket on the machine: other traffic during a
repeat raises runs per connection (and is reported, not hidden).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from multiprocessing.synchronize import Event as EventT
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accept_rate as A  # noqa: E402
from acceptrace import netns, selection  # noqa: E402
from acceptrace.bpfloader import load  # noqa: E402

CHECKED = ("created", "queued", "accepted", "read", "responded")
ZERO = ("lost_events", "accept_untracked")


def client(port: int, n: int, go: EventT, out: mp.Queue) -> None:
    errors = 0
    go.wait()
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(A.REQUEST)
            while s.recv(4096):
                pass
            s.close()
        except OSError:
            errors += 1
    out.put(errors)


def run_conns(port: int, clients: int, conns: int) -> tuple[int, float]:
    go = mp.Event()
    out: mp.Queue = mp.Queue()
    per = conns // clients
    procs = [mp.Process(target=client, args=(port, per, go, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    go.set()
    errors = sum(out.get(timeout=60) for _ in procs)
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join(10)
    return per * clients - errors, elapsed


def attach_empty(hooks: list[str]):  # noqa: ANN201 - a bcc.BPF
    """One program returning 0 on each of the backend's (raw) tracepoints."""
    from bcc import BPF  # noqa: PLC0415

    text = []
    for h in hooks:
        kind, _, point = h.partition(":")
        if kind == "raw_tracepoint":
            text.append(f"RAW_TRACEPOINT_PROBE({point}) {{ return 0; }}")
        elif kind == "tracepoint":
            cat, _, name = point.partition(":")
            text.append(f"TRACEPOINT_PROBE({cat}, {name}) {{ return 0; }}")
    return BPF(text="\n".join(text))


def empty_stats(bpf, prep) -> dict:  # noqa: ANN001
    if bpf is None:
        return {}
    from acceptrace import bpfstats  # noqa: PLC0415

    out = {}
    for name, fn in bpf.funcs.items():
        label = "empty:" + name.decode().replace("raw_tracepoint__", "").replace(
            "tracepoint__syscalls__", "")
        out[label] = bpfstats.prog_stats(int(fn.fd), prep.facts.prog_info)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--backend", default="tracepoint")
    ap.add_argument("--no-dispatch", action="store_true",
                    help="compile without the dispatch stage (acceptrace --no-dispatch)")
    ap.add_argument("--sample-min-us", type=int, default=1000,
                    help="the slot's sampling threshold (acceptrace sets it to the N-th "
                         "slowest so far; 0 sends every connection to the ring buffer)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--empty", action="store_true",
                    help="also attach an empty program to each hook (the floor: what a run "
                         "costs that does nothing), reported as empty:<hook>")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root", file=sys.stderr)
        return 2
    prep = selection.prepare()
    q: mp.Queue = mp.Queue()
    srv = mp.Process(target=A.accept_loop_server, args=(q,), daemon=True)
    srv.start()
    port = q.get(timeout=10)
    be = load(selection.plan_backend(args.backend, prep.facts, dispatch=not args.no_dispatch))
    empty = attach_empty(be.hooks) if args.empty else None
    per_hook: dict[str, dict[str, list[float]]] = {}
    totals: list[float] = []
    mismatches: list[str] = []
    try:
        if be.stats_how is None:
            print(f"bench: no BPF statistics: {be.stats_why}", file=sys.stderr)
            return 1
        be.set_targets({(netns.own_inode(), port): 0})
        be.set_sample_threshold(0, args.sample_min_us * 1000)
        run_conns(port, args.clients, 200)  # warm up (maps, caches)
        for _ in range(args.repeats):
            c0 = be.snapshot(full=True).targets[0].counters
            s0 = {**be.program_stats(), **empty_stats(empty, prep)}
            made, _elapsed = run_conns(port, args.clients, args.conns)
            time.sleep(0.3)  # the last closes
            be.poll(0)  # drain the ring buffer (the samples themselves are not used)
            s1 = {**be.program_stats(), **empty_stats(empty, prep)}
            c1 = be.snapshot(full=True).targets[0].counters
            for name in CHECKED:
                got = (c1.get(name) or 0) - (c0.get(name) or 0)
                if got != made:
                    mismatches.append(f"{name} {got} != {made}")
            for name in ZERO:
                got = (c1.get(name) or 0) - (c0.get(name) or 0)
                if got:
                    mismatches.append(f"{name} {got} != 0")
            total = 0.0
            for hook, st in s1.items():
                d = st.minus(s0.get(hook, st.minus(st)))
                row = per_hook.setdefault(hook, {"runs_per_conn": [], "ns_per_run": []})
                row["runs_per_conn"].append(d.runs / made)
                row["ns_per_run"].append(d.run_time_ns / d.runs if d.runs else 0.0)
                if not hook.startswith("empty:"):
                    total += d.run_time_ns / made
            totals.append(total)
    finally:
        if empty is not None:
            empty.cleanup()
        be.close()
        srv.terminate()

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):7.1f} ({min(xs):.1f}-{max(xs):.1f})"

    print(f"{'hook':34} {'runs/conn':>24} {'ns/run':>26} {'ns/conn':>8}")
    for hook, row in sorted(per_hook.items(), key=lambda kv: kv[0]):
        nsc = statistics.median(r * n for r, n in zip(row["runs_per_conn"], row["ns_per_run"]))
        print(f"{hook:34} {med(row['runs_per_conn']):>24} {med(row['ns_per_run']):>26} "
              f"{nsc:8.0f}")
    print(f"BPF ns per connection: {med(totals)}  ({args.repeats} x {args.conns} connections,"
          f" dispatch {'off' if args.no_dispatch else 'on'})")
    print("counters: " + ("exact" if not mismatches else "MISMATCH " + "; ".join(mismatches)))
    if args.json:
        args.json.write_text(json.dumps({"per_hook": per_hook, "ns_per_conn": totals,
                                         "mismatches": mismatches}, indent=1))
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
