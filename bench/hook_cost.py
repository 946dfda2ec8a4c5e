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
from acceptrace import headers, kernel, procnet, selection  # noqa: E402
from acceptrace.bpfloader import load  # noqa: E402

GROUPS = {
    "syscalls:sys_exit_accept{,4}": ["syscalls:sys_exit_accept4", "syscalls:sys_exit_accept"],
    "sock:sk_data_ready": ["sock:sk_data_ready"],
    "sock:sock_recv_length": ["sock:sock_recv_length"],
    "sock:sock_send_length": ["sock:sock_send_length"],
    "sock:inet_sock_set_state": ["sock:inet_sock_set_state"],
}


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
    be.set_targets([(procnet.own_netns(), port)])
    every = [h.removeprefix("tracepoint:") for h in be.hooks if h.startswith("tracepoint:")]
    configs = {"none": [], "all": every, **GROUPS}

    def fn(tp: str) -> bytes:
        return ("tracepoint__" + tp.replace(":", "__")).encode()

    for tp in every:
        be.bpf.detach_tracepoint(tp.encode())
    rates: dict[str, list[float]] = {k: [] for k in configs}
    try:
        A.measure(port, args.clients, 1.0)
        for rnd in range(args.rounds):
            order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
            for name in order:
                for tp in configs[name]:
                    be.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn(tp))
                rates[name].append(A.measure(port, args.clients, args.phase)[0])
                for tp in configs[name]:
                    be.bpf.detach_tracepoint(tp.encode())
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
