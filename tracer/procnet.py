"""The kernel's own view of the network namespace: /proc/net and sock_diag.

These are the ground truth acceptrace puts beside what its BPF programs saw,
all per network namespace (acceptrace's own) and readable without root:

* listening sockets: /proc/net/tcp and /proc/net/tcp6, lines in state ``0A``
  (TCP_LISTEN); local address ``HEX:PORT`` (IPv4 one little-endian word,
  IPv6 four host-order words), the socket inode in column 10;
* the SNMP/MIB counters: /proc/net/netstat and /proc/net/snmp, pairs of lines
  ``Prefix: Name...`` / ``Prefix: value...``, flattened the way ``nstat``
  names them (``TcpExtListenOverflows``, ``TcpPassiveOpens``);
* each listener's drop counter, accept-queue depth and backlog limit: a
  NETLINK_SOCK_DIAG ``inet_diag`` dump of TCP_LISTEN sockets per family with
  the INET_DIAG_SKMEMINFO extension.  For a listener the kernel reports
  ``idiag_rqueue = sk_ack_backlog`` (depth now) and ``idiag_wqueue =
  sk_max_ack_backlog`` (the limit: min(listen() backlog, somaxconn)),
  ``idiag_inode`` the socket inode, and ``SK_MEMINFO_DROPS`` (index 8 of the
  u32 array) the socket's ``sk_drops``, which ``tcp_listendrop()`` bumps for
  every SYN or final ACK dropped at a full queue.  ``ss -ltnme`` shows the
  same numbers (Recv-Q, Send-Q, ``ino:``, ``skmem:(...,d<N>)``); it is used
  only if the netlink socket cannot be opened.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = 10
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


def somaxconn(path: Path = Path("/proc/sys/net/core/somaxconn")) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# The network namespace's sysctls that change what the accept path does when a queue is
# full (the diagnosis names them; meta.sysctls).  net.core.somaxconn has its own field.
ACCEPT_SYSCTLS = ("net.ipv4.tcp_abort_on_overflow", "net.ipv4.tcp_syncookies",
                  "net.ipv4.tcp_max_syn_backlog")


def accept_sysctls(root: Path = Path("/proc/sys")) -> dict[str, int]:
    """ACCEPT_SYSCTLS of the reading thread's network namespace; unreadable ones left out."""
    out: dict[str, int] = {}
    for name in ACCEPT_SYSCTLS:
        try:
            out[name] = int((root / name.replace(".", "/")).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


# --- /proc/net/tcp{,6} ------------------------------------------------------------------------

def _parse_hex_addr(hexaddr: str, family: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if family == "ipv4":
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc prints the IPv6 address as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def listening_sockets(port: int | None, *,
                      proc: dict[str, Path] | None = None) -> list[ListenSocket]:
    """TCP sockets in LISTEN on ``port`` (None: on any port) in this network namespace."""
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
            if port is not None and int(hport, 16) != port:
                continue
            out.append(ListenSocket(family, _parse_hex_addr(addr, family), int(hport, 16),
                                    int(f[9])))
    return out


# --- /proc/net/netstat and /proc/net/snmp ----------------------------------------------------

def parse_netstat(texts: Iterable[str]) -> dict[str, int]:
    """Flat ``PrefixName -> value`` (nstat's names) from netstat/snmp files' text."""
    out: dict[str, int] = {}
    for text in texts:
        header: tuple[str, list[str]] | None = None
        for line in text.splitlines():
            prefix, sep, rest = line.partition(":")
            if not sep:
                header = None
                continue
            fields = rest.split()
            if header is None or header[0] != prefix:
                header = (prefix, fields)  # a names line; its values line follows
                continue
            for name, val in zip(header[1], fields):
                try:
                    out[prefix + name] = int(val)
                except ValueError:
                    continue
            header = None
    return out


def net_netstat(files: Iterable[Path] = NETSTAT_FILES) -> dict[str, int]:
    """The namespace's TCP/IP counters, e.g. ``TcpExtListenOverflows``, ``TcpPassiveOpens``."""
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


# --- NETLINK_SOCK_DIAG ------------------------------------------------------------------------

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
INET_DIAG_SKMEMINFO = 7  # enum position: NONE MEMINFO INFO VEGASINFO CONG TOS TCLASS SKMEMINFO
SK_MEMINFO_DROPS = 8
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid
# (sport, dport big-endian; src[16], dst[16]; if; cookie[2]).
_REQ_V2 = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_REST = struct.Struct("=III")  # if, cookie[2]
# inet_diag_msg: family, state, timer, retrans; sockid; expires, rqueue, wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_LEN = _MSG_HEAD.size + _SOCKID.size + _SOCKID_REST.size + _MSG_TAIL.size  # 72
_RTA = struct.Struct("=HH")
_FAMILIES = ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6"))


def _align4(n: int) -> int:
    return (n + 3) & ~3


def inet_diag_request(family: int, seq: int = 1, states: int = 1 << TCP_LISTEN) -> bytes:
    """A dump request for sockets of ``family`` in ``states`` (TCP_LISTEN), with SKMEMINFO."""
    body = (
        _REQ_V2.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), states)
        + _SOCKID.pack(0, 0, bytes(16), bytes(16))
        + _SOCKID_REST.pack(0, 0xFFFFFFFF, 0xFFFFFFFF)  # INET_DIAG_NOCOOKIE
    )
    hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                         NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return hdr + body


def parse_inet_diag(data: bytes) -> tuple[list[ListenerStats], bool]:
    """Listeners in one datagram of netlink messages, and whether NLMSG_DONE was seen."""
    out: list[ListenerStats] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise OSError("sock_diag: truncated netlink message")
        body = data[off + _NLMSGHDR.size : off + length]
        off += _align4(length)
        if mtype == NLMSG_DONE:
            return out, True
        if mtype == NLMSG_ERROR:
            errno = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            if errno == 0:
                continue
            raise OSError(errno, f"sock_diag: {os.strerror(errno)}")
        if mtype != SOCK_DIAG_BY_FAMILY or len(body) < _MSG_LEN:
            continue
        fam, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, 0)
        sport, _dport, src, _dst = _SOCKID.unpack_from(body, _MSG_HEAD.size)
        _exp, rqueue, wqueue, _uid, inode = _MSG_TAIL.unpack_from(
            body, _MSG_HEAD.size + _SOCKID.size + _SOCKID_REST.size)
        drops = 0
        aoff = _MSG_LEN
        while aoff + _RTA.size <= len(body):
            alen, atype = _RTA.unpack_from(body, aoff)
            atype &= 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
            if alen < _RTA.size:
                break
            if atype == INET_DIAG_SKMEMINFO and alen >= _RTA.size + 4 * (SK_MEMINFO_DROPS + 1):
                drops = struct.unpack_from("=I", body, aoff + _RTA.size + 4 * SK_MEMINFO_DROPS)[0]
            aoff += _align4(alen)
        if state != TCP_LISTEN:
            continue
        if fam == socket.AF_INET:
            family, addr = "ipv4", str(ipaddress.IPv4Address(src[:4]))
        else:
            family, addr = "ipv6", str(ipaddress.IPv6Address(src))
        out.append(ListenerStats(family, addr, sport, inode, drops, rqueue, wqueue))
    return out, False


def sock_diag_listeners(port: int | None = None, *, timeout_s: float = 2.0) -> list[ListenerStats]:
    """TCP listeners (of ``port``, or all) over NETLINK_SOCK_DIAG; OSError if it fails."""
    out: list[ListenerStats] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout_s)
        for seq, (family, _name) in enumerate(_FAMILIES, 1):
            nl.sendall(inet_diag_request(family, seq))
            for _ in range(100_000):  # one datagram each; a dump ends with NLMSG_DONE
                listeners, done = parse_inet_diag(nl.recv(1 << 16))
                out.extend(s for s in listeners if port is None or s.port == port)
                if done:
                    break
            else:
                raise OSError("sock_diag: dump did not end")
    return out


# Request sockets (the SYN queue): `ss -tn state syn-recv`.  A request waiting for its
# final ACK is a TCP_NEW_SYN_RECV mini socket in the established hash; inet_diag lists
# it (as SYN_RECV) when either state is asked for.
TCP_SYN_RECV, TCP_NEW_SYN_RECV = 3, 12
SYN_RECV_STATES = (1 << TCP_SYN_RECV) | (1 << TCP_NEW_SYN_RECV)


def parse_request_ports(data: bytes) -> tuple[list[int], bool]:
    """The local port of each SYN_RECV socket in one datagram, and whether the dump ended."""
    out: list[int] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise OSError("sock_diag: truncated netlink message")
        body = data[off + _NLMSGHDR.size : off + length]
        off += _align4(length)
        if mtype == NLMSG_DONE:
            return out, True
        if mtype == NLMSG_ERROR:
            errno = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            if errno == 0:
                continue
            raise OSError(errno, f"sock_diag: {os.strerror(errno)}")
        if mtype != SOCK_DIAG_BY_FAMILY or len(body) < _MSG_LEN:
            continue
        _fam, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, 0)
        if state in (TCP_SYN_RECV, TCP_NEW_SYN_RECV):
            out.append(_SOCKID.unpack_from(body, _MSG_HEAD.size)[0])
    return out, False


def syn_queue_lengths(*, timeout_s: float = 2.0) -> dict[int, int]:
    """Local port -> request sockets waiting for their final ACK (both families), in
    this network namespace: each listener's SYN queue, added up per port.  The kernel
    walks its whole established hash for it (one dump per call)."""
    out: dict[int, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout_s)
        for seq, (family, _name) in enumerate(_FAMILIES, 1):
            nl.sendall(inet_diag_request(family, seq, SYN_RECV_STATES))
            for _ in range(100_000):
                ports, done = parse_request_ports(nl.recv(1 << 16))
                for p in ports:
                    out[p] = out.get(p, 0) + 1
                if done:
                    break
            else:
                raise OSError("sock_diag: dump did not end")
    return out


# --- ss (fallback) ----------------------------------------------------------------------------

_SS_LINE = re.compile(
    r"^LISTEN\s+(?P<recvq>\d+)\s+(?P<sendq>\d+)\s+(?P<local>\S+)\s+\S+(?P<rest>.*)$"
)
_SS_INO = re.compile(r"\bino:(\d+)")
_SS_DROPS = re.compile(r"skmem:\([^)]*\bd(\d+)\)")


def parse_ss_listeners(text: str) -> dict[int, ListenerStats]:
    """Parse ``ss -H -ltnme`` output (a socket line, then a tab-indented skmem line)::

        LISTEN 2      1      127.0.0.1:54629 0.0.0.0:* ino:17813305 sk:1083 cgroup:/ <->
        \\t skmem:(r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d16)
        LISTEN 2      1      [::1]:44799 [::]:* ino:17813306 sk:1084 cgroup:/ v6only:1 <->
    """
    out: dict[int, ListenerStats] = {}
    current: dict[str, object] | None = None
    for line in text.splitlines():
        m = _SS_LINE.match(line)
        if m:
            addr, _, port = m.group("local").rpartition(":")
            family = "ipv6" if addr.startswith("[") else "ipv4"
            addr = addr.strip("[]").split("%", 1)[0]
            if addr == "*":
                addr = "0.0.0.0"
            ino = _SS_INO.search(m.group("rest"))
            current = {
                "family": family, "address": addr, "port": int(port),
                "inode": int(ino.group(1)) if ino else 0,
                "recv_q": int(m.group("recvq")), "send_q": int(m.group("sendq")),
            }
        d = _SS_DROPS.search(line)
        if d and current is not None:
            st = ListenerStats(drops=int(d.group(1)), **current)  # type: ignore[arg-type]
            out[st.inode] = st
            current = None
    return out


def _ss_listeners(port: int | None) -> dict[int, ListenerStats]:
    flt = [f"sport = :{int(port)}"] if port is not None else []
    try:
        res = subprocess.run(
            ["ss", "-H", "-ltnme", *flt],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_ss_listeners(res.stdout)


def listener_drops(port: int | None) -> dict[int, ListenerStats]:
    """The port's listeners (every TCP listener: None) by socket inode: sk_drops,
    accept-queue depth and backlog limit.

    From NETLINK_SOCK_DIAG; from ``ss`` only if netlink fails; ``{}`` if both do.
    """
    try:
        return {s.inode: s for s in sock_diag_listeners(port)}
    except OSError:
        return _ss_listeners(port)


def in_virtual_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """The CPU says it runs under a hypervisor (the ``hypervisor`` flag, x86): run-time
    figures then include the hypervisor's overhead (many times over under QEMU's TCG)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return "hypervisor" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def own_cpu_and_rss() -> tuple[float, int]:
    """This process's CPU seconds (user + system, all threads) and its peak RSS in KiB."""
    import resource  # noqa: PLC0415 - Unix only, as everything here

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, int(ru.ru_maxrss)
