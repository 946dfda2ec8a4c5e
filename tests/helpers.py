"""Shared helpers of the root tests: running the CLI, counting our BPF programs,
a listening socket, a raw SYN.

Test files import these from here (``from helpers import ...``), never from one
another; pytest puts tests/ on sys.path for them, as for ``from conftest import``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys

ACCEPTRACE = [sys.executable, "-m", "acceptrace"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [*(prefix or []), *ACCEPTRACE, *args], capture_output=True, text=True,
        env=full_env, timeout=timeout,
    )


def bpf_progs() -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return list(json.loads(out or "[]"))


def bpf_prog_names() -> list[str]:
    return [p.get("name", "") for p in bpf_progs()]


def held_by_other_tracers() -> set[int]:
    """The ids of the BPF programs that other acceptrace processes running now hold (their
    fds' fdinfo says prog_id) -- not this test's own children: a developer's run beside
    the tests is not a leak of ours."""
    ids: set[int] = set()
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            if not any(a.endswith(b"acceptrace") for a in argv):
                continue
            ppid = int(open(f"/proc/{d}/stat").read().rpartition(")")[2].split()[1])
            if ppid == me:
                continue
            for fd in os.listdir(f"/proc/{d}/fdinfo"):
                for line in open(f"/proc/{d}/fdinfo/{fd}"):
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


# BCC names (truncated to 15 characters by the kernel): the tracepoint programs,
# the fentry/fexit ones (kfunc__/kretfunc__) and the kprobe ones (kp_/kr_).
OUR_PROGS = ("tracepoint__soc", "tracepoint__sys", "tracepoint__tcp", "tracepoint__skb",
             "raw_tracepoint_", "kfunc__", "kretfunc__", "kp_", "kr_")


def ours_attached() -> int:
    """acceptrace's programs loaded now, but those another acceptrace process holds."""
    others = held_by_other_tracers()
    return sum(1 for p in bpf_progs()
               if p.get("name", "").startswith(OUR_PROGS) and p.get("id") not in others)


def listener(backlog: int, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    s.listen(backlog)
    return s


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 TCP SYN with an MSS option (the IP checksum and length: the kernel's)."""
    seq = random.getrandbits(32)
    opts = struct.pack("!BBH", 2, 4, 1460)
    offset = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, offset << 4, 0x02, 64240, 0, 0) + opts
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


class ScratchNamespace:
    """``with ScratchNamespace() as name:`` a network namespace of the test's own (loopback
    up), removed afterwards with every process in it -- also when the test fails."""

    def __init__(self, prefix: str = "at-test") -> None:
        self.name = f"{prefix}-{os.urandom(4).hex()}"

    def __enter__(self) -> str:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        return self.name

    def __exit__(self, *exc: object) -> None:
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
