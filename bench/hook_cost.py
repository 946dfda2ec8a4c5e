#!/usr/bin/env python3
"""Benchmark: what each hook of the tracepoint backend costs, attached alone.

Loads acceptrace's tracepoint program once, then attaches one group of its
hooks at a time (and none, and all) against the same accept-loop server and
clients, alternating the order each round; prints each configuration's
connection rate as a ratio of the untraced rate (median over rounds).

  sudo .venv/bin/python bench/hook_cost.py [--rounds 4] [--phase 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accept_rate as A  # noqa: E402
from acceptrace import headers, kernel, netns, selection  # noqa: E402
from acceptrace.bpfloader import load  # noqa: E402

# Hooks attached together; every other hook of the backend is a group of its own.
GROUPS = {
    "syscalls:sys_exit_accept{,4}": ["tracepoint:syscalls:sys_exit_accept4",
                                     "tracepoint:syscalls:sys_exit_accept"],
}


def attach(bpf: object, hook: str) -> None:
    """Attach one hook of the loaded program (its BCC function by the glue's name)."""
    kind, _, name = hook.partition(":")
    if kind == "raw_tracepoint":
        bpf.attach_raw_tracepoint(tp=name.encode(),  # type: ignore[attr-defined]
                                  fn_name=f"raw_tracepoint__{name}".encode())
    else:
        bpf.attach_tracepoint(tp=name.encode(),  # type: ignore[attr-defined]
                              fn_name=("tracepoint__" + name.replace(":", "__")).encode())


def detach(bpf: object, hook: str) -> None:
    kind, _, name = hook.partition(":")
    if kind == "raw_tracepoint":
        bpf.detach_raw_tracepoint(tp=name.encode())  # type: ignore[attr-defined]
    else:
        bpf.detach_tracepoint(tp=name.encode())  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--phase", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root", file=sys.stderr)
        return 2
    q: mp.Queue = mp.Queue()
    srv = mp.Process(target=A.accept_loop_server, args=(q,), daemon=True)
    srv.start()
    port = q.get(timeout=10)
    headers.activate(headers.find_header_tree())
    facts, _ = kernel.kernel_facts(kernel.ensure_tracefs()[0])
    be = load(selection.plan_backend("tracepoint", facts, dispatch=False))
    be.set_targets({(netns.own_inode(), port): 0})
    every = [h for h in be.hooks if h.startswith(("tracepoint:", "raw_tracepoint:"))]
    grouped = {h for hooks in GROUPS.values() for h in hooks}
    configs = {"none": [], "all": every,
               **{k: [h for h in v if h in every] for k, v in GROUPS.items()},
               **{h: [h] for h in every if h not in grouped}}

    for hook in every:
        detach(be.bpf, hook)
    rates: dict[str, list[float]] = {k: [] for k in configs}
    try:
        A.measure(port, args.clients, 1.0)
        for rnd in range(args.rounds):
            order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
            for name in order:
                for hook in configs[name]:
                    attach(be.bpf, hook)
                rates[name].append(A.measure(port, args.clients, args.phase)[0])
                for hook in configs[name]:
                    detach(be.bpf, hook)
    finally:
        be.close()
        srv.terminate()
    base = statistics.median(rates["none"])
    out = {"untraced_cps": round(base),
           "ratio": {k: round(statistics.median(v) / base, 3) for k, v in rates.items()},
           "hooks": every}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
