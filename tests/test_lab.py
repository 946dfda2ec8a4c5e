"""The lab's scenarios, for real: each one's namespace, server, load and acceptrace.

Every scenario runs both its phases (as it is, then fixed) in namespaces of its own,
and is checked three ways: the clients saw the symptom (the load generator's
figures), the namespace's own kernel counters (/proc/net/netstat read inside it)
agree with the clients and with acceptrace's figures, and the diagnosis named the
expected cause -- and no longer names it after the fix.  One more runs a scenario
through the command line while another server on the same port, in another
namespace, is loaded, and one interrupts a run and checks that nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from acceptrace import lab
from acceptrace.lab import SCENARIOS, PhaseResult, ScenarioResult, waited
from conftest import (
    assert_count,
    assert_listen_overflow,
    exact_drops_expected,
    requested_backend,
    scaled,
)

pytestmark = pytest.mark.root

# acceptrace's kernel_counters cover its whole run, the lab's deltas the load and its
# settling: nothing happens in the namespace outside the load, so they are equal.
SHARED_COUNTERS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPReqQFullDrop",
                   "TcpExtTCPReqQFullDoCookies", "TcpExtSyncookiesSent",
                   "TcpExtSyncookiesRecv", "TcpPassiveOpens")


def run(name: str, tmp_path: Path) -> ScenarioResult:
    t0 = time.monotonic()
    res = lab.run_scenario(SCENARIOS[name], tmp_path, requested_backend(), print)
    print(f"{name}: {time.monotonic() - t0:.1f} s")
    for p in (res.before, res.fixed):
        p99 = {s: h.percentile(0.99) for s, h in p.run.stages.items()
               if s in ("accept_queue", "accept_to_read") and h is not None}
        print(p.label, f"stretch {p.stretch:g}", json.dumps(p.client), p.netstat, p.rules,
              f"p99 µs {p99}")
    return res


def check_consistent(p: PhaseResult) -> None:
    """What every phase must satisfy, whatever the scenario."""
    r, k, c = p.run.to_json(), p.netstat, p.client
    for name in SHARED_COUNTERS:
        assert r["kernel_counters"][name] == k[name], (p.label, name, r["kernel_counters"], k)
    opens = k["TcpPassiveOpens"]
    queued, accepted = r["connections"]["queued"], r["connections"]["accepted"]
    # Every child the kernel queued was accepted before the tracer stopped (settle()).
    assert accepted == queued, (p.label, r["connections"])
    # A child is queued for every passive open, but for one that lost its request to a
    # second CPU (a final ACK and its retransmit at once): counted, freed, never queued.
    assert opens - 2 <= queued <= opens, (p.label, queued, opens)
    # ... and the tracer counts those too: every child made, exactly the kernel's figure
    assert_count(r, "created", opens)
    assert sum(pc["accepted"] for pc in r["processes"]) == accepted
    # Every request a client completed went through a connection the kernel queued,
    # and every such connection had a client whose connect() returned.
    bg = p.background or {"completed": 0, "connected": 0, "syn_retransmitted": 0}
    assert c["completed"] + bg["completed"] <= accepted, (p.label, c, bg, accepted)
    # Each connect whose SYN its socket sent again is at least one of the namespace's
    # SYN (and SYN-ACK) retransmits.
    assert c["syn_retransmitted"] + bg["syn_retransmitted"] <= k["TcpExtTCPSynRetrans"]
    assert accepted <= c["connected"] + bg["connected"], (p.label, c, bg, accepted)
    assert r["meta"]["netns"]["name"] == f"ip netns {p.namespace}"
    assert r["meta"]["port"] == lab.LAB_PORT
    for key, value in p.sysctls.items():
        if key in r["meta"]["sysctls"]:
            assert r["meta"]["sysctls"][key] == value, (key, r["meta"]["sysctls"])


def check_common(res: ScenarioResult) -> None:
    check_consistent(res.before)
    check_consistent(res.fixed)
    assert res.ok, (res.scenario.expect, res.before.rules)
    assert res.fix_cleared, (res.scenario.expect, res.fixed.rules)
    assert res.seen, res.before.client
    for f in ("run.json", "fixed.json", "report.html", "lab.json"):
        assert (res.out_dir / f).stat().st_size > 0, f
    saved = json.loads((res.out_dir / "lab.json").read_text())
    assert saved["ok"] is True and saved["named"] == res.named
    # nothing of the phases is left: namespaces, and the processes that were in them
    assert not [n for n in os.listdir("/run/netns") if n in (res.before.namespace,
                                                              res.fixed.namespace)]


def test_accept_overflow(tmp_path):
    res = run("accept-overflow", tmp_path)
    check_common(res)
    b, f = res.before, res.fixed
    # The clients' waits are the kernel's dropped SYNs: each waiting client had at
    # least one SYN dropped at the full accept queue (ListenDrops counts each).
    assert 0 < waited(b) <= b.netstat["TcpExtListenDrops"]
    assert b.netstat["TcpExtListenOverflows"] > 0
    assert_listen_overflow(b.run.to_json(), b.netstat["TcpExtListenOverflows"])
    assert b.run.queues.backlog == 8
    # Fixed: not one overflow, not one client waiting a second.
    assert f.netstat["TcpExtListenOverflows"] == 0 and waited(f) == 0
    assert f.run.drops["listen_overflow"] == 0
    # and it serves several times the requests a second (on the 2-core host some 30
    # times; in an emulated guest, where the clients' and the server's CPU bound the
    # fixed run, some 6 times)
    assert f.client["requests_per_s"] > 3 * b.client["requests_per_s"]


def test_syn_flood(tmp_path):
    res = run("syn-flood", tmp_path)
    check_common(res)
    b, f = res.before, res.fixed
    synq = 128 + 1   # the SYN queue holds backlog + 1 requests
    # syncookies off: the flood past the full SYN queue, and every client's SYNs, dropped
    assert b.flood_sent == 400
    assert b.netstat["TcpExtTCPReqQFullDrop"] >= b.flood_sent - synq
    assert b.client["completed"] == 0 and b.client["connect_timeouts"] == b.client["attempted"]
    assert b.netstat["TcpPassiveOpens"] == 0 and b.netstat["TcpExtSyncookiesSent"] == 0
    if exact_drops_expected(b.run.to_json()):
        assert b.run.drops["syn_dropped_synq_full"] == b.netstat["TcpExtTCPReqQFullDrop"]
    # syncookies on: the same flood answered with cookies, the clients get in
    assert f.netstat["TcpExtTCPReqQFullDrop"] == 0
    assert f.netstat["TcpExtSyncookiesSent"] >= f.flood_sent - synq
    assert f.client["connect_timeouts"] == 0 and f.client["completed"] > 0
    # each connection that came by cookie is one the kernel validated -- but for the
    # tracepoint backend's queue_missed children (known from their state change only,
    # their origin unseen: CI beside a CPU hog, 5459 for 5460 with one missed)
    recv, missed = f.netstat["TcpExtSyncookiesRecv"], f.run.extra["queue_missed"]
    assert recv > 0
    assert recv - missed <= f.run.drops["syncookies"] <= recv, (recv, missed)


def test_somaxconn_clamp(tmp_path):
    res = run("somaxconn-clamp", tmp_path)
    check_common(res)
    b, f = res.before, res.fixed
    # the server asked for 2048 both times; the namespace's somaxconn decided
    assert b.sysctls["net.core.somaxconn"] == 64 == b.run.meta.somaxconn == b.run.queues.backlog
    assert f.sysctls["net.core.somaxconn"] == 4096 == f.run.meta.somaxconn
    assert f.run.queues.backlog == 2048
    assert 0 < waited(b) <= b.netstat["TcpExtListenDrops"]
    assert_listen_overflow(b.run.to_json(), b.netstat["TcpExtListenOverflows"])
    depth = b.run.queues.accept_queue_depth
    assert depth is not None and depth.max is not None and depth.max <= 65
    assert f.netstat["TcpExtListenOverflows"] == 0 and waited(f) == 0


def test_event_loop_busy(tmp_path):
    res = run("event-loop-busy", tmp_path)
    check_common(res)
    b, f = res.before, res.fixed
    # no overflow, no error: the wait is the loop's
    for p in (b, f):
        assert p.netstat["TcpExtListenOverflows"] == 0 and p.run.drops["listen_overflow"] == 0
        assert p.client["completed"] == p.client["attempted"]
    # the clients' /health waited for the CPU handler, and so did the connections in
    # acceptrace's figures: before accept() or before their first read
    # (on a slow machine -- an emulated CPU -- the CPU handler is stretched: lab.stretch_load)
    def half(p: PhaseResult) -> float:
        return lab.CPU_MS * p.stretch * 1000 / 2

    def loop_wait(p: PhaseResult) -> float:
        aq, ar = p.run.stages["accept_queue"], p.run.stages["accept_to_read"]
        assert aq is not None and ar is not None
        return max(aq.percentile(0.99) or 0, ar.percentile(0.99) or 0)

    # 1 in 100 /health requests waited a whole CPU handler, and 1 in 100 connections
    # in acceptrace's figures at least half of one (the rest came between two handlers)
    assert b.client["total_p99_ms"] * 1000 >= 2 * half(b)
    assert loop_wait(b) >= half(b)
    # The fix took at least half a CPU handler off the clients' p99, and off acceptrace's
    # (that it no longer names the cause, check_common asked).  Differences, not ratios
    # or bounds: in the TCG guest the fixed run keeps a tail the fix cannot remove (one
    # vCPU busy with the pool's work, the other with the loop, the clients and
    # acceptrace, on one host thread: the connects' p99 was 100-175 ms there, and a
    # connect waits for no loop).  The fixed clients' p99 was 200-350 ms there beside
    # 840-1070 ms before (ratios of 2.4-5.3), and acceptrace's 155 ms once when that run
    # measured its stretch at 5.4 (half a handler: 135 ms); on a real machine the clients'
    # were 17 ms beside 112 ms, acceptrace's 9.7 ms beside 109 ms (docs/lab.md).
    assert (b.client["total_p99_ms"] - f.client["total_p99_ms"]) * 1000 >= half(b)
    assert loop_wait(b) - loop_wait(f) >= half(b)


def test_abort_on_overflow(tmp_path):
    res = run("abort-on-overflow", tmp_path)
    check_common(res)
    b, f = res.before, res.fixed
    resets = b.client["errors"].get("reset", 0)
    assert b.run.meta.sysctls["net.ipv4.tcp_abort_on_overflow"] == 1
    # every reset a client saw is a RST the namespace sent for a request whose final ACK
    # found the accept queue full (EmbryonicRsts); each such ACK is a dropped one
    assert 0 < resets <= b.netstat["TcpExtEmbryonicRsts"] <= b.netstat["TcpOutRsts"]
    ack = b.run.drops["ack_dropped"]
    if ack is not None:
        assert b.netstat["TcpExtEmbryonicRsts"] <= ack <= b.netstat["TcpExtListenOverflows"]
    assert_listen_overflow(b.run.to_json(), b.netstat["TcpExtListenOverflows"])
    # Fixed: no overflow, and so not one RST from the accept path (EmbryonicRsts counts
    # each RST tcp_abort_on_overflow makes) and no client reset.  TcpOutRsts is not
    # asked to be 0: the namespace holds the clients too, and under TCG a busy guest's
    # fixed run once counted 10 RSTs with no overflow and no client reset (a socket of
    # the namespace closing early: TCPAbortOnClose / TCPAbortOnData, now in netstat).
    assert f.client["errors"].get("reset", 0) == 0 and f.netstat["TcpExtListenOverflows"] == 0
    assert f.netstat["TcpExtEmbryonicRsts"] == 0
    assert (f.background or {}).get("errors", {}).get("reset", 0) == 0


def test_workers(tmp_path):
    res = run("workers", tmp_path)
    check_common(res)
    b, f = res.before, res.fixed
    assert len(b.run.processes) == 4 and len(f.run.processes) == 4
    assert len(b.run.queues.listeners) == 1       # one shared socket
    assert len(f.run.queues.listeners) == 4       # one SO_REUSEPORT socket per worker
    assert len({lst.inode for lst in f.run.queues.listeners}) == 4
    # the herd: with one shared socket the kernel wakes every worker for a connection
    herd, alone = b.wakeups_per_connection, f.wakeups_per_connection
    assert herd is not None and alone is not None and herd > 1.5 * alone, (herd, alone)


def test_lab_cli_with_another_loaded_listener(tmp_path):
    """`acceptrace lab run` as a user types it, while another uvicorn on the same port
    8000 -- in another namespace this test makes -- is loaded: the lab's figures are
    its namespace's only (the other's connections and overflows are not in them)."""
    from helpers import ACCEPTRACE

    other = f"at-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", other], check=True)
    stop = threading.Event()
    load_results: list[str] = []
    try:
        subprocess.run(["ip", "-n", other, "link", "set", "lo", "up"], check=True)
        subprocess.Popen(   # reaped with the namespace's processes below
            ["ip", "netns", "exec", other, sys.executable, "-m", "uvicorn",
             "acceptrace.demo_app:app", "--port", str(lab.LAB_PORT), "--backlog", "4",
             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "ACCEPTRACE_DEMO_BLOCK_MS": "10"})

        def loader() -> None:
            while not stop.is_set():
                out = subprocess.run(
                    ["ip", "netns", "exec", other, sys.executable, "-m", "acceptrace.loadgen",
                     "--port", str(lab.LAB_PORT), "--duration", "3", "--concurrency", "16",
                     "--connect-timeout", "2", "--timeout", "3"],
                    capture_output=True, text=True).stdout
                load_results.append(out)

        th = threading.Thread(target=loader, daemon=True)
        time.sleep(2)
        th.start()
        res = subprocess.run([*ACCEPTRACE, "lab", "run", "accept-overflow", "--out",
                              str(tmp_path), "--backend", requested_backend()],
                             capture_output=True, text=True, timeout=scaled(300))
        stop.set()
        th.join(scaled(30))
        other_counters = subprocess.run(
            ["ip", "netns", "exec", other, "cat", "/proc/net/netstat"],
            capture_output=True, text=True).stdout
    finally:
        stop.set()
        subprocess.run(["ip", "netns", "pids", other], capture_output=True)
        for pid in subprocess.run(["ip", "netns", "pids", other], capture_output=True,
                                  text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", other])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the expected cause was named" in res.stdout
    assert "accept-overflow" in res.stdout
    # the other server was loaded and overflowing meanwhile
    assert load_results and any('"completed"' in r for r in load_results)
    assert "ListenOverflows" in other_counters
    saved = json.loads((tmp_path / "accept-overflow" / "lab.json").read_text())
    run_b = json.loads((tmp_path / "accept-overflow" / "run.json").read_text())
    run_f = json.loads((tmp_path / "accept-overflow" / "fixed.json").read_text())
    for r, phase in ((run_b, saved["before"]), (run_f, saved["fixed"])):
        k = phase["netstat"]
        for name in SHARED_COUNTERS:
            assert r["kernel_counters"][name] == k[name], (name, r["kernel_counters"], k)
        assert r["connections"]["accepted"] <= k["TcpPassiveOpens"]
        # only the lab's own server accepted: one process, the lab's uvicorn
        assert len(r["processes"]) == 1
        assert r["meta"]["netns"]["name"] == f"ip netns {phase['namespace']}"


def test_interrupted_lab_leaves_nothing(tmp_path):
    """SIGTERM in the middle of the load: exit 143, and no namespace, server, load
    generator or tracer of the lab is left."""
    from helpers import ACCEPTRACE

    proc = subprocess.Popen([*ACCEPTRACE, "lab", "run", "accept-overflow", "--out",
                             str(tmp_path), "--backend", requested_backend()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    ns_inode = None
    lines = []
    end = time.monotonic() + scaled(120)
    for line in proc.stderr:
        lines.append(line)
        if "before: load:" in line:
            break
        assert time.monotonic() < end, "".join(lines)
    name = f"{lab.NS_PREFIX}accept-overflow-before-{proc.pid}"
    ns_inode = os.stat(f"/run/netns/{name}").st_ino
    time.sleep(1.0)   # in the middle of the load
    inside = pids_in_namespace(ns_inode)
    assert len(inside) >= 2, inside    # the server and the load generator at least
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=scaled(60))
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "stopped by SIGTERM" in rest
    assert not os.path.exists(f"/run/netns/{name}")
    assert pids_in_namespace(ns_inode) == []
    tracers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
               and name.encode() in _cmdline(p)]
    assert tracers == []


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def pids_in_namespace(inode: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.stat(p / "ns" / "net").st_ino == inode:
                out.append(int(p.name))
        except OSError:
            continue
    return out
