#!/usr/bin/env python3
"""Soak: acceptrace held for a long time under a steady high connection rate.

Everything runs in a network namespace the soak makes (its counters are its own):

  phase "uvicorn"    --minutes M: uvicorn (uvloop, httptools: the dispatch uprobes are
                     on) answering paced clients at --rate connections/s, each a new
                     connection (connect, GET, read to EOF, close);
  phase "syn-queue"  --synq-minutes S: raw SYNs at --synq-rate/s to a listener that
                     never accepts, from an address whose SYN-ACKs go nowhere (a veth
                     whose peer drops them): the requests pile up in the SYN queue,
                     their SYN-ACKs are retransmitted, and none becomes a child.

One acceptrace process traces both ports for the whole soak (`--netns`, default
`--interval 1`, as a user runs it).  Every --sample-s (60 s) the soak records:
acceptrace's RSS (VmRSS) and CPU; the entries of each of its BPF hash maps (bpftool,
through the map ids in /proc/PID/fdinfo); its counters map summed over the listeners
(queued, accepted, lost events, ...); each of its programs' run_cnt, run_time_ns and
recursion_misses (the kernel's statistics acceptrace turns on for the run: the same
figures as the report's `cost` section) and so the in-kernel ns per connection of
that minute; and the namespace's own counters (/proc/net/netstat, snmp) and SYN queue.

At the end (traffic stopped, the never-accepting listener closed so that no more
SYN-ACKs are retransmitted, the counters quiet) it stops acceptrace and checks:
RSS bounded (growth after the first sample), maps bounded (no hash map's occupancy
growing), zero lost events, and the run's counts equal to the namespace's counters
(or short by exactly the runs the kernel skipped, `cost.programs[].missed`).
It writes every sample and the verdict as JSON (--out) and prints a summary.

  sudo .venv/bin/python bench/soak.py --minutes 60 --synq-minutes 10 --out soak.json
  sudo .venv/bin/python bench/soak.py --minutes 2 --synq-minutes 1   # tests/test_soak.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from acceptrace import layout as L
from acceptrace.demo import ServerProcess
from acceptrace.procnet import parse_netstat

SERVER_IP, CLIENT_IP = "198.18.9.1", "198.18.9.99"   # RFC 2544 benchmark range, in the ns
CLIENT_MAC = "02:00:00:00:09:63"                      # not the peer's: it drops the SYN-ACKs
UVICORN_PORT, SYNQ_PORT = 18080, 18081
KERNEL = ("TcpPassiveOpens", "TcpActiveOpens", "TcpExtListenOverflows", "TcpExtListenDrops",
          "TcpExtTCPSynRetrans", "TcpExtSyncookiesSent", "TcpExtTCPReqQFullDrop",
          "TcpExtTCPReqQFullDoCookies", "TcpRetransSegs")
COUNTERS = {"queued": L.C_QUEUED, "accepted": L.C_ACCEPTED, "read": L.C_READ,
            "lost_events": L.C_LOST_EVENTS, "synack_retransmits": L.C_SYNACK_RETRANS,
            "accept_untracked": L.C_ACCEPT_UNTRACKED, "dispatched": L.C_DISPATCHED}

# Paced clients: each process opens connections at its share of the rate until its
# deadline, then prints {"ok": n, "errors": {...}, "syn_retransmits": n}: the SYNs its
# connections had to send again (tcp_info.tcpi_total_retrans read as soon as connect()
# returns, before any data: the namespace's TCPSynRetrans counts them beside the server's
# SYN-ACK retransmits).
CLIENT = r"""
import json, socket, struct, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
req = b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
ok, errors, syn_rtx = 0, {}, 0
t0 = time.monotonic(); end = t0 + seconds; k = 0
while True:
    due = t0 + k / rate
    now = time.monotonic()
    if due >= end or now >= end:
        break
    if due > now:
        time.sleep(due - now)
    elif now - due > 1.0:      # fell behind by more than a second: do not burst to catch up
        t0, k = now, 0
    k += 1
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        syn_rtx += struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104),
                                      100)[0]   # tcpi_total_retrans
        s.sendall(req)
        while s.recv(65536):
            pass
        s.close()
        ok += 1
    except OSError as e:
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
print(json.dumps({"ok": ok, "errors": errors, "syn_retransmits": syn_rtx}), flush=True)
"""

# A listener that never accepts: its accept queue stays empty (no handshake completes),
# its SYN queue fills with the flood's requests.
NEVER_ACCEPTS = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(int(sys.argv[3]))
print("ready", flush=True)
sys.stdin.read()
"""

# Raw SYNs from CLIENT_IP (whose SYN-ACKs nobody answers), paced, each from a new port.
SYN_FLOOD = r"""
import random, socket, struct, sys, time
src, dst = sys.argv[1], sys.argv[2]
dport, rate, seconds = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
def syn(sport):
    opts = struct.pack("!BBH", 2, 4, 1460)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 6 << 4, 0x02,
                      64240, 0, 0) + opts
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 6, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return ip + tcp
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
t0 = time.monotonic(); n = 0; sport = 1024
while time.monotonic() - t0 < seconds:
    due = t0 + n / rate
    if due > time.monotonic():
        time.sleep(due - time.monotonic())
    sport = 1024 + (sport - 1024 + 7919) % 64000   # a new 4-tuple for ~64000 SYNs
    raw.sendto(syn(sport), (dst, 0)); n += 1
print(n, flush=True)
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A namespace with loopback up and a veth pair whose peer drops the SYN-ACKs to
    CLIENT_IP; removed afterwards with every process in it."""
    ns = f"at-soak-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "sq0", "type", "veth", "peer", "name", "sq1")
        sh("ip", "-n", ns, "addr", "add", f"{SERVER_IP}/24", "dev", "sq0")
        sh("ip", "-n", ns, "link", "set", "sq0", "up")
        sh("ip", "-n", ns, "link", "set", "sq1", "up")
        sh("ip", "-n", ns, "neigh", "replace", CLIENT_IP, "lladdr", CLIENT_MAC, "dev", "sq0",
           "nud", "permanent")
        yield ns
    finally:
        for pid in sh("ip", "netns", "pids", ns).split() if _exists(ns) else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _exists(ns: str) -> bool:
    return Path(f"/run/netns/{ns}").exists()


def ns_counters(ns: str) -> dict[str, int]:
    out = sh(*in_ns(ns, "cat", "/proc/net/netstat", "/proc/net/snmp"))
    c = parse_netstat([out])
    return {k: c.get(k, 0) for k in KERNEL}


def syn_queue(ns: str, port: int) -> int:
    out = sh(*in_ns(ns, "ss", "-Htn", "state", "syn-recv", f"sport = :{port}"))
    return len(out.splitlines())


# -- what acceptrace holds --------------------------------------------------------------

def bpf_objects(pid: int) -> tuple[dict[int, dict[str, str]], list[int]]:
    """The BPF maps (id -> fdinfo) and programs (ids) process pid holds."""
    maps: dict[int, dict[str, str]] = {}
    progs: list[int] = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        info = {k.strip(): v.strip() for k, v in info.items()}
        if link == "anon_inode:bpf-map" and "map_id" in info:
            maps[int(info["map_id"])] = info
        elif link == "anon_inode:bpf-prog" and "prog_id" in info:
            progs.append(int(info["prog_id"]))
    return maps, sorted(set(progs))


def bpftool(*args: str) -> Any:
    return json.loads(sh("bpftool", "-j", *args) or "null")


HASH_TYPES = {"1", "5", "9", "10"}   # hash, percpu_hash, lru_hash, lru_percpu_hash


def map_sample(pid: int) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Each hash map's {entries, max_entries} by name, and the counters summed over
    the traced listeners (every row but the run-wide one)."""
    maps, _ = bpf_objects(pid)
    occupancy: dict[str, dict[str, int]] = {}
    counters: dict[str, int] = {}
    for mid, info in maps.items():
        meta = bpftool("map", "show", "id", str(mid))
        name = meta.get("name", str(mid))
        if info.get("map_type") in HASH_TYPES:
            entries = bpftool("map", "dump", "id", str(mid)) or []
            occupancy[name] = {"entries": len(entries), "max_entries": int(meta["max_entries"])}
        elif name == "counters":
            rows = bpftool("map", "dump", "id", str(mid)) or []
            sums: dict[int, int] = {}
            for e in rows:
                key = e.get("key")
                k = int(key) if isinstance(key, int) else int.from_bytes(
                    bytes(int(b, 16) for b in key), "little")
                vals = e.get("values") or []
                sums[k] = sum(_u64(v.get("value")) for v in vals)
            slots = int(meta["max_entries"]) // L.C_COUNT - 1
            for cname, cid in COUNTERS.items():
                counters[cname] = sum(sums.get(L.counter_index(s, cid), 0) for s in range(slots))
    return occupancy, counters


def _u64(v: Any) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, list):  # bytes as hex strings
        return int.from_bytes(bytes(int(b, 16) for b in v), "little")
    return 0


def prog_sample(pid: int) -> dict[str, dict[str, int]]:
    """run_cnt, run_time_ns, recursion_misses of each program acceptrace holds."""
    _, progs = bpf_objects(pid)
    out: dict[str, dict[str, int]] = {}
    for pid_ in progs:
        p = bpftool("prog", "show", "id", str(pid_))
        name = f"{p.get('name', pid_)}#{pid_}"
        out[name] = {k: int(p.get(k, 0)) for k in ("run_cnt", "run_time_ns",
                                                    "recursion_misses")}
    return out


def proc_status(pid: int) -> dict[str, int]:
    st = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            st[k] = int(v.split()[0])
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    st["cpu_ms"] = round((int(f[11]) + int(f[12])) * 1000 / os.sysconf("SC_CLK_TCK"))
    return st


# -- the soak -----------------------------------------------------------------------------

class Soak:
    def __init__(self, args: argparse.Namespace, ns: str, out_dir: Path) -> None:
        self.args = args
        self.ns = ns
        self.out_dir = out_dir
        self.samples: list[dict[str, Any]] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.t0 = 0.0
        self.k0: dict[str, int] = {}
        self.tracer: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []
        self.hits: Any = None   # synack_gap.TracepointHits, once loaded

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        p = subprocess.Popen(argv, text=True, **kw)
        self.procs.append(p)
        return p

    def start_tracer(self) -> None:
        json_path = self.out_dir / "acceptrace.json"
        argv = [sys.executable, "-m", "acceptrace", "--netns", f"/run/netns/{self.ns}",
                "--port", str(UVICORN_PORT), "--port", str(SYNQ_PORT), "--json", str(json_path),
                "--no-tui", "--interval", str(self.args.interval), "--backend", self.args.backend,
                # every minute's in-kernel cost from the programs' counters: timed all the time
                "--cost-every", "1"]
        self.tracer = self.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.tracer.stderr is not None
        for line in self.tracer.stderr:
            self.stderr.append(line)
            if "acceptrace: tracing " in line:
                break
        else:
            raise RuntimeError("acceptrace did not start:\n" + "".join(self.stderr))
        import threading  # noqa: PLC0415

        def drain() -> None:
            assert self.tracer is not None and self.tracer.stderr is not None
            for line in self.tracer.stderr:
                self.stderr.append(line)
                del self.stderr[:-200]   # bounded over an hour

        threading.Thread(target=drain, daemon=True).start()

    def sample(self, phase: str) -> dict[str, Any]:
        assert self.tracer is not None
        pid = self.tracer.pid
        occupancy, counters = map_sample(pid)
        s: dict[str, Any] = {
            "t_s": round(time.monotonic() - self.t0, 1), "phase": phase,
            **proc_status(pid), "maps": occupancy, "counters": counters,
            "programs": prog_sample(pid),
            "kernel": {k: v - self.k0.get(k, 0) for k, v in ns_counters(self.ns).items()},
            "syn_queue": syn_queue(self.ns, SYNQ_PORT),
        }
        if self.samples:
            prev = self.samples[-1]
            dt = s["t_s"] - prev["t_s"]
            conns = s["kernel"]["TcpPassiveOpens"] - prev["kernel"]["TcpPassiveOpens"]
            ns = (sum(p["run_time_ns"] for p in s["programs"].values())
                  - sum(p["run_time_ns"] for p in prev["programs"].values()))
            s["conn_per_s"] = round(conns / dt, 1) if dt > 0 else None
            s["kernel_ns_per_connection"] = round(ns / conns, 1) if conns else None
            s["kernel_cpu_pct"] = round(100 * ns / 1e9 / dt, 3) if dt > 0 else None
            s["cpu_pct"] = round((s["cpu_ms"] - prev["cpu_ms"]) / 10 / dt, 2) if dt > 0 else None
        self.samples.append(s)
        line = (f"soak: {s['t_s'] / 60:5.1f} min {phase:9s} rss {s['VmRSS'] / 1024:6.1f} MiB  "
                f"conns {s.get('conn_per_s', '-')}/s  kernel "
                f"{s.get('kernel_ns_per_connection', '-')} ns/conn  lost "
                f"{counters.get('lost_events')}  accepted {counters.get('accepted')} "
                f"(kernel {s['kernel']['TcpPassiveOpens']})  synq {s['syn_queue']}  maps "
                + " ".join(f"{k}={v['entries']}" for k, v in sorted(occupancy.items())))
        print(line, flush=True)
        return s

    def run_phase(self, phase: str, minutes: float, procs: list[subprocess.Popen[str]]) -> None:
        end = time.monotonic() + minutes * 60
        next_sample = (self.samples[-1]["t_s"] + self.t0 if self.samples else self.t0) \
            + self.args.sample_s
        while time.monotonic() < end:
            time.sleep(max(0.0, min(end, next_sample) - time.monotonic()))
            if time.monotonic() >= next_sample:
                self.sample(phase)
                next_sample += self.args.sample_s
        for p in procs:
            p.wait(timeout=120)

    def soak(self) -> dict[str, Any]:
        a = self.args
        for sysctl in ("net.ipv4.ip_local_port_range=10000 65000",):
            sh(*in_ns(self.ns, "sysctl", "-q", "-w", sysctl))
        srv = ServerProcess(port=UVICORN_PORT, backlog=4096,
                            env={"ACCEPTRACE_DEMO_BLOCK_MS": "0"}, loop="uvloop",
                            http="httptools")
        srv.argv = in_ns(self.ns, *srv.argv)
        with srv:
            deadline = time.monotonic() + 60
            while not sh(*in_ns(self.ns, "ss", "-Hltn", f"sport = :{UVICORN_PORT}")).strip():
                if time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not listen: " + srv.stderr_text())
                time.sleep(0.2)
            never = self.popen(in_ns(self.ns, sys.executable, "-c", NEVER_ACCEPTS, SERVER_IP,
                                     str(SYNQ_PORT), str(a.synq_backlog)),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert never.stdout is not None and never.stdout.readline().strip() == "ready"
            # An independent count of the tracepoint acceptrace counts SYN-ACK
            # retransmits at: the kernel's TCPSynRetrans can run ahead of it
            # (docs/performance.md, "SYN-ACK retransmits the tracepoint never saw").
            from synack_gap import TracepointHits  # noqa: PLC0415 -- BCC, root only

            self.hits = TracepointHits(os.stat(f"/run/netns/{self.ns}").st_ino)
            self.start_tracer()
            self.k0 = ns_counters(self.ns)
            self.t0 = time.monotonic()
            self.sample("start")
            secs = a.minutes * 60
            clients = [self.popen(in_ns(self.ns, sys.executable, "-c", CLIENT, str(UVICORN_PORT),
                                        str(a.rate / a.clients), str(secs)),
                                  stdout=subprocess.PIPE)
                       for _ in range(a.clients)]
            self.run_phase("uvicorn", a.minutes, clients)
            client_results = [json.loads(c.stdout.read() if c.stdout else "{}")
                              for c in clients]
            flood = self.popen(in_ns(self.ns, sys.executable, "-c", SYN_FLOOD, CLIENT_IP,
                                     SERVER_IP, str(SYNQ_PORT), str(a.synq_rate),
                                     str(a.synq_minutes * 60)), stdout=subprocess.PIPE)
            self.run_phase("syn-queue", a.synq_minutes, [flood])
            syns_sent = int((flood.stdout.read() if flood.stdout else "0").strip() or 0)
            in_synq = syn_queue(self.ns, SYNQ_PORT)
            # Close the never-accepting listener: its requests then die at their next
            # timer without another SYN-ACK, and the counters come to rest.
            assert never.stdin is not None
            never.stdin.close()
            never.wait(30)
            self.settle()
            last = self.sample("end")
            k1 = ns_counters(self.ns)
            hits = self.hits.count()
            rc = self.stop_tracer()
        run = json.loads((self.out_dir / "acceptrace.json").read_text())
        kernel = {k: k1[k] - self.k0[k] for k in KERNEL}
        return self.verdict(run, kernel, rc, client_results, syns_sent, in_synq, last, hits)

    def settle(self, quiet_s: float = 2.0, timeout: float = 60.0) -> None:
        last, since = ns_counters(self.ns), time.monotonic()
        end = since + timeout
        while time.monotonic() < end:
            time.sleep(0.2)
            now = ns_counters(self.ns)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return

    def stop_tracer(self) -> int:
        assert self.tracer is not None
        self.tracer.send_signal(signal.SIGINT)
        try:
            return self.tracer.wait(60)
        except subprocess.TimeoutExpired:
            self.tracer.kill()
            return -9

    def verdict(self, run: dict, kernel: dict[str, int], rc: int, clients: list[dict],
                syns_sent: int, in_synq: int, last: dict[str, Any],
                hits: int) -> dict[str, Any]:
        secs = [s for s in self.samples if s["phase"] != "start"]
        rss = [s["VmRSS"] for s in secs]
        # Growth after the first minute (imports, BCC, the first maps read are warm-up).
        base = rss[0] if rss else 0
        missed = {p["hook"]: p["missed"] for p in (run.get("cost") or {}).get("programs", [])}

        def short_by(*figures: str) -> int:
            """The most a figure can be short: the skipped runs of the programs feeding it."""
            return sum(m or 0 for p in (run.get("cost") or {}).get("programs", [])
                       for m in [p["missed"]] if set(p.get("feeds", [])) & set(figures))

        sections = run.get("targets") or [run]
        synack = sum(s["drops"]["synack_retransmits"] for s in sections)
        client_syn_rtx = sum(c.get("syn_retransmits", 0) for c in clients)
        client_errors = sum(sum(c.get("errors", {}).values()) for c in clients)
        synack_kernel = kernel["TcpExtTCPSynRetrans"] - client_syn_rtx
        checks: dict[str, Any] = {
            "exit_code": rc,
            "lost_events": run["drops"]["lost_events"],
            "accepted": [run["connections"]["accepted"], kernel["TcpPassiveOpens"],
                         short_by("accepted")],
            "queued": [run["connections"]["queued"], kernel["TcpPassiveOpens"],
                       short_by("queued")],
            "listen_overflow": [run["drops"]["listen_overflow"],
                                kernel["TcpExtListenOverflows"],
                                short_by("listen_overflow", "ack_dropped_acceptq_full")],
            # SYN-ACK retransmits: the times tcp:tcp_retransmit_synack fired for the
            # namespace, counted by a program of the soak's own (synack_gap.py).  The
            # namespace's TCPSynRetrans less the clients' own SYN retransmits (a dropped
            # SYN, or a SYN-ACK later than 1 s on a busy machine) is beside it: on 6.18 it
            # now and then counts a timer batch of retransmits that never reaches the
            # tracepoint -- no program's run_cnt has them -- so it can only be as high or
            # higher; a connect that failed could not be asked: up to 3 each (1, 3, 7 s).
            "synack_retransmits": [synack, hits, short_by("synack_retransmits")],
            "synack_kernel": {
                "tracepoint_hits": hits,
                "TCPSynRetrans_less_clients": synack_kernel,
                "client_slack": 3 * client_errors,
                "ahead": synack_kernel - hits},
            "client_syn_retransmits": client_syn_rtx,
            "rss_growth_kib": (rss[-1] - base) if rss else None,
            "rss_kib": [min(rss, default=0), max(rss, default=0)],
            "maps_max": {name: max(s["maps"].get(name, {}).get("entries", 0) for s in secs)
                         for name in (secs[-1]["maps"] if secs else {})},
            "maps_end": {k: v["entries"] for k, v in last["maps"].items()},
            "missed": missed,
        }
        full = {name: n for name, n in checks["maps_max"].items()
                if secs and n >= secs[-1]["maps"][name]["max_entries"]}
        checks["maps_full"] = full
        ok = (rc == 0 and checks["lost_events"] == 0 and not full
              and (checks["rss_growth_kib"] or 0) <= self.args.max_rss_growth_mib * 1024
              and all(ours is not None and kern - slack <= ours <= kern
                      for ours, kern, slack in (checks[k] for k in (
                          "accepted", "queued", "listen_overflow", "synack_retransmits")))
              and checks["synack_kernel"]["ahead"] + checks["synack_kernel"]["client_slack"]
              >= 0)
        return {
            "ok": ok,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "backend": run["meta"]["backend"],
            "kernel_release": run["meta"]["kernel"],
            "clients": clients,
            "syns_sent": syns_sent,
            "syn_queue_at_end_of_flood": in_synq,
            "kernel_counters": kernel,
            "checks": checks,
            "cost": run.get("cost"),
            "samples": self.samples,
        }


def summary(v: dict[str, Any]) -> str:
    c = v["checks"]
    s = v["samples"]
    lines = [
        f"soak: backend {v['backend']} on {v['kernel_release']}, "
        f"{v['args']['minutes']} min uvicorn at {v['args']['rate']}/s + "
        f"{v['args']['synq_minutes']} min SYN queue at {v['args']['synq_rate']} SYN/s; "
        + ("OK" if v["ok"] else "FAILED"),
        f"  clients: {sum(x.get('ok', 0) for x in v['clients'])} connections answered, errors "
        f"{[x.get('errors') for x in v['clients']]}, their SYNs sent again "
        f"{c.get('client_syn_retransmits')}; SYNs sent {v['syns_sent']}, "
        f"{v['syn_queue_at_end_of_flood']} in the SYN queue at the end of the flood",
        f"  RSS {c['rss_kib'][0] / 1024:.1f}..{c['rss_kib'][1] / 1024:.1f} MiB, "
        f"grew {c['rss_growth_kib']} KiB after the first sample; lost events {c['lost_events']}",
    ]
    for k in ("accepted", "queued", "listen_overflow", "synack_retransmits"):
        ours, kern, slack = c[k]
        lines.append(f"  {k}: acceptrace {ours}, "
                     + ("tracepoint" if k == "synack_retransmits" else "kernel") + f" {kern}"
                     + (f" (at most {slack} short: runs the kernel skipped)" if slack else ""))
    sk = c["synack_kernel"]
    lines.append(f"    the namespace's TCPSynRetrans less the clients' SYN retransmits: "
                 f"{sk['TCPSynRetrans_less_clients']}"
                 + (f", {sk['ahead']} retransmitted without the tracepoint firing"
                    if sk["ahead"] else ""))
    lines.append("  maps (max entries over the samples): "
                 + ", ".join(f"{k} {n}" for k, n in sorted(c["maps_max"].items()))
                 + (f"; FULL: {c['maps_full']}" if c["maps_full"] else ""))
    lines.append("  RSS per sample (MiB): " + " ".join(
        f"{x['VmRSS'] / 1024:.1f}" for x in s))
    cost = v.get("cost") or {}
    lines.append(f"  cost: {cost.get('kernel_ns_per_connection')} ns in the kernel per "
                 f"connection, {cost.get('kernel_cpu_pct')} % of a CPU in the kernel, "
                 f"{cost.get('user_cpu_pct')} % in acceptrace, peak RSS "
                 f"{cost.get('peak_rss_kib')} KiB, skipped runs {cost.get('missed')}")
    per_min = [x.get("kernel_ns_per_connection") for x in s if x["phase"] == "uvicorn"]
    per_min = [x for x in per_min if x is not None]
    if per_min:
        lines.append(f"  kernel ns/connection per sample (uvicorn phase): min {min(per_min)}, "
                     f"max {max(per_min)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--minutes", type=float, default=60.0, help="the uvicorn phase")
    ap.add_argument("--synq-minutes", type=float, default=10.0, help="the SYN-queue phase")
    ap.add_argument("--rate", type=float, default=1000.0, help="connections/s to uvicorn")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--synq-rate", type=float, default=200.0, help="SYNs/s in the SYN phase")
    ap.add_argument("--synq-backlog", type=int, default=4096)
    ap.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--interval", type=float, default=1.0, help="acceptrace --interval")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-rss-growth-mib", type=float, default=8.0,
                    help="RSS growth after the first sample that still counts as flat")
    ap.add_argument("--out", type=Path, help="write every sample and the verdict here (JSON)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM (a test's timeout) unwinds like Ctrl-C: the namespace, the server, the
    # clients and acceptrace are removed on the way out
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="acceptrace-soak-") as tmp, namespace() as ns:
        soak = Soak(args, ns, Path(tmp))
        try:
            v = soak.soak()
        finally:
            for p in soak.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if soak.hits is not None:
                soak.hits.close()
    if args.out:
        args.out.write_text(json.dumps(v, indent=1) + "\n")
    print(summary(v))
    return 0 if v["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
