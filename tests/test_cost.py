"""What tracing costs, measured by the kernel: the run's `cost` section.

A real server in a network namespace this test makes, N clients, acceptrace
attached.  The kernel's own statistics of acceptrace's programs (run counts,
run time, skipped runs) are in the JSON; they are on only while acceptrace
runs: a BPF program of the test's own, loaded beside it, is timed by the
kernel while acceptrace traces and not before or after.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from acceptrace import bpfstats, kernel, servers
from acceptrace.demo import free_port
from conftest import scaled
from test_listeners import ACCEPTOR, clients, start, stop_all
from test_netns import in_ns, network_namespace

pytestmark = pytest.mark.root

PROBE = r"""
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }
"""


@contextmanager
def timed_probe() -> Iterator[object]:
    """A program of the test's own on getppid(): the kernel counts its runs only while
    BPF statistics are on."""
    from acceptrace import headers
    from bcc import BPF  # the test may import bcc; tracer/ does only in bpfloader

    headers.activate(headers.find_header_tree())
    b = BPF(text=PROBE.encode())
    try:
        yield b
    finally:
        b.cleanup()


def probe_runs(b: object, layout: dict[str, int], calls: int = 50) -> int:
    """getppid() ``calls`` times; how many runs the kernel timed meanwhile."""
    fn = next(iter(b.funcs.values()))  # type: ignore[attr-defined]
    before = bpfstats.prog_stats(fn.fd, layout).runs
    for _ in range(calls):
        os.getppid()
    return bpfstats.prog_stats(fn.fd, layout).runs - before


def stats_holders() -> list[str]:
    """The processes holding a BPF_ENABLE_STATS file descriptor (anon inode "bpf-stats"):
    while one does, the kernel times every BPF program, acceptrace's or not."""
    held = []
    for pid in servers.pids_holding({"anon_inode:bpf-stats"}):
        try:
            held.append(f"{pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})")
        except OSError:
            continue
    return held


def accept_hook(backend: str) -> str:
    return {"tracepoint": "tracepoint:syscalls:sys_exit_accept4",
            "fentry": "fexit:inet_csk_accept",
            "kprobe": "kretprobe:inet_csk_accept"}[backend]


def test_cost_is_the_kernels_own_and_stats_are_off_after_exit(tracer):
    layout = kernel.prog_info_facts(kernel.load_btf())
    if not layout:
        pytest.skip("this kernel's BTF has no bpf_prog_info run-time fields")
    sysctl = bpfstats.SYSCTL.read_text()
    n = 40
    port = free_port()
    with timed_probe() as probe, network_namespace() as ns:
        if probe_runs(probe, layout):
            pytest.skip("another process holds the kernel's BPF statistics on")
        srv = start(in_ns(ns, sys.executable, "-c", ACCEPTOR, str(port)))
        try:
            t = tracer(port, "--netns", ns, "--cost-every", "1").start()
            try:
                on = probe_runs(probe, layout)
                clients(ns, port, n)
                time.sleep(1.0)
            finally:
                assert t.stop() == 0, t.stderr
            after = probe_runs(probe, layout)
        finally:
            stop_all([srv])
    assert on >= 50, "statistics were not on while acceptrace ran"
    if after:
        # acceptrace has exited: its own descriptor is closed.  Another process that turned
        # the statistics on meanwhile (a second tracer, bpftop) keeps them on: then this
        # run cannot tell, and says who.
        others = stats_holders()
        if others:
            pytest.skip(f"another process turned BPF statistics on during the test: {others}")
    assert after == 0, "acceptrace left the kernel's BPF statistics on"
    assert bpfstats.SYSCTL.read_text() == sysctl
    run = t.report()
    cost = run["cost"]
    assert cost["stats"] in ("BPF_ENABLE_STATS", "kernel.bpf_stats_enabled"), cost
    assert run["connections"]["accepted"] == n == cost["connections"]
    progs = {p["hook"]: p for p in cost["programs"]}
    assert set(progs) <= set(run["meta"]["hooks"]) | {"uprobe:dispatch"}
    acc = progs[accept_hook(run["meta"]["backend"])]
    assert acc["runs"] >= n and acc["run_time_ns"] > 0, acc   # every accept, maybe others
    assert "accepted" in acc["feeds"]
    for p in progs.values():
        assert (p["runs"] == 0) == (p["ns_per_run"] is None), p
        assert p["missed"] is None or p["missed"] >= 0, p
    assert cost["events_per_connection"] >= 1.0
    total = sum(p["run_time_ns"] for p in progs.values())
    assert cost["kernel_ns_per_connection"] == pytest.approx(total / n, rel=1e-3)
    assert cost["user_cpu_s"] > 0 and cost["peak_rss_kib"] > 10_000
    # the summary says it in one line
    assert "cost: BPF " in t.stdout and "per connection" in t.stdout


# Connects on request: a line with N on stdin makes N connections (each sends a byte and
# reads the answer), then prints "done".  Started once, so that a batch takes
# milliseconds, not a Python start-up (seconds in an emulated guest).
BATCHER = r"""
import socket, sys
port = int(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    for _ in range(int(line)):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"x"); s.recv(10); s.close()
    print("done", flush=True)
"""


def test_cost_timed_one_interval_in_n_is_off_in_between_and_counts_only_those(tracer):
    """--cost-every 2 --interval 1: while acceptrace runs, the kernel's statistics are on
    during every other interval and off in between (the test's own program is timed,
    then not).  A batch of connections is made right after each of two switches off and
    two switches on: the cost section covers about half the run, and its
    per-connection figure divides by the connections made in the timed intervals,
    about half of the run's."""
    layout = kernel.prog_info_facts(kernel.load_btf())
    if not layout:
        pytest.skip("this kernel's BTF has no bpf_prog_info run-time fields")
    port = free_port()
    want = {False: 2, True: 2}      # batches still to make while timing is off / on
    with timed_probe() as probe, network_namespace() as ns:
        if probe_runs(probe, layout):
            pytest.skip("another process holds the kernel's BPF statistics on")
        srv = start(in_ns(ns, sys.executable, "-c", ACCEPTOR, str(port)))
        batcher = start(in_ns(ns, sys.executable, "-c", BATCHER, str(port)))
        assert batcher.stdin is not None and batcher.stdout is not None
        try:
            t = tracer(port, "--netns", ns, "--cost-every", "2", "--interval", "1").start()
            try:
                last: bool | None = None
                deadline = time.monotonic() + scaled(60)
                while any(want.values()) and time.monotonic() < deadline:
                    runs = probe_runs(probe, layout)
                    now = True if runs >= 50 else False if runs == 0 else None
                    if now is not None and last is not None and now != last and want[now]:
                        # just switched: the rest of this interval is ahead
                        batcher.stdin.write("5\n")
                        batcher.stdin.flush()
                        assert batcher.stdout.readline().strip() == "done"
                        want[now] -= 1
                    last = now if now is not None else last
                    time.sleep(0.02)
            finally:
                assert t.stop() == 0, t.stderr
            after = probe_runs(probe, layout)
        finally:
            stop_all([batcher, srv])
    if stats_holders():
        pytest.skip("another process turned BPF statistics on during the test")
    assert want == {False: 0, True: 0}, f"timing was never switched {want}"
    assert after == 0
    run = t.report()
    cost = run["cost"]
    n = run["connections"]["accepted"]
    assert n == 20 == cost["connections"]
    # every other interval timed: about half the run (not all of it, not none)
    assert 0.2 < cost["timed_seconds"] / cost["seconds"] < 0.8, cost
    # 10 made while timed, 10 while not; a slow machine may push one batch of 5 over
    # an interval's end, no more
    assert 5 <= cost["timed_connections"] <= 15, cost
    # (its runs are every process's accepts on the host while timed: no upper bound here)
    acc = {p["hook"]: p for p in cost["programs"]}[accept_hook(run["meta"]["backend"])]
    assert acc["runs"] > 0 and acc["run_time_ns"] > 0, acc
    total = sum(p["run_time_ns"] for p in cost["programs"])
    assert cost["kernel_ns_per_connection"] == pytest.approx(
        total / cost["timed_connections"], rel=1e-3)
    assert "[BPF timed " in t.stdout
