#!/usr/bin/env python3
"""How fast this CPU runs the test harness's kind of work, as one number.

Prints the median of five rounds of a fixed pure-Python workload run on every
CPU at once (the slowest of each round), in seconds.
The guest runs it at boot (tests/vm/guest-init.sh); its time divided by
HOST_REFERENCE_S, the same workload on a quiet CI-class host, is the guest's
time scale: every harness timeout in the guest is multiplied by it
(tests/conftest.py `scaled`), and the per-backend timeout by its ratio to
QUIET_GUEST_SCALE.  So a busy or slow day lengthens the timeouts instead of
failing tests that would have passed (docs/vm.md, "Timeouts").
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import time

# Measured on the 2-core CI machine, nothing else running (2026-12-02): 0.029-0.034 s.
HOST_REFERENCE_S = 0.030
# The guest's scale on that machine, quiet (21 measured in the 6.12 guest on
# 2026-12-02, every CPU at once): what MATRIX's backend_timeout was sized for.
QUIET_GUEST_SCALE = 21.0
# The per-backend timeout grows at most this much (tests/vm/run.py sizes the
# host's own deadline for the guest with it).
MAX_BACKEND_FACTOR = 3.0


def workload() -> int:
    """Dict, string and integer work, like pytest's and acceptrace's Python."""
    d: dict[str, int] = {}
    acc = 0
    for i in range(60_000):
        k = f"k{i % 997}"
        d[k] = d.get(k, 0) + i
        acc ^= hash(k) & 0xFFFF
    return acc + len(d)


def _timed(_: int = 0) -> float:
    t0 = time.perf_counter()
    workload()
    return time.perf_counter() - t0


def measure(runs: int = 5) -> float:
    """The median over `runs` rounds of the slowest of one workload per CPU, run
    at once: the tests keep every CPU busy (server, clients, tracer), so a CPU
    lost to another process on the host shows here as it does in them.  (One
    process alone saw a CPU hog as 1.3x when the tests ran 2.3x slower.)"""
    ncpu = max(1, len(os.sched_getaffinity(0)))
    if ncpu == 1:
        return statistics.median(_timed() for _ in range(runs))
    with multiprocessing.Pool(ncpu) as pool:
        return statistics.median(max(pool.map(_timed, range(ncpu))) for _ in range(runs))


def main() -> int:
    s = measure()
    scale = max(1.0, s / HOST_REFERENCE_S)
    factor = min(MAX_BACKEND_FACTOR, max(1.0, scale / QUIET_GUEST_SCALE))
    print(f"seconds={s:.4f} scale={scale:.2f} backend_factor={factor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
