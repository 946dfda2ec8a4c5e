#!/usr/bin/env python3
"""Benchmark: what the tracepoint backend's hooks cost before any work, and the one
cheaper signal for accept() there is.

Attaches programs that do nothing but return (so what is measured is the hooks'
own cost: the kernel calling a program, and for a ``syscalls:`` tracepoint every
task's syscalls on the slow path), one configuration at a time, against the same
server and clients, alternating the order each round; prints each
configuration's connection rate as a ratio of the untraced one (median over
rounds):

  none         nothing attached
  every-hook   an empty program on every hook of the tracepoint backend (raw
               tracepoints and the two syscalls: tracepoints, as acceptrace uses)
  syscall-tp   an empty program on syscalls:sys_exit_accept4 only (what the
               backend needs to see accept() without kprobes)
  uretprobe    an empty uretprobe on libc's accept4 instead: only processes that
               call it through libc pay, but each call takes a uprobe trap and a
               return probe
  uprobe-dispatch  (uvicorn) an empty uprobe where acceptrace's dispatch uprobe
               goes (httptools' cb_on_headers_complete): the trap each request
               pays on the event-loop thread with dispatch tracing on

  sudo .venv/bin/python bench/hook_floor.py [--server uvicorn] [--rounds 6] [--phase 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accept_rate as A  # noqa: E402
from acceptrace import headers, kernel  # noqa: E402

RAW = ["sk_data_ready", "inet_sock_set_state", "sock_recv_length", "sock_send_length",
       "tcp_retransmit_synack", "kfree_skb"]
SYSCALLS = ["syscalls:sys_exit_accept4", "syscalls:sys_exit_accept"]
PROGRAMS = b"""
BPF_ARRAY(runs, u64, 1);
static __always_inline int hit(void) {
    int k = 0; u64 *v = runs.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
int raw(void *ctx) { return 0; }
int tp(void *ctx) { return hit(); }
int uret(struct pt_regs *ctx) { return hit(); }
int up(struct pt_regs *ctx) { return 0; }
"""
CONFIGS = ("none", "every-hook", "syscall-tp", "uretprobe", "uprobe-dispatch")


def dispatch_target(port: int) -> tuple[bytes, int]:
    """The file and address of the uvicorn server's dispatch uprobe (as acceptrace finds it)."""
    from acceptrace import servers  # noqa: PLC0415

    for pid in servers.pids_with_sockets(servers.socket_inodes(port)):
        info = servers.inspect(pid)
        if info.parser_path:
            t = servers.find_dispatch_symbol(info.parser_path)
            if t is not None:
                return t.path.encode(), t.vaddr
    raise SystemExit("bench: no httptools dispatch symbol in the server's processes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=("accept-loop", "uvicorn"), default="uvicorn")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--phase", type=float, default=4.0, help="seconds per configuration")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    headers.activate(headers.find_header_tree())
    kernel.ensure_tracefs()
    from bcc import BPF  # noqa: PLC0415  (the benchmark may import bcc; tracer/ does not)

    b = BPF(text=PROGRAMS)
    runs = b["runs"]

    def attach(cfg: str) -> None:
        if cfg == "every-hook":
            for t in RAW:
                b.attach_raw_tracepoint(tp=t.encode(), fn_name=b"raw")
        if cfg in ("every-hook", "syscall-tp"):
            for t in SYSCALLS if cfg == "every-hook" else SYSCALLS[:1]:
                b.attach_tracepoint(tp=t.encode(), fn_name=b"tp")
        if cfg == "uretprobe":
            b.attach_uretprobe(name=b"c", sym=b"accept4", fn_name=b"uret")
        if cfg == "uprobe-dispatch":
            b.attach_uprobe(name=where[0], addr=where[1], fn_name=b"up")

    def detach(cfg: str) -> None:
        if cfg == "every-hook":
            for t in RAW:
                b.detach_raw_tracepoint(tp=t.encode())
        if cfg in ("every-hook", "syscall-tp"):
            for t in SYSCALLS if cfg == "every-hook" else SYSCALLS[:1]:
                b.detach_tracepoint(tp=t.encode())
        if cfg == "uretprobe":
            b.detach_uretprobe(name=b"c", sym=b"accept4")
        if cfg == "uprobe-dispatch":
            b.detach_uprobe(name=where[0], addr=where[1])

    port, server = A.start_server(args.server)
    configs = CONFIGS if args.server == "uvicorn" else CONFIGS[:-1]
    rates: dict[str, list[float]] = {c: [] for c in configs}
    hits: dict[str, list[int]] = {c: [] for c in configs}
    try:
        where = dispatch_target(port) if "uprobe-dispatch" in configs else (b"", 0)
        A.measure(port, args.clients, 1.0)  # warm-up
        for rnd in range(args.rounds):
            for cfg in configs if rnd % 2 == 0 else tuple(reversed(configs)):
                runs[runs.Key(0)] = runs.Leaf(0)
                attach(cfg)
                try:
                    cps, errors = A.measure(port, args.clients, args.phase)
                finally:
                    detach(cfg)
                rates[cfg].append(cps)
                hits[cfg].append(int(runs[runs.Key(0)].value))
                print(f"round {rnd}: {cfg:10s} {cps:8.0f} conn/s  errors {errors}  "
                      f"accept hits {hits[cfg][-1]}", file=sys.stderr)
    finally:
        b.cleanup()
        A.stop_server(server)
    base = statistics.median(rates["none"])
    out = {"server": args.server, "rounds": args.rounds, "phase_s": args.phase,
           "untraced_cps": round(base),
           "ratio": {c: round(statistics.median(v) / base, 3) for c, v in rates.items()},
           "ratio_min_max": {c: [round(min(v) / base, 3), round(max(v) / base, 3)]
                             for c, v in rates.items()},
           "accept_hits_per_phase": {c: statistics.median(v) for c, v in hits.items()}}
    A.emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
