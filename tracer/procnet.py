"""The kernel's own view of the network namespace: /proc/net and ss.

These are the ground truth acceptrace puts beside what its BPF programs saw:
listening sockets (/proc/net/tcp{,6}), the SNMP/netstat counters, and each
listener's drop counter, accept-queue depth and backlog limit (from ``ss``,
which reads them over sock_diag: ``skmem:(...,d<sk_drops>)``, Recv-Q and
Send-Q of a LISTEN socket).  All are per network namespace: acceptrace's own.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN_HEX = "0A"
PROC_TCP = {"ipv4": Path("/proc/net/tcp"), "ipv6": Path("/proc/net/tcp6")}
NETSTAT_FILES = (Path("/proc/net/netstat"), Path("/proc/net/snmp"))


@dataclass(frozen=True)
class ListenSocket:
    family: str  # "ipv4" | "ipv6"
    address: str
    port: int
    inode: int


@dataclass(frozen=True)
class ListenerStats:
    family: str
    address: str
    port: int
    inode: int
    drops: int   # the listener's sk_drops
    recv_q: int  # accept-queue depth now (sk_ack_backlog)
    send_q: int  # backlog limit (sk_max_ack_backlog)

    @property
    def backlog(self) -> int:
        return self.send_q


def _parse_hex_addr(hexaddr: str, family: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if family == "ipv4":
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc prints the IPv6 address as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def somaxconn(path: Path = Path("/proc/sys/net/core/somaxconn")) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def listening_sockets(port: int, *, proc: dict[str, Path] | None = None) -> list[ListenSocket]:
    """TCP sockets in LISTEN on ``port`` in this network namespace."""
    out = []
    for family, path in (proc or PROC_TCP).items():
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != TCP_LISTEN_HEX:
                continue
            addr, _, hport = f[1].rpartition(":")
            if int(hport, 16) != port:
                continue
            out.append(ListenSocket(family, _parse_hex_addr(addr, family), port, int(f[9])))
    return out


def parse_netstat(texts: Iterable[str]) -> dict[str, int]:
    """Flat ``PrefixName -> value`` (nstat's names) from netstat/snmp files' text."""
    out: dict[str, int] = {}
    for text in texts:
        lines = text.splitlines()
        for header, values in zip(lines[::2], lines[1::2]):
            prefix, _, names = header.partition(":")
            vprefix, _, vals = values.partition(":")
            if prefix != vprefix:
                continue
            for name, val in zip(names.split(), vals.split()):
                try:
                    out[prefix + name] = int(val)
                except ValueError:
                    continue
    return out


def net_netstat(files: Iterable[Path] = NETSTAT_FILES) -> dict[str, int]:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text())
        except OSError:
            continue
    return parse_netstat(texts)


def counter_deltas(
    before: dict[str, int], after: dict[str, int], names: Iterable[str]
) -> dict[str, int]:
    """``after - before`` for the named counters present in both."""
    return {n: after[n] - before[n] for n in names if n in before and n in after}


_SS_LINE = re.compile(
    r"^LISTEN\s+(?P<recvq>\d+)\s+(?P<sendq>\d+)\s+(?P<local>\S+)\s+\S+(?P<rest>.*)$"
)
_SS_INO = re.compile(r"\bino:(\d+)")
_SS_DROPS = re.compile(r"skmem:\([^)]*\bd(\d+)\)")


def parse_ss_listeners(text: str) -> dict[int, ListenerStats]:
    """Parse ``ss -H -ltnme`` output (a socket line, then a tab-indented skmem line)."""
    out: dict[int, ListenerStats] = {}
    current: dict | None = None
    for line in text.splitlines():
        m = _SS_LINE.match(line)
        if m:
            local = m.group("local")
            addr, _, port = local.rpartition(":")
            family = "ipv6" if addr.startswith("[") else "ipv4"
            addr = addr.strip("[]")
            if "%" in addr:
                addr = addr.split("%", 1)[0]
            if addr == "*":
                addr = "0.0.0.0"
            ino = _SS_INO.search(m.group("rest"))
            current = {
                "family": family, "address": addr, "port": int(port),
                "inode": int(ino.group(1)) if ino else 0,
                "recv_q": int(m.group("recvq")), "send_q": int(m.group("sendq")),
            }
            drops = _SS_DROPS.search(line)
            if drops:
                out[current["inode"]] = ListenerStats(drops=int(drops.group(1)), **current)
                current = None
            continue
        d = _SS_DROPS.search(line)
        if d and current is not None:
            out[current["inode"]] = ListenerStats(drops=int(d.group(1)), **current)
            current = None
    return out


def listener_drops(port: int) -> dict[int, ListenerStats]:
    """The port's listeners by socket inode, with sk_drops, depth and backlog (via ss)."""
    try:
        res = subprocess.run(
            ["ss", "-H", "-ltnme", f"sport = :{int(port)}"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_ss_listeners(res.stdout)
