"""The soak (bench/soak.py) in its 3-minute version: 2 minutes of uvicorn under a steady
connection rate, 1 minute of SYNs piling up in a never-accepting listener's SYN queue,
one acceptrace run over both, in a network namespace the soak makes.  Flat memory,
bounded maps, no lost events, counts equal to the namespace's own counters (or short
by exactly the runs the kernel skipped); SYN-ACK retransmits equal to the times their
tracepoint fired, counted by a program of the soak's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import backend_args, scaled

pytestmark = pytest.mark.root

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_three_minute_soak(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.Popen(
        [sys.executable, str(SOAK), "--minutes", "2", "--synq-minutes", "1", "--rate", "500",
         "--synq-rate", "200", "--sample-s", "30", "--out", str(out), *backend_args()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=scaled(600))
    finally:
        if proc.poll() is None:  # SIGTERM first: the soak removes its namespace and all
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.exists(), res.stdout + res.stderr
    v = json.loads(out.read_text())
    c = v["checks"]
    why = res.stdout[-3000:] + res.stderr[-3000:]
    assert c["exit_code"] == 0, why
    answered = sum(x["ok"] for x in v["clients"])
    assert answered > 2 * 60 * 500 * 0.8, (answered, why)   # the rate was held
    assert v["syn_queue_at_end_of_flood"] > 100, why         # requests did pile up
    assert c["lost_events"] == 0, why
    for key in ("accepted", "queued", "listen_overflow", "synack_retransmits"):
        ours, kernel, skipped = c[key]
        assert ours is not None and kernel - skipped <= ours <= kernel, (key, c[key], why)
    assert c["accepted"][1] == answered
    assert c["synack_retransmits"][1] > 0
    # SYN-ACK retransmits are held against the tracepoint's own hits (an independent
    # program's count, above); the namespace's counter may only be ahead of those: by
    # retransmits the kernel never reported to any tracer (docs/performance.md).
    sk = c["synack_kernel"]
    assert sk["ahead"] + sk["client_slack"] >= 0, (sk, why)
    # Memory: flat after the first sample (4 MiB allows for the run's intervals, about
    # 1-2 KB each, and the allocator's arenas); maps: nothing accumulates.
    assert c["rss_growth_kib"] < 4096, (c["rss_kib"], [s["VmRSS"] for s in v["samples"]])
    conns = [s["maps"]["conns"]["entries"] for s in v["samples"]]
    assert max(conns) < 1000 and c["maps_end"]["conns"] <= 16, conns
    for name, n in c["maps_max"].items():
        assert n < v["samples"][-1]["maps"][name]["max_entries"], (name, n)
    assert res.returncode == 0, why
