"""The hook catalogue: one typed row per attach point, and nothing else.

A row says where a hook attaches (a kernel function, a tracepoint, a raw
tracepoint), which backends' BPF sources carry glue for it, what the glue
reads of the kernel (so the BTF/tracefs check that decides it), whether a
backend can run without it, what it feeds, and what is lost without it.
kernel.py probes the functions and tracepoints listed here, selection.py
decides from the rows which hooks a backend compiles in (one explicit
``AT_HOOK_<NAME>`` define each, valued with an ``ATTACH_*`` type), the loader
attaches from them, doctor lists them, and ``meta.hooks`` is the attach
points of the rows that really attached.

A :class:`Plan` is one backend's choice of rows for one kernel (made in
selection.py): the -D defines it compiles with and the attach points it names.

Adding a hook for a new kernel: one row here, plus its glue in
``bpf/<backend>.bpf.c`` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# How a hook's glue attaches: the values of AT_HOOK_<NAME> (bpf/acceptrace.h).
ATTACH_OFF = 0
ATTACH_FENTRY = 1
ATTACH_KPROBE = 2
ATTACH_TRACEPOINT = 3
ATTACH_RAW_TRACEPOINT = 4

BACKENDS = ("fentry", "kprobe", "tracepoint")
SOURCES = {"fentry": "fentry.bpf.c", "kprobe": "kprobe.bpf.c", "tracepoint": "tracepoint.bpf.c"}
# The rows whose hook tells final-ACK overflows apart, per backend.
ACK_OVERFLOW_ROWS = {"fentry": "tcp_v4_syn_recv_sock", "kprobe": "tcp_v4_syn_recv_sock",
                     "tracepoint": "kfree_skb"}
FUNC_BACKENDS = ("fentry", "kprobe")

Kind = Literal["function", "tracepoint", "raw_tracepoint"]
# When a hook is wanted at all: always; where the blind-spot counter can run
# (kallsyms); where kprobes feed the drop counters and the blind spot can hide
# their packets.
When = Literal["always", "busy", "unseen"]

DISPATCH_STAGES = ("accept_to_dispatch", "read_to_dispatch", "syn_to_dispatch",
                   "dispatch_to_response")
# The first response: the first byte written back after the first read.
RESPONSE_STAGES = ("read_to_response", "syn_to_response")


@dataclass(frozen=True)
class Hook:
    """One attach point.

    ``entry``/``exit``: a function hook's body runs at entry, at exit, or both;
    ``args_at_exit``: the exit reads arguments, so a kretprobe needs an entry
    probe that keeps them.  ``min_args``: the arguments the glue reads by
    position (a kernel whose function takes fewer does not have the hook).
    ``fields``: the tracepoint fields the glue reads.  ``needs``: defines its
    body uses that only some kernels have (BTF enum values).  ``required``:
    the backends that cannot run without it; ``vital``: once compiled in, an
    attach failure is fatal (the C's logic relies on it having run).
    ``replaced_by``: a row that does the same job without a kretprobe, used
    instead where present.  ``sleeps``: a kretprobe needs an instance per
    sleeping task.  ``stages``: what is null without it.
    """

    name: str
    point: str
    kind: Kind
    backends: tuple[str, ...]
    why: str
    entry: bool = True
    exit: bool = False
    args_at_exit: bool = False
    min_args: int = 0
    fields: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    vital: bool = False
    when: When = "always"
    replaced_by: str | None = None
    sleeps: bool = False
    stages: tuple[str, ...] = ()
    counters: tuple[str, ...] = ()

    @property
    def define(self) -> str:
        return "AT_HOOK_" + self.name.upper()

    def attach_type(self, backend: str) -> int:
        """The attach type of this row's glue in ``backend``'s source."""
        if backend not in self.backends:
            return ATTACH_OFF
        if self.kind == "tracepoint":
            return ATTACH_TRACEPOINT
        if self.kind == "raw_tracepoint":
            return ATTACH_RAW_TRACEPOINT
        return ATTACH_FENTRY if backend == "fentry" else ATTACH_KPROBE

    def points(self, attach: int) -> list[str]:
        """The attach points, as meta.hooks names them, for glue of type ``attach``."""
        if attach == ATTACH_TRACEPOINT:
            return [f"tracepoint:{self.point}"]
        if attach == ATTACH_RAW_TRACEPOINT:
            return [f"raw_tracepoint:{self.point}"]
        if attach == ATTACH_FENTRY:
            return ([f"fentry:{self.point}"] if self.entry else []) + (
                [f"fexit:{self.point}"] if self.exit else [])
        if attach == ATTACH_KPROBE:
            entry, ret = self.kprobe_programs()
            return ([f"kprobe:{self.point}"] if entry else []) + (
                [f"kretprobe:{self.point}"] if ret else [])
        return []

    def kprobe_programs(self) -> tuple[str | None, str | None]:
        """The kprobe and kretprobe functions of this row's kprobe glue (kp_/kr_NAME)."""
        entry = f"kp_{self.name}" if self.entry or (self.exit and self.args_at_exit) else None
        ret = f"kr_{self.name}" if self.exit else None
        return entry, ret

    def is_required(self, backend: str) -> bool:
        return backend in self.required


_F = FUNC_BACKENDS
_ALL = BACKENDS

CATALOGUE: tuple[Hook, ...] = (
    # -- the kernel functions of the accept path (fentry, kprobe) ---------------------
    Hook("tcp_conn_request", "tcp_conn_request", "function", _F, entry=True, exit=True,
         min_args=4, required=_F, counters=("syns", "syn_dropped_acceptq_full",
                                            "syn_dropped_synq_full", "listen_drops_other"),
         why="every SYN to a listener: SYN times and SYN drops"),
    Hook("inet_csk_complete_hashdance", "inet_csk_complete_hashdance", "function", _F,
         entry=True, exit=True, min_args=3, required=_F, counters=("queued",),
         why="each child queued after its final ACK (where a connection starts being "
             "followed)"),
    Hook("inet_csk_reqsk_queue_add", "inet_csk_reqsk_queue_add", "function", _F,
         entry=True, exit=True, min_args=3, counters=("queued", "syncookies"),
         why="syncookie and Fast Open children are not followed"),
    Hook("tcp_v4_syn_recv_sock", "tcp_v4_syn_recv_sock", "function", _F, entry=True,
         exit=True, min_args=2, counters=("ack_dropped_acceptq_full",),
         why="final ACKs dropped for a full accept queue are not counted"),
    Hook("tcp_v6_syn_recv_sock", "tcp_v6_syn_recv_sock", "function", _F, entry=True,
         exit=True, min_args=2, counters=("ack_dropped_acceptq_full",),
         why="IPv6 final ACKs dropped for a full accept queue are not counted"),
    Hook("cookie_v4_init_sequence", "cookie_v4_init_sequence", "function", _F,
         counters=("syncookies_sent",), why="IPv4 syncookies sent are not counted"),
    Hook("cookie_v6_init_sequence", "cookie_v6_init_sequence", "function", _F,
         counters=("syncookies_sent",), why="IPv6 syncookies sent are not counted"),
    # Hooked at entry: its void -> bool change (6.10) does not matter.
    Hook("inet_csk_reqsk_queue_hash_add", "inet_csk_reqsk_queue_hash_add", "function", _F,
         min_args=1, vital=True,
         why="a dropped SYN is judged by the queue tests alone (other drops not seen)"),
    Hook("inet_csk_accept", "inet_csk_accept", "function", _F, entry=False, exit=True,
         sleeps=True, counters=("accepted",),
         stages=("accept_queue", "syn_to_accept", "accept_to_read", *RESPONSE_STAGES,
                 *DISPATCH_STAGES),
         why="accept() is not seen"),
    Hook("tcp_recvmsg", "tcp_recvmsg", "function", _F, entry=False, exit=True,
         args_at_exit=True, min_args=1, sleeps=True, replaced_by="sock_recv_length",
         counters=("read",), stages=("accept_to_read", *RESPONSE_STAGES, *DISPATCH_STAGES),
         why="reads are not seen"),
    Hook("tcp_sendmsg", "tcp_sendmsg", "function", _F, entry=False, exit=True,
         args_at_exit=True, min_args=1, sleeps=True,
         replaced_by="sock_send_length", counters=("responded",),
         stages=(*RESPONSE_STAGES, "dispatch_to_response"), why="responses are not seen"),
    # -- tracepoints, attached raw (BPF_RAW_TRACEPOINT_OPEN): the arguments of the
    # tracepoint's TP_PROTO in ctx->args[] (checked in BTF: btf_trace_<name>), no
    # event record built, and the kernel skips one only when it re-enters itself --
    # a perf-event tracepoint is skipped whenever any kprobe/tracepoint program runs
    # on that CPU (docs/backends.md, "Blind spots") --------------------------------
    Hook("sk_data_ready", "sk_data_ready", "raw_tracepoint", ("tracepoint",),
         min_args=1, required=("tracepoint",),
         counters=("queued", "syn_timed", "syncookies"),
         why="children queued on a listener (Linux 6.3+)"),
    Hook("inet_sock_set_state", "inet_sock_set_state", "raw_tracepoint", _ALL,
         min_args=3, required=_ALL, counters=("created",),
         why="children made, connections closing (tracepoint backend: established)"),
    # -- syscall tracepoints (perf events: per-syscall events are not raw tracepoints) --
    Hook("sys_exit_accept4", "syscalls:sys_exit_accept4", "tracepoint", ("tracepoint",),
         fields=("ret",), required=("tracepoint",), counters=("accepted",),
         why="accept4() returning a socket"),
    Hook("sys_exit_accept", "syscalls:sys_exit_accept", "tracepoint", ("tracepoint",),
         fields=("ret",), required=("tracepoint",), counters=("accepted",),
         why="accept() returning a socket"),
    # -- raw tracepoints again ----------------------------------------------------------
    Hook("sock_recv_length", "sock_recv_length", "raw_tracepoint", _ALL,
         min_args=2, required=("tracepoint",), counters=("read",),
         why="reads (Linux 6.3+; the function backends use tcp_recvmsg without it)"),
    Hook("sock_send_length", "sock_send_length", "raw_tracepoint", _ALL,
         min_args=2, counters=("responded",),
         stages=(*RESPONSE_STAGES, "dispatch_to_response"),
         why="responses (Linux 6.3+; the function backends use tcp_sendmsg without it)"),
    Hook("tcp_retransmit_synack", "tcp_retransmit_synack", "raw_tracepoint", _ALL,
         min_args=1, required=_ALL, counters=("synack_retransmits",),
         why="SYN-ACK retransmits"),
    # (skb, location, reason, rx_sk): rx_sk since 6.11 (c53795d48ee8)
    Hook("kfree_skb", "kfree_skb", "raw_tracepoint", ("tracepoint",),
         min_args=4, needs=("AT_DROP_REASON_LISTEN_OVERFLOW",),
         counters=("ack_dropped_acceptq_full",),
         why="final ACKs dropped for a full accept queue are not told apart from SYNs "
             "(needs the TCP_LISTEN_OVERFLOW drop reason and rx_sk, Linux 6.15+)"),
    # -- raw tracepoints: the blind-spot counter (blind.bpf.h) -------------------------
    Hook("softirq_entry", "softirq_entry", "raw_tracepoint", _ALL, when="busy", min_args=1,
         counters=("softirqs_busy",),
         why="softirqs in which kprobe/tracepoint programs were skipped are not counted"),
    Hook("softirq_exit", "softirq_exit", "raw_tracepoint", _F, when="unseen", min_args=1,
         counters=("packets_unseen",), why="the end of a busy softirq"),
    Hook("netif_receive_skb", "netif_receive_skb", "raw_tracepoint", _F, when="unseen",
         min_args=1,
         counters=("packets_unseen",),
         why="packets to a traced port that kprobes could not see are not counted"),
)

BY_NAME: dict[str, Hook] = {h.name: h for h in CATALOGUE}


def rows(kind: Kind | None = None, backend: str | None = None) -> list[Hook]:
    """The catalogue's rows, of one kind and/or with glue in one backend."""
    return [h for h in CATALOGUE
            if (kind is None or h.kind == kind) and (backend is None or backend in h.backends)]


BY_POINT: dict[str, Hook] = {h.point: h for h in CATALOGUE}


def for_point(label: str) -> Hook | None:
    """The row of an attach point as meta.hooks names it ("tracepoint:sock:sk_data_ready",
    "kretprobe:inet_csk_accept", ...); None for what is not a catalogue row (uprobes)."""
    _, _, point = label.partition(":")
    return BY_POINT.get(point)


def feeds(label: str) -> list[str]:
    """The figures (counters, then stages) the program at ``label`` feeds."""
    h = for_point(label)
    if h is None:
        return list(DISPATCH_STAGES) if label.startswith("uprobe:") else []
    return [*h.counters, *h.stages]


def stages_fed_by(names: set[str] | list[str]) -> set[str]:
    """The stages that become null when these rows are missing."""
    return {stage for name in names for stage in BY_NAME[name].stages}


@dataclass
class Plan:
    """One backend's program for this kernel: decided here, compiled and attached by a loader.

    ``chosen``: row name -> attach type (hooks.ATTACH_*), in catalogue order;
    ``missing``: the optional rows this kernel cannot have (their stages are
    null).  The loader calls ``lose`` for a row that compiled but did not attach.
    """

    backend: str
    dispatch: bool
    chosen: dict[str, int]
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base_defines: dict[str, int] = field(default_factory=dict)
    slots: int = 1              # targets the programs hold (AT_SLOTS)
    prog_info: dict[str, int] = field(default_factory=dict)  # kernel.prog_info_facts()

    def misses_counted(self, label: str) -> bool:
        """Does this kernel count the runs it skips of the program at ``label``
        (bpf_prog_info.recursion_misses; kernel.prog_info_facts says since when)?"""
        kind = label.partition(":")[0]
        if "recursion_misses" not in self.prog_info:
            return False
        if kind in ("fentry", "fexit"):
            return True
        if kind == "raw_tracepoint":
            return bool(self.prog_info.get("misses_raw_tp"))
        if kind in ("tracepoint", "kprobe", "kretprobe"):
            return bool(self.prog_info.get("misses_perf"))
        return False  # uprobes: never counted (their runs are not guarded)

    @property
    def source(self) -> str:
        return SOURCES[self.backend]

    @property
    def exact_drops(self) -> bool:
        """Drop counters taken at the kernel's decision points (the function hooks)."""
        return self.backend in FUNC_BACKENDS

    @property
    def ack_overflow_observable(self) -> bool:
        return ACK_OVERFLOW_ROWS[self.backend] in self.chosen

    @property
    def busy_counted(self) -> bool:
        return "softirq_entry" in self.chosen

    @property
    def unseen_counted(self) -> bool:
        return "netif_receive_skb" in self.chosen

    @property
    def missing_stages(self) -> set[str]:
        """Stages no hook measures here: those of the missing rows, but for a row whose
        job a chosen row does instead (tcp_sendmsg without sock:sock_send_length)."""
        replaced = {BY_NAME[n].replaced_by for n in self.chosen if BY_NAME[n].replaced_by}
        return stages_fed_by([n for n in self.missing if n not in replaced])

    def defines(self) -> dict[str, int]:
        """Every -D define of the program: explicit integers, one per decision."""
        out = dict(self.base_defines)
        for h in CATALOGUE:
            out[h.define] = self.chosen.get(h.name, ATTACH_OFF)
        out["AT_DISPATCH"] = int(self.dispatch)
        out["AT_COUNT_BUSY"] = int(self.busy_counted)
        out["AT_COUNT_UNSEEN"] = int(self.unseen_counted)
        return out

    def rows(self) -> list[tuple[Hook, int]]:
        return [(BY_NAME[n], t) for n, t in self.chosen.items()]

    def points(self) -> list[str]:
        """The attach points of the chosen rows, as meta.hooks names them."""
        return [p for h, t in self.rows() for p in h.points(t)]

    def lose(self, name: str, why: str) -> None:
        """Row ``name`` compiled in but did not attach: its stages become null."""
        self.chosen.pop(name, None)
        self.missing.append(name)
        self.notes.append(why)
