#!/usr/bin/env python3
"""Benchmark: what the kernel's BPF statistics add to every run of every BPF program.

While BPF_ENABLE_STATS is held (acceptrace's `cost` section, bpftop), the kernel
times each run of every BPF program on the host: two clock reads and a per-CPU
counter update around the program (``__bpf_prog_run()``).  This measures that
overhead alone, without attaching anything: an empty socket-filter program run
by the kernel ``--repeat`` times in a row (BPF_PROG_TEST_RUN, whose loop calls
the program through the same ``bpf_prog_run()`` as a hook does), its average
time per run as the kernel reports it, with the statistics off and on,
alternated ``--rounds`` times.  Prints the median of each and the difference:
the statistics' cost per program run on this machine.  Multiplied by the program
runs per connection (the `cost` section's ``events_per_connection``) it is the
statistics' share of the BPF time per connection.

  sudo .venv/bin/python bench/stats_cost.py [--rounds 7] [--repeat 2000000] [--json F]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accept_rate import emit  # noqa: E402
from acceptrace import bpfstats, headers  # noqa: E402

BPF_PROG_TEST_RUN = 10
PACKET = bytes(64)   # an Ethernet-sized frame of zeros: the program never looks at it
PROGRAM = "int empty(struct __sk_buff *skb) { return 0; }\n"


def test_run(prog_fd: int, repeat: int) -> int:
    """The kernel's average ns per run of ``prog_fd`` over ``repeat`` runs."""
    data = ctypes.create_string_buffer(PACKET, len(PACKET))
    # union bpf_attr's test: prog_fd, retval, data_size_in, data_size_out, data_in,
    # data_out, repeat, duration (include/uapi/linux/bpf.h, since Linux 4.12)
    attr = ctypes.create_string_buffer(
        struct.pack("=IIIIQQII", prog_fd, 0, len(PACKET), 0, ctypes.addressof(data), 0,
                    repeat, 0), 80)
    bpfstats._bpf(BPF_PROG_TEST_RUN, attr)
    return int(struct.unpack_from("=I", attr.raw, 36)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=2_000_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root", file=sys.stderr)
        return 2
    if bpfstats.SYSCTL.read_text().strip() == "1":
        print("bench: kernel.bpf_stats_enabled is already 1: nothing to compare",
              file=sys.stderr)
        return 2
    headers.activate(headers.find_header_tree())
    from bcc import BPF  # noqa: PLC0415  (the benchmark may import bcc; tracer/ does not)

    b = BPF(text=PROGRAM.encode())
    fd = b.load_func(b"empty", BPF.SOCKET_FILTER).fd
    off: list[int] = []
    on: list[int] = []
    try:
        test_run(fd, args.repeat // 10)  # warm-up
        for rnd in range(args.rounds):
            for timed in ((False, True) if rnd % 2 == 0 else (True, False)):
                sw = bpfstats.StatsSwitch.on() if timed else None
                if sw is not None and sw.how != "BPF_ENABLE_STATS":
                    sw.close()
                    print(f"bench: BPF_ENABLE_STATS unavailable ({sw.why or sw.how})",
                          file=sys.stderr)
                    return 2
                try:
                    (on if timed else off).append(test_run(fd, args.repeat))
                finally:
                    if sw is not None:
                        sw.close()
    finally:
        b.cleanup()
    out = {"repeat": args.repeat, "rounds": args.rounds,
           "ns_per_run_off": off, "ns_per_run_on": on,
           "median_off": statistics.median(off), "median_on": statistics.median(on),
           "stats_ns_per_run": statistics.median(on) - statistics.median(off)}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
