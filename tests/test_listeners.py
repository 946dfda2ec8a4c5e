"""Several listeners in one run: --port twice, no --port (every listener, ranked),
--all-namespaces.

Everything runs in network namespaces the test makes, so the namespace's own
kernel counters (/proc/net/netstat read inside it) hold only the test's
connections and each listener's figures can be held against them exactly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from acceptrace.demo import free_port
from conftest import assert_count, assert_listen_overflow, scaled, wait_until
from test_netns import CLIENTS, SERVER, in_ns, network_namespace, ns_netstat

pytestmark = pytest.mark.root

# A server on several ports at once, each accepting and answering at once.
ACCEPTOR = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(128); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept()
        c.setblocking(True); c.recv(100); c.sendall(b"ok"); c.close()
"""


def clients(ns: str, port: int, n: int) -> None:
    res = subprocess.run(in_ns(ns, sys.executable, "-c", CLIENTS, str(port), str(n)),
                         capture_output=True, text=True, timeout=scaled(120))
    assert res.stdout.strip() == str(n), res.stderr


def start(argv: list[str]) -> subprocess.Popen[str]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def distinct_ports(n: int) -> list[int]:
    """n ports the kernel handed out, all different (each socket held until the last is
    bound: free_port() twice may give the same port twice)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def ns_listening(ns: str) -> set[int]:
    """The TCP ports listening in namespace ns, as ss shows them."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn"], capture_output=True,
                         text=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def section(run: dict, port: int, inode: int | None = None) -> dict:
    found = [t for t in run["targets"] if t["meta"]["port"] == port
             and (inode is None or t["meta"]["netns"]["inode"] == inode)]
    assert len(found) == 1, (port, [(t["meta"]["port"], t["meta"]["netns"])
                                    for t in run["targets"]])
    return found[0]


def test_two_ports_one_run_each_counts_its_own(tracer):
    """--port A --port B: each port's counts are its own clients', and the two add up
    to the namespace's TcpPassiveOpens."""
    a, b = free_port(), free_port()
    n_a, n_b = 7, 13
    with network_namespace() as ns:
        srv = start(in_ns(ns, sys.executable, "-c", ACCEPTOR, str(a), str(b)))
        try:
            t = tracer(a, "--port", str(b), "--netns", ns).start()
            before = ns_netstat(ns)
            try:
                clients(ns, a, n_a)
                clients(ns, b, n_b)
                time.sleep(1.0)
            finally:
                assert t.stop() == 0, t.stderr
            after = ns_netstat(ns)
        finally:
            stop_all([srv])
    run = t.report()
    assert f"tracing ports {a}, {b}" in t.stderr
    assert run["meta"]["ports"] == [a, b]
    sa, sb = section(run, a), section(run, b)
    for sec, n in ((sa, n_a), (sb, n_b)):
        assert sec["connections"]["accepted"] == n, sec["connections"]
        assert sec["connections"]["queued"] == n
        assert sec["connections"]["read"] == n
        assert sec["stages"]["accept_queue"]["count"] == n
        assert [p["pid"] for p in sec["processes"]] == [srv.pid]
        assert sec["queues"]["listeners"][0]["port"] == sec["meta"]["port"]
    opens = after["TcpPassiveOpens"] - before["TcpPassiveOpens"]
    assert opens == n_a + n_b
    assert run["connections"]["accepted"] == n_a + n_b
    assert run["kernel_counters"]["TcpPassiveOpens"] == opens
    # each section carries its namespace's counters, the same for both
    assert sa["kernel_counters"]["TcpPassiveOpens"] == opens == sb["kernel_counters"][
        "TcpPassiveOpens"]


def test_every_listener_ranked_and_a_new_one_picked_up(tracer):
    """No --port: five listeners, one of them overflowing, come out with the
    overflowing one first; a listener started mid-run is traced from then on."""
    *ports, late = distinct_ports(6)
    hot = ports[2]
    n_hot, n_cool, n_late = 24, 4, 5
    with network_namespace() as ns:
        procs = [start(in_ns(ns, sys.executable, "-c", ACCEPTOR,
                             *[str(p) for p in ports if p != hot]))]
        # the overflowing one: backlog 2, accepts nothing until told
        procs.append(start(in_ns(ns, sys.executable, "-c", SERVER, str(hot), "2")))
        try:
            listening = ns_listening(ns)
            assert listening == set(ports), (listening, ports)
            t = tracer(None, "--netns", ns).start()
            before = ns_netstat(ns)
            try:
                assert "tracing every TCP listener (5 now)" in t.stderr, (
                    t.stderr, ns_listening(ns), ports)
                for p in ports:
                    if p != hot:
                        clients(ns, p, n_cool)
                hot_clients = subprocess.Popen(
                    in_ns(ns, sys.executable, "-c", CLIENTS, str(hot), str(n_hot)),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                # the queue is full and dropping (wait for the kernel to say so: on a slow
                # guest the clients take seconds to start)
                assert wait_until(lambda: ns_netstat(ns)["TcpExtListenOverflows"]
                                  > before["TcpExtListenOverflows"], timeout=30, step=0.2)
                gate = procs[1].stdin
                assert gate is not None
                gate.write("go\n")
                gate.flush()
                out, errs = hot_clients.communicate(timeout=scaled(120))
                assert out.strip() == str(n_hot), errs
                procs.append(start(in_ns(ns, sys.executable, "-c", ACCEPTOR, str(late))))
                assert wait_until(lambda: f"a listener appeared on port {late}" in t.stderr,
                                  timeout=scaled(20)), t.stderr
                clients(ns, late, n_late)
                time.sleep(1.0)
            finally:
                assert t.stop() == 0, t.stderr
            after = ns_netstat(ns)
        finally:
            stop_all(procs)
    run = t.report()
    assert run["meta"]["all_listeners"] is True and run["meta"]["ports"] == []
    got = {sec["meta"]["port"] for sec in run["targets"]}
    assert got == {*ports, late}, got
    first = run["targets"][0]
    ranked = [(t["meta"]["port"], t["drops"]["listen_overflow"], t["extra"]["rank"])
              for t in run["targets"]]
    assert first["meta"]["port"] == hot and first["extra"]["rank"] == 1, (
        hot, ranked, run["extra"], run.get("cost"), t.stdout[-3000:])
    overflows = after["TcpExtListenOverflows"] - before["TcpExtListenOverflows"]
    assert overflows > 0
    assert_listen_overflow(first, overflows)
    assert first["connections"]["accepted"] == n_hot
    for p in ports:
        if p != hot:
            sec = section(run, p)
            assert sec["connections"]["accepted"] == n_cool
            assert not sec["drops"]["listen_overflow"]
    new = section(run, late)
    assert new["connections"]["accepted"] == n_late
    assert new["extra"]["first_seen_s"] > 0
    opens = after["TcpPassiveOpens"] - before["TcpPassiveOpens"]
    assert run["connections"]["accepted"] == n_hot + 4 * n_cool + n_late
    # Every child the kernel made, as its TcpPassiveOpens counts them: one more than
    # accepted when a final ACK and its retransmit (the overflow makes clients resend)
    # each made a child on two CPUs and the loser was freed unqueued (CI: 46 for 45).
    assert_count(run, "created", opens)
    assert opens >= run["connections"]["accepted"]
    # the summary's listener table names the overflowing one first
    table = t.stdout[t.stdout.index("listeners, worst first"):t.stdout.index("totals over")]
    rows = [ln for ln in table.splitlines()[3:] if ln.strip()]
    assert len(rows) == 6 and f":{hot}" in rows[0], table


def test_all_namespaces_keeps_the_same_port_apart(tracer):
    """--all-namespaces: one server on the same port in each of two namespaces; each
    listener's section has its own connections and its own namespace's counters."""
    port = free_port()
    with network_namespace() as ns1, network_namespace() as ns2:
        procs = [start(in_ns(ns, sys.executable, "-c", ACCEPTOR, str(port)))
                 for ns in (ns1, ns2)]
        ino1, ino2 = (os.stat(f"/run/netns/{ns}").st_ino for ns in (ns1, ns2))
        try:
            t = tracer(port, "--all-namespaces").start()
            b1, b2 = ns_netstat(ns1), ns_netstat(ns2)
            try:
                clients(ns1, port, 6)
                clients(ns2, port, 11)
                time.sleep(1.0)
            finally:
                assert t.stop() == 0, t.stderr
            a1, a2 = ns_netstat(ns1), ns_netstat(ns2)
        finally:
            stop_all(procs)
    run = t.report()
    assert run["meta"]["all_namespaces"] is True
    s1, s2 = section(run, port, ino1), section(run, port, ino2)
    assert s1["meta"]["netns"]["name"] == f"ip netns {ns1}"
    for sec, n, before, after in ((s1, 6, b1, a1), (s2, 11, b2, a2)):
        assert sec["connections"]["accepted"] == n
        opens = after["TcpPassiveOpens"] - before["TcpPassiveOpens"]
        assert opens == n == sec["kernel_counters"]["TcpPassiveOpens"]


def test_too_many_ports_is_one_line():
    from helpers import run_cli

    many = []
    for p in range(20000, 20000 + 300):
        many += ["--port", str(p)]
    res = run_cli(*many, "--duration", "1")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "more than one run can trace" in lines[-1] and "Traceback" not in res.stderr


def test_a_namespace_that_goes_away_keeps_its_totals(tracer):
    """--all-namespaces: a container stops mid-run (its server killed, its namespace
    deleted).  The run goes on for the other namespace, the gone one's section keeps
    what it counted (listening: false), and the JSON is written at the end."""
    port = free_port()
    with network_namespace() as keep, network_namespace() as goes:
        procs = [start(in_ns(ns, sys.executable, "-c", ACCEPTOR, str(port)))
                 for ns in (keep, goes)]
        ino_keep, ino_goes = (os.stat(f"/run/netns/{ns}").st_ino for ns in (keep, goes))
        try:
            t = tracer(port, "--all-namespaces").start()
            before = ns_netstat(keep)
            try:
                clients(keep, port, 3)
                clients(goes, port, 5)
                time.sleep(1.5)  # an interval reads the namespace's figures
                stop_all([procs.pop()])
                subprocess.run(["ip", "netns", "del", goes], check=True)
                assert wait_until(lambda: "is gone" in t.stderr, timeout=scaled(30)), t.stderr
                clients(keep, port, 4)
                time.sleep(1.0)
            finally:
                assert t.stop() == 0, t.stderr
            after = ns_netstat(keep)
        finally:
            stop_all(procs)
    run = t.report()
    kept, gone = section(run, port, ino_keep), section(run, port, ino_goes)
    assert kept["connections"]["accepted"] == 7
    assert kept["kernel_counters"]["TcpPassiveOpens"] == (
        after["TcpPassiveOpens"] - before["TcpPassiveOpens"]) == 7
    assert kept["extra"]["listening"] is True
    assert gone["connections"]["accepted"] == 5 and gone["extra"]["listening"] is False
    assert gone["kernel_counters"]["TcpPassiveOpens"] == 5
    assert run["connections"]["accepted"] == 12
