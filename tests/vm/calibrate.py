#!/usr/bin/env python3
"""How fast this CPU runs the test harness's kind of work, as one number.

Prints the median of five runs of a fixed pure-Python workload, in seconds.
The guest runs it at boot (tests/vm/guest-init.sh); its time divided by
HOST_REFERENCE_S, the same workload on a quiet CI-class host, is the guest's
time scale: every harness timeout in the guest is multiplied by it
(tests/conftest.py `scaled`), and the per-backend timeout by its ratio to
QUIET_GUEST_SCALE.  So a busy or slow day lengthens the timeouts instead of
failing tests that would have passed (docs/vm.md, "Timeouts").
"""

from __future__ import annotations

import statistics
import sys
import time

# Measured on the 2-core CI machine, nothing else running (2026-12-02).
HOST_REFERENCE_S = 0.030
# The guest's scale on that machine, quiet: what BACKEND_TIMEOUT was sized for.
QUIET_GUEST_SCALE = 10.0
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


def measure(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        workload()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    s = measure()
    scale = max(1.0, s / HOST_REFERENCE_S)
    factor = min(MAX_BACKEND_FACTOR, max(1.0, scale / QUIET_GUEST_SCALE))
    print(f"seconds={s:.4f} scale={scale:.2f} backend_factor={factor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
