"""Loading and reading the BPF programs: the only module that imports bcc."""

from __future__ import annotations

import ctypes as ct
import importlib.resources
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from . import layout as L
from .backend import ConnRecord, KernelSnapshot, ListenerSnapshot, ProcSnapshot
from .bootmemo import BootMemo
from .errors import UserError
from .hist import NBUCKETS, Histogram
from .kernel import cflags, kprobes_available, stages_fed_by
from .servers import DispatchTarget

_bcc: Any = None

COUNTER_NAMES: dict[int, str] = {
    L.C_QUEUED: "queued",
    L.C_SYN_TIMED: "syn_timed",
    L.C_SYNCOOKIE: "syncookies",
    L.C_ACCEPTED: "accepted",
    L.C_READ: "read",
    L.C_SYNACK_RETRANS: "synack_retransmits",
    L.C_ACK_OVERFLOW: "ack_overflow",
    L.C_LOST_EVENTS: "lost_events",
    L.C_ACCEPT_UNTRACKED: "accept_untracked",
    L.C_QUEUE_MISSED: "queue_missed",
    L.C_DISPATCHED: "dispatched",
    L.C_REQUESTS: "requests",
    L.C_RESPONDED: "responded",
    L.C_SYNS: "syns",
    L.C_SYN_DROPPED_ACCEPTQ: "syn_dropped_acceptq_full",
    L.C_SYN_DROPPED_SYNQ: "syn_dropped_synq_full",
    L.C_SYNCOOKIES_SENT: "syncookies_sent",
    L.C_LISTEN_DROPS_OTHER: "listen_drops_other",
    L.C_SYN_RETRIED: "syn_retried",
    L.C_ACCEPT_EARLY: "accept_early",
    L.C_SOFTIRQ_BUSY: "softirqs_busy",
    L.C_PACKETS_UNSEEN: "packets_unseen",
}
HIST_NAMES: dict[int, tuple[str, str, int]] = {
    L.H_HANDSHAKE: ("handshake", "us", 1000),
    L.H_ACCEPT_QUEUE: ("accept_queue", "us", 1000),
    L.H_SYN_TO_ACCEPT: ("syn_to_accept", "us", 1000),
    L.H_ACCEPT_TO_READ: ("accept_to_read", "us", 1000),
    L.H_ACCEPTQ_DEPTH: ("accept_queue_depth", "connections", 1),
    L.H_SYNQ_DEPTH: ("syn_queue_depth", "connections", 1),
}
DISPATCH_HIST_NAMES: dict[int, tuple[str, str, int]] = {
    L.H_ACCEPT_TO_DISPATCH: ("accept_to_dispatch", "us", 1000),
    L.H_READ_TO_DISPATCH: ("read_to_dispatch", "us", 1000),
    L.H_SYN_TO_DISPATCH: ("syn_to_dispatch", "us", 1000),
    L.H_DISPATCH_TO_RESPONSE: ("dispatch_to_response", "us", 1000),
}
TRACEPOINT_HOOKS = [
    "tracepoint:sock:sk_data_ready",
    "tracepoint:sock:inet_sock_set_state",
    "tracepoint:syscalls:sys_exit_accept4",
    "tracepoint:syscalls:sys_exit_accept",
    "tracepoint:sock:sock_recv_length",
    "tracepoint:tcp:tcp_retransmit_synack",
]


def import_bcc() -> Any:
    """Import BCC's Python module or raise a UserError saying how to get it."""
    global _bcc
    if _bcc is None:
        try:
            import bcc  # noqa: PLC0415 - the one place bcc is imported
        except ImportError as exc:
            raise UserError(
                "BCC's Python module is not importable "
                f"({exc}); install Debian's python3-bpfcc and run acceptrace with "
                "/usr/bin/python3 or a venv made with --system-site-packages (make setup)"
            ) from exc
        _bcc = bcc
    return _bcc


def bcc_version() -> str | None:
    try:
        return str(import_bcc().__version__)
    except UserError:
        return None


class _CaptureFd2:
    """Send fd 2 (where libbcc prints compiler diagnostics) to a temp file."""

    def __enter__(self) -> _CaptureFd2:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self.file = tempfile.TemporaryFile(mode="w+")
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)

    def first_error(self) -> str | None:
        self.file.seek(0)
        lines = [ln.strip() for ln in self.file.read().splitlines() if "error" in ln.lower()]
        return lines[0] if lines else None


def _compile(src_name: str, flags: list[str]) -> Any:
    """Compile bpf/<src_name> (shipped in the package) with BCC and load it."""
    bcc = import_bcc()
    res = importlib.resources.files("acceptrace.bpf")
    with importlib.resources.as_file(res / src_name) as src, _CaptureFd2() as cap:
        src_path = Path(src)
        try:
            return bcc.BPF(src_file=str(src_path).encode(), cflags=[f"-I{src_path.parent}", *flags])
        except Exception as exc:  # bcc raises plain Exception
            detail = cap.first_error() or str(exc)
    if "super-user" in detail and os.geteuid() == 0:
        # BCC's wording for EPERM; as root that is a policy, not a missing privilege.
        detail = ("EPERM although running as root: a kernel security policy (lockdown, an "
                  "LSM) refuses this program type")
    raise UserError(f"BPF program {src_name} failed to load: {detail}")


BPF_SOURCE = "acceptrace.bpf.c"


class _BccBackend:
    """One compiled bpf/acceptrace.bpf.c with this backend's hooks (-DAT_BACKEND_*)."""

    name = ""
    exact_drops = False  # the drop counters come from the decision points

    def __init__(
        self,
        port: int,
        defines: dict[str, int],
        *,
        ack_overflow_observable: bool = False,
        conn_max: int = 65536,
        ringbuf_pages: int = 64,
        notes: list[str] | None = None,
        dispatch: bool = False,
        missing_stages: set[str] | None = None,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        all_defines = dict(defines)
        all_defines.update(
            {"AT_PORT": port, "AT_CONN_MAX": conn_max, "AT_RINGBUF_PAGES": ringbuf_pages,
             f"AT_BACKEND_{self.name.upper()}": 1}
        )
        if dispatch:
            all_defines["AT_DISPATCH"] = 1
        self.port = port
        self.dispatch = dispatch
        self.dispatch_targets: list[DispatchTarget] = []
        self.notes = list(notes or [])
        self.ack_overflow_observable = ack_overflow_observable
        self.missing_stages: set[str] = set(missing_stages or ())
        self.hooks: list[str] = []
        self.defines = all_defines
        self._pending: list[ConnRecord] = []
        self._ncpu = len(import_bcc().utils.get_online_cpus())
        self.bpf: Any = cast(Any, None)  # the BCC object once loaded (cast: not narrowed)
        # Whether the blind-spot counters are compiled in (and attached, by BCC,
        # when the program loads); known once _load() has settled the defines.
        self.busy_counted = False
        self.unseen_counted = False
        try:
            self._load()
            self.busy_counted = "AT_KSYM_BPF_PROG_ACTIVE" in self.defines
            # ...and the port's packets in them, where kprobes feed the drop counters
            self.unseen_counted = self.busy_counted and (
                "AT_BACKEND_KPROBE" in self.defines or "AT_KPROBE_SYN_RECV" in self.defines)
            if self.busy_counted:
                self.hooks.append("raw_tracepoint:softirq_entry")
            if self.unseen_counted:
                self.hooks += ["raw_tracepoint:softirq_exit", "raw_tracepoint:netif_receive_skb"]
            self._hists = self.bpf.get_table("hists")
            self._counters = self.bpf.get_table("counters")
            self._procs = self.bpf.get_table("procs")
            self._listeners = self.bpf.get_table("listeners")
            self._sample_min = self.bpf.get_table("sample_min")
            self.bpf["samples"].open_ring_buffer(self._on_sample)
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        """Compile and load the program (BCC attaches its tracepoints/fentry), then attach."""
        self.bpf = _compile(BPF_SOURCE, cflags(self.defines))
        self._attach()

    def _attach(self) -> None:
        """Attach what BCC does not attach by itself; fill self.hooks."""
        raise NotImplementedError

    # -- ring buffer -------------------------------------------------------------
    def _on_sample(self, _ctx: Any, data: Any, _size: int) -> None:
        s = ct.cast(data, ct.POINTER(L.AtSample)).contents
        c = s.conn

        def ts(v: int) -> int | None:
            return int(v) or None

        syn_seen = bool(c.flags & L.CONN_SYN_SEEN)
        self._pending.append(
            ConnRecord(
                family=int(c.family),
                saddr=L.format_addr(c.family, bytes(c.saddr)),
                sport=int(c.sport),
                daddr=L.format_addr(c.family, bytes(c.daddr)),
                dport=int(c.dport),
                pid=int(c.pid) or None,
                comm=c.comm.decode(errors="replace") or None,
                syncookie=bool(c.syncookie),
                synack_retransmits=int(c.synack_retrans),
                syn_ns=ts(c.syn_ns),
                queued_ns=ts(c.queued_ns),
                accepted_ns=ts(c.accepted_ns),
                first_read_ns=ts(c.first_read_ns),
                dispatch_ns=ts(c.dispatch_ns),
                response_ns=ts(c.response_ns),
                requests=int(c.requests),
                syn_ok_ns=ts(c.syn_ok_ns),
                syn_retransmits=int(c.syn_retrans) if syn_seen else None,
            )
        )

    def poll(self, timeout_ms: int) -> list[ConnRecord]:
        self.bpf.ring_buffer_poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def attach_dispatch(self, target: DispatchTarget) -> None:
        """A uprobe on the server's HTTP parser; every process mapping the file is covered
        (BCC maps the symbol's address to its file offset through the ELF load segments)."""
        if not self.dispatch or target in self.dispatch_targets:
            return
        self.bpf.attach_uprobe(name=target.path.encode(), addr=target.vaddr,
                               fn_name=b"on_dispatch")
        self.dispatch_targets.append(target)
        self.hooks.append(f"uprobe:{target.path}:{target.symbol}")

    def set_server_pids(self, pids: list[int]) -> None:
        if not self.dispatch:
            return
        table = self.bpf.get_table("server_pids")
        keep = {int(p) for p in pids}
        for k in list(table.keys()):
            if int(k.value) not in keep:
                del table[k]
        for pid in keep:
            table[ct.c_uint32(pid)] = ct.c_uint8(1)

    def set_sample_threshold(self, total_ns: int) -> None:
        self._sample_min[ct.c_int(0)] = ct.c_uint64(max(0, int(total_ns)))

    # -- maps ------------------------------------------------------------------------
    def _read_hist(self, hid: int, unit: str, scale: int) -> Histogram:
        percpu = self._hists[ct.c_int(hid)]
        count = total = 0
        lo: int | None = None
        hi = 0
        buckets = [0] * NBUCKETS
        for h in percpu:
            if not h.count:
                continue
            count += h.count
            total += h.sum
            lo = h.min if lo is None else min(lo, h.min)
            hi = max(hi, h.max)
            hb = h.buckets
            for i in range(NBUCKETS):
                if hb[i]:
                    buckets[i] += hb[i]
        return Histogram.from_kernel(unit, count, total, lo or 0, hi, buckets, scale)

    def snapshot(self) -> KernelSnapshot:
        snap = KernelSnapshot()
        hists = dict(HIST_NAMES)
        if self.dispatch:
            hists.update(DISPATCH_HIST_NAMES)
        for hid, (name, unit, scale) in hists.items():
            snap.hists[name] = self._read_hist(hid, unit, scale)
        for cid, name in COUNTER_NAMES.items():
            snap.counters[name] = int(sum(self._counters[ct.c_int(cid)]))
        for k, v in self._procs.items():
            snap.procs.append(
                ProcSnapshot(int(k.value), v.comm.decode(errors="replace"), int(v.accepted))
            )
        for k, v in self._listeners.items():
            snap.listeners.append(
                ListenerSnapshot(
                    int(k.value), int(v.family), int(v.port), int(v.max_backlog), int(v.max_depth)
                )
            )
        return snap

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            bpf.cleanup()
            self.bpf = None


class TracepointBackend(_BccBackend):
    """Tracepoints only (Linux 6.3+): works where kprobes and fentry cannot be loaded."""

    name = "tracepoint"

    def _attach(self) -> None:
        # BCC attached every TRACEPOINT_PROBE when it loaded the program.
        self.hooks = list(TRACEPOINT_HOOKS)
        if self.ack_overflow_observable:
            self.hooks.append("tracepoint:skb:kfree_skb")
        if self.dispatch:
            self.hooks.append("tracepoint:sock:sock_send_length")


FUNC_TRACEPOINT_HOOKS = ["tracepoint:sock:inet_sock_set_state",
                         "tracepoint:tcp:tcp_retransmit_synack"]

# define (None: always compiled) -> the fentry programs BCC loads for it.
FENTRY_PROGRAMS: list[tuple[str | None, list[str]]] = [
    (None, ["fentry:tcp_conn_request", "fexit:tcp_conn_request",
            "fentry:inet_csk_complete_hashdance", "fexit:inet_csk_complete_hashdance"]),
    ("AT_HAVE_REQSK_QUEUE_ADD", ["fentry:inet_csk_reqsk_queue_add",
                                 "fexit:inet_csk_reqsk_queue_add"]),
    ("AT_HAVE_COOKIE_V4_INIT_SEQUENCE", ["fentry:cookie_v4_init_sequence"]),
    ("AT_HAVE_COOKIE_V6_INIT_SEQUENCE", ["fentry:cookie_v6_init_sequence"]),
    ("AT_HAVE_REQSK_HASH_ADD", ["fentry:inet_csk_reqsk_queue_hash_add"]),
    ("AT_HAVE_INET_CSK_ACCEPT", ["fexit:inet_csk_accept"]),
    ("AT_HAVE_TCP_RECVMSG", ["fexit:tcp_recvmsg"]),
]
SYN_RECV = [("tcp_v4_syn_recv_sock", "AT_HAVE_TCP_V4_SYN_RECV_SOCK", "kp_tcp_v4_syn_recv_sock",
             "kr_tcp_v4_syn_recv_sock"),
            ("tcp_v6_syn_recv_sock", "AT_HAVE_TCP_V6_SYN_RECV_SOCK", "kp_tcp_v6_syn_recv_sock",
             "kr_tcp_v6_syn_recv_sock")]


class FentryBackend(_BccBackend):
    """fentry/fexit on the accept path's kernel functions (BPF trampolines)."""

    name = "fentry"
    exact_drops = True

    def _load(self) -> None:
        # tcp_v{4,6}_syn_recv_sock takes 7 arguments since a 2026 stable backport;
        # x86 trampolines carried at most 6 before Linux 6.5.  Try, then fall back to
        # kretprobes for just those two (or to not counting final-ACK drops).
        # A kernel policy that refused fentry programs once refuses them until reboot:
        # --backend auto then falls back without compiling this source again.
        policy = BootMemo("fentry-refused")
        if (why := policy.get()) is not None:
            raise UserError(why + " (remembered since an earlier start in this boot)")
        has_syn_recv = any(define in self.defines for _f, define, _e, _r in SYN_RECV)
        refused = BootMemo("fexit-syn-recv-refused")
        first = refused.get() if has_syn_recv else "not in BTF"
        if first is None:
            try:
                self.bpf = self._compile_fentry({"AT_FENTRY_SYN_RECV": 1}, policy)
                self.defines["AT_FENTRY_SYN_RECV"] = 1
                self._attach()
                return
            except UserError as exc:
                if "security policy" in str(exc):
                    raise  # no fentry program at all can load here
                first = str(exc)
                # The kernel's answer cannot change before a reboot: the next start
                # skips this compile (under TCG, half of a fentry start on 6.1).
                refused.put(first)
        extra = {"AT_KPROBE_SYN_RECV": 1} if has_syn_recv and kprobes_available() else {}
        self.bpf = self._compile_fentry(extra, policy)
        self.defines.update(extra)
        self._attach()
        if not has_syn_recv:
            self.ack_overflow_observable = False
            return
        self.notes.append(f"fexit on tcp_v4_syn_recv_sock refused ({first})")
        if not extra:
            self.ack_overflow_observable = False
            self.notes.append("no kprobes either: final-ACK drops are not counted (null)")
            return
        for func, define, entry, ret in SYN_RECV:
            if define not in self.defines:
                continue
            try:
                with _CaptureFd2():
                    self.bpf.attach_kprobe(event=func.encode(), fn_name=entry.encode())
                    self.bpf.attach_kretprobe(event=func.encode(), fn_name=ret.encode())
            except Exception as exc:  # bcc raises plain Exception
                self.ack_overflow_observable = False
                self.notes.append(f"kprobe on {func} failed too ({_first_line(exc)}): "
                                  "final-ACK drops are not counted (null)")
                return
            self.hooks[-2:-2] = [f"kprobe:{func}", f"kretprobe:{func}"]
        self.notes.append("tcp_v{4,6}_syn_recv_sock hooked with kretprobes instead")

    def _compile_fentry(self, extra: dict[str, int], policy: BootMemo) -> Any:
        """Compile and load with `extra` defines; a refusal by policy is remembered."""
        try:
            return _compile(BPF_SOURCE, cflags({**self.defines, **extra}))
        except UserError as exc:
            if "security policy" in str(exc):
                policy.put(str(exc))
            raise

    def _attach(self) -> None:
        # BCC loaded and attached every KFUNC_PROBE/KRETFUNC_PROBE compiled in.
        hooks: list[str] = []
        for define, names in FENTRY_PROGRAMS:
            if define is None or define in self.defines:
                hooks += names
        if "AT_FENTRY_SYN_RECV" in self.defines:
            for func, define, _e, _r in SYN_RECV:
                if define in self.defines:
                    hooks += [f"fentry:{func}", f"fexit:{func}"]
        if self.dispatch and "AT_HAVE_TCP_SENDMSG" in self.defines:
            hooks.append("fexit:tcp_sendmsg")
        self.hooks = hooks + FUNC_TRACEPOINT_HOOKS + _read_tracepoint_hooks(self)


def _read_tracepoint_hooks(backend: _BccBackend) -> list[str]:
    if "AT_READ_TRACEPOINTS" not in backend.defines:
        return []
    return ["tracepoint:sock:sock_recv_length"] + (
        ["tracepoint:sock:sock_send_length"] if backend.dispatch else [])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# (entry fn, return fn, kernel functions, define the C was built with, required)
KPROBES: list[tuple[str | None, str | None, list[str], str | None, bool]] = [
    ("kp_tcp_conn_request", "kr_tcp_conn_request", ["tcp_conn_request"], None, True),
    ("kp_complete_hashdance", "kr_complete_hashdance", ["inet_csk_complete_hashdance"], None,
     True),
    ("kp_reqsk_queue_add", "kr_reqsk_queue_add", ["inet_csk_reqsk_queue_add"],
     "AT_HAVE_REQSK_QUEUE_ADD", False),
    ("kp_tcp_v4_syn_recv_sock", "kr_tcp_v4_syn_recv_sock", ["tcp_v4_syn_recv_sock"],
     "AT_HAVE_TCP_V4_SYN_RECV_SOCK", False),
    ("kp_tcp_v6_syn_recv_sock", "kr_tcp_v6_syn_recv_sock", ["tcp_v6_syn_recv_sock"],
     "AT_HAVE_TCP_V6_SYN_RECV_SOCK", False),
    ("kp_cookie_init_sequence", None, ["cookie_v4_init_sequence"],
     "AT_HAVE_COOKIE_V4_INIT_SEQUENCE", False),
    ("kp_cookie_init_sequence", None, ["cookie_v6_init_sequence"],
     "AT_HAVE_COOKIE_V6_INIT_SEQUENCE", False),
    # The C's drop attribution relies on this one when built with its define:
    ("kp_reqsk_queue_hash_add", None, ["inet_csk_reqsk_queue_hash_add"],
     "AT_HAVE_REQSK_HASH_ADD", True),
    (None, "kr_inet_csk_accept", ["inet_csk_accept"], "AT_HAVE_INET_CSK_ACCEPT", False),
    ("kp_tcp_recvmsg", "kr_tcp_recvmsg", ["tcp_recvmsg"], "AT_HAVE_TCP_RECVMSG", False),
]
# Calls that sleep (accept, recvmsg): a kretprobe instance per sleeping task.
KRETPROBE_MAXACTIVE = 512


class KprobeBackend(_BccBackend):
    """kprobes/kretprobes on the same functions, where fentry is not allowed."""

    name = "kprobe"
    exact_drops = True

    def _attach(self) -> None:
        probes = list(KPROBES)
        if self.dispatch and "AT_HAVE_TCP_SENDMSG" in self.defines:
            probes.append(("kp_tcp_sendmsg", "kr_tcp_sendmsg", ["tcp_sendmsg"],
                           "AT_HAVE_TCP_SENDMSG", False))
        if "AT_HAVE_TCP_V4_SYN_RECV_SOCK" not in self.defines:
            self.ack_overflow_observable = False
        for entry, ret, funcs, define, required in probes:
            if define is not None and define not in self.defines:
                continue
            for func in funcs:
                try:
                    with _CaptureFd2():
                        if entry:
                            self.bpf.attach_kprobe(event=func.encode(), fn_name=entry.encode())
                        if ret:
                            self.bpf.attach_kretprobe(event=func.encode(), fn_name=ret.encode(),
                                                      maxactive=KRETPROBE_MAXACTIVE)
                except Exception as exc:  # bcc raises plain Exception
                    msg = _first_line(exc)
                    if required or define is None:
                        raise UserError(f"kprobe on {func} failed: {msg}") from exc
                    self.notes.append(f"kprobe on {func} failed ({msg}): not traced")
                    self.missing_stages.update(stages_fed_by({func}))
                    if func == "tcp_v4_syn_recv_sock":
                        self.ack_overflow_observable = False
                    continue
                if entry:
                    self.hooks.append(f"kprobe:{func}")
                if ret:
                    self.hooks.append(f"kretprobe:{func}")
        self.hooks += FUNC_TRACEPOINT_HOOKS + _read_tracepoint_hooks(self)


BACKENDS: dict[str, type[_BccBackend]] = {
    "fentry": FentryBackend,
    "kprobe": KprobeBackend,
    "tracepoint": TracepointBackend,
}


def fentry_supported() -> tuple[bool, str]:
    """Does BCC and this kernel offer BPF trampolines at all?  (Loading tells the rest.)"""
    if not import_bcc().BPF.support_kfunc():
        return False, "BCC or the kernel lacks fentry (BPF trampoline) support"
    return True, "BPF trampolines supported"
