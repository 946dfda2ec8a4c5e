"""What the running kernel offers, and the -D defines the BPF programs need.

Every struct offset and enum value the BPF C dereferences comes from the
kernel's BTF here (never from header layouts: the header tree BCC compiles
against may be another kernel's).  Tracepoint fields are feature-checked in
tracefs.  Nothing in this module imports bcc.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .bootmemo import BootMemo
from .btf import BTF, BTFError
from .errors import UserError

BTF_PATH_ENV = "ACCEPTRACE_BTF"
DEFAULT_BTF = "/sys/kernel/btf/vmlinux"
TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# define name -> (struct, dotted member path): byte offsets the C reads at.
OFFSETS: dict[str, tuple[str, str]] = {
    "AT_OFF_SK_STATE": ("sock", "__sk_common.skc_state"),
    "AT_OFF_SK_NUM": ("sock", "__sk_common.skc_num"),
    "AT_OFF_SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "AT_OFF_SK_DPORT": ("sock", "__sk_common.skc_dport"),
    "AT_OFF_SK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "AT_OFF_SK_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "AT_OFF_SK_ACK_BACKLOG": ("sock", "sk_ack_backlog"),
    "AT_OFF_SK_MAX_ACK_BACKLOG": ("sock", "sk_max_ack_backlog"),
    "AT_OFF_ICSK_ACCEPTQ_TAIL": ("inet_connection_sock", "icsk_accept_queue.rskq_accept_tail"),
    "AT_OFF_ICSK_ACCEPTQ_QLEN": ("inet_connection_sock", "icsk_accept_queue.qlen"),
    "AT_OFF_REQ_SK": ("request_sock", "sk"),
    "AT_OFF_REQ_NUM_RETRANS": ("request_sock", "num_retrans"),
    "AT_OFF_TREQ_SNT_SYNACK": ("tcp_request_sock", "snt_synack"),
    "AT_OFF_TASK_FILES": ("task_struct", "files"),
    "AT_OFF_FILES_FDT": ("files_struct", "fdt"),
    "AT_OFF_FDT_FD": ("fdtable", "fd"),
    "AT_OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "AT_OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "AT_OFF_SOCKET_SK": ("socket", "sk"),
}
# Offsets used when the kernel has them (IPv6 off, or sk_protocol a bitfield
# before 5.6): the C compiles the check out when the define is absent.
OPTIONAL_OFFSETS: dict[str, tuple[str, str]] = {
    "AT_OFF_SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "AT_OFF_SK_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "AT_OFF_SK_PROTOCOL": ("sock", "sk_protocol"),
}
# The C reads these with a fixed width: the BTF member size must match.
EXPECTED_SIZES: dict[str, int] = {
    "AT_OFF_SK_STATE": 1,
    "AT_OFF_SK_NUM": 2,
    "AT_OFF_SK_FAMILY": 2,
    "AT_OFF_SK_DPORT": 2,
    "AT_OFF_SK_DADDR": 4,
    "AT_OFF_SK_RCV_SADDR": 4,
    "AT_OFF_SK_ACK_BACKLOG": 4,
    "AT_OFF_SK_MAX_ACK_BACKLOG": 4,
    "AT_OFF_ICSK_ACCEPTQ_TAIL": 8,
    "AT_OFF_ICSK_ACCEPTQ_QLEN": 4,
    "AT_OFF_REQ_SK": 8,
    "AT_OFF_REQ_NUM_RETRANS": 1,
    "AT_OFF_TREQ_SNT_SYNACK": 8,
    "AT_OFF_TASK_FILES": 8,
    "AT_OFF_FILES_FDT": 8,
    "AT_OFF_FDT_FD": 8,
    "AT_OFF_FDT_MAX_FDS": 4,
    "AT_OFF_FILE_PRIVATE_DATA": 8,
    "AT_OFF_SOCKET_SK": 8,
    "AT_OFF_SK_V6_DADDR": 16,
    "AT_OFF_SK_V6_RCV_SADDR": 16,
    "AT_OFF_SK_PROTOCOL": 2,
}
ENUMS: dict[str, str] = {
    "AT_TCP_LISTEN": "TCP_LISTEN",
    "AT_TCP_ESTABLISHED": "TCP_ESTABLISHED",
    "AT_TCP_SYN_RECV": "TCP_SYN_RECV",
    "AT_TCP_CLOSE": "TCP_CLOSE",
}
# Offsets only the kernel-function hooks (fentry, kprobe) read.
FUNC_OFFSETS: dict[str, tuple[str, str]] = {
    "AT_OFF_SKB_HEAD": ("sk_buff", "head"),
    "AT_OFF_SKB_NETWORK_HEADER": ("sk_buff", "network_header"),
    "AT_OFF_SKB_TRANSPORT_HEADER": ("sk_buff", "transport_header"),
    "AT_OFF_SK_NET": ("sock", "__sk_common.skc_net.net"),
    "AT_OFF_NET_SYNCOOKIES": ("net", "ipv4.sysctl_tcp_syncookies"),
}
EXPECTED_SIZES.update({
    "AT_OFF_SKB_HEAD": 8,
    "AT_OFF_SKB_NETWORK_HEADER": 2,
    "AT_OFF_SKB_TRANSPORT_HEADER": 2,
    "AT_OFF_SK_NET": 8,
    "AT_OFF_NET_SYNCOOKIES": 1,
})
OPTIONAL_ENUMS: dict[str, str] = {
    "AT_DROP_REASON_LISTEN_OVERFLOW": "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW",
}

# Tracepoints the tracepoint backend attaches (category, name) and needs.
TRACEPOINTS_REQUIRED: tuple[tuple[str, str], ...] = (
    ("sock", "sk_data_ready"),
    ("sock", "inet_sock_set_state"),
    ("sock", "sock_recv_length"),
    ("syscalls", "sys_exit_accept4"),
    ("syscalls", "sys_exit_accept"),
    ("tcp", "tcp_retransmit_synack"),
)
TRACEPOINTS_OPTIONAL: tuple[tuple[str, str], ...] = (("skb", "kfree_skb"),)


def btf_path() -> Path:
    return Path(os.environ.get(BTF_PATH_ENV, DEFAULT_BTF))


def load_btf() -> BTF:
    path = btf_path()
    if not path.exists():
        raise UserError(
            f"no BTF at {path}: this kernel was built without CONFIG_DEBUG_INFO_BTF; "
            "acceptrace needs BTF to find struct offsets"
        )
    try:
        return BTF.load(path)
    except (OSError, BTFError) as exc:
        raise UserError(f"cannot read BTF from {path}: {exc}") from exc


def find_tracefs() -> Path | None:
    for cand in TRACEFS_CANDIDATES:
        if Path(cand, "events").is_dir():
            return Path(cand)
    return None


def ensure_tracefs() -> tuple[Path, bool]:
    """Return tracefs, mounting it at /sys/kernel/tracing if needed (root only).

    The bool says whether this call mounted it.
    """
    found = find_tracefs()
    if found:
        return found, False
    target = TRACEFS_CANDIDATES[0]
    proc = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", target], capture_output=True, text=True, check=False
    )
    found = find_tracefs()
    if found:
        return found, True
    reason = (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"
    raise UserError(
        f"tracefs is not mounted and mounting it failed ({reason}); "
        f"run: mount -t tracefs nodev {target}"
    )


def has_read_tracepoints(tracefs: Path) -> bool:
    """sock:sock_recv_length and sock:sock_send_length (Linux 6.3+)."""
    return all(tracepoint_fields(tracefs, "sock", n) is not None
               for n in ("sock_recv_length", "sock_send_length"))


def kprobes_available() -> bool:
    """A kernel with kprobes has kprobe_events in tracefs (CONFIG_KPROBE_EVENTS)."""
    tracefs = find_tracefs()
    return tracefs is not None and (tracefs / "kprobe_events").exists()


def tracepoint_fields(tracefs: Path, category: str, name: str) -> dict[str, str] | None:
    """Field name -> C type of a tracepoint, from its tracefs format; None if absent."""
    fmt = tracefs / "events" / category / name / "format"
    try:
        text = fmt.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        decl = line.split(";", 1)[0][len("field:") :].strip()
        if "[" in decl:
            decl = decl[: decl.index("[")]
        ctype, _, fname = decl.rpartition(" ")
        fname = fname.lstrip("*")
        if fname.startswith("common_"):
            continue
        fields[fname] = ctype.strip()
    return fields


@dataclass
class KernelFeatures:
    """BTF- and tracefs-derived facts, and the defines for the C."""

    release: str
    defines: dict[str, int] = field(default_factory=dict)
    missing_tracepoints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ack_overflow_observable: bool = False


def resolve_offsets(btf: BTF) -> tuple[dict[str, int], list[str]]:
    """BTF offsets and enum values as defines; raise UserError for a required one."""
    defines: dict[str, int] = {}
    notes: list[str] = []
    for table, required in ((OFFSETS, True), (OPTIONAL_OFFSETS, False)):
        for define, (struct, path) in table.items():
            try:
                off = btf.member_offset(struct, path)
                size = btf.member_size(struct, path)
            except BTFError as exc:
                if required:
                    raise UserError(f"this kernel's BTF lacks {struct}.{path}: {exc}") from exc
                notes.append(f"{struct}.{path} not in BTF: its check is compiled out")
                continue
            want = EXPECTED_SIZES.get(define)
            if want is not None and size != want:
                if required:
                    raise UserError(
                        f"{struct}.{path} is {size} bytes in this kernel's BTF, expected {want}"
                    )
                notes.append(f"{struct}.{path} is {size} bytes, not {want}: check compiled out")
                continue
            defines[define] = off
    for enums, required in ((ENUMS, True), (OPTIONAL_ENUMS, False)):
        for define, name in enums.items():
            if btf.has_enum_value(name):
                defines[define] = btf.enum_value(name)
            elif required:
                raise UserError(f"this kernel's BTF has no enum value {name}")
            # An optional enum value missing is said where it matters (ACK_OVERFLOW_NOTE).
    return defines, notes


def probe_features(btf: BTF, tracefs: Path) -> KernelFeatures:
    feats = KernelFeatures(release=platform.release())
    feats.defines, feats.notes = resolve_offsets(btf)
    for cat, name in TRACEPOINTS_REQUIRED:
        if tracepoint_fields(tracefs, cat, name) is None:
            feats.missing_tracepoints.append(f"{cat}:{name}")
    kfree = tracepoint_fields(tracefs, "skb", "kfree_skb")
    if kfree is not None and "reason" in kfree:
        feats.defines["AT_HAVE_KFREE_SKB_REASON"] = 1
        if "rx_sk" in kfree:
            feats.defines["AT_HAVE_KFREE_SKB_RX_SK"] = 1
    feats.ack_overflow_observable = all(
        k in feats.defines
        for k in (
            "AT_HAVE_KFREE_SKB_REASON",
            "AT_HAVE_KFREE_SKB_RX_SK",
            "AT_DROP_REASON_LISTEN_OVERFLOW",
        )
    )
    return feats


ACK_OVERFLOW_NOTE = (
    "skb:kfree_skb has no TCP_LISTEN_OVERFLOW reason with rx_sk here (Linux 6.15+): "
    "final-ACK overflows cannot be told apart, so ack_dropped and syn_dropped are null"
)


@dataclass(frozen=True)
class FuncHook:
    """A kernel function the fentry/kprobe backends hook.

    ``min_args``: the arguments the C reads (by position), so a kernel whose
    function has fewer is treated as not having it.  ``define``: set when the
    function is there (None: the backend cannot run without it).  ``stages``:
    what becomes null without it.
    """

    func: str
    min_args: int
    define: str | None
    stages: tuple[str, ...] = ()
    why: str = ""


DISPATCH_STAGE_NAMES = ("accept_to_dispatch", "read_to_dispatch", "syn_to_dispatch",
                        "dispatch_to_response")
FUNC_HOOKS: tuple[FuncHook, ...] = (
    FuncHook("tcp_conn_request", 4, None, why="every SYN to a listener"),
    FuncHook("inet_csk_complete_hashdance", 3, None,
             why="each child queued after its final ACK (where a connection starts being "
                 "followed)"),
    FuncHook("inet_csk_reqsk_queue_add", 3, "AT_HAVE_REQSK_QUEUE_ADD",
             why="syncookie and Fast Open children are not followed"),
    FuncHook("tcp_v4_syn_recv_sock", 2, "AT_HAVE_TCP_V4_SYN_RECV_SOCK",
             why="final ACKs dropped for a full accept queue are not counted"),
    FuncHook("tcp_v6_syn_recv_sock", 2, "AT_HAVE_TCP_V6_SYN_RECV_SOCK",
             why="IPv6 final ACKs dropped for a full accept queue are not counted"),
    FuncHook("cookie_v4_init_sequence", 0, "AT_HAVE_COOKIE_V4_INIT_SEQUENCE",
             why="IPv4 syncookies sent are not counted"),
    FuncHook("cookie_v6_init_sequence", 0, "AT_HAVE_COOKIE_V6_INIT_SEQUENCE",
             why="IPv6 syncookies sent are not counted"),
    FuncHook("inet_csk_reqsk_queue_hash_add", 1, "AT_HAVE_REQSK_HASH_ADD",
             why="a dropped SYN is judged by the queue tests alone (other drops not seen)"),
    FuncHook("inet_csk_accept", 0, "AT_HAVE_INET_CSK_ACCEPT",
             ("accept_queue", "syn_to_accept", "accept_to_read", *DISPATCH_STAGE_NAMES),
             why="accept() is not seen"),
    FuncHook("tcp_recvmsg", 1, "AT_HAVE_TCP_RECVMSG",
             ("accept_to_read", *DISPATCH_STAGE_NAMES), why="reads are not seen"),
    FuncHook("tcp_sendmsg", 1, "AT_HAVE_TCP_SENDMSG", ("dispatch_to_response",),
             why="responses are not seen"),
)


def stages_fed_by(funcs: set[str] | list[str]) -> set[str]:
    """The stages that become null when these hooked functions are missing."""
    return {stage for hook in FUNC_HOOKS if hook.func in funcs for stage in hook.stages}


@dataclass
class FuncFeatures:
    """Which accept-path functions this kernel has, their signatures, and what follows."""

    defines: dict[str, int] = field(default_factory=dict)
    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # optional ones absent
    missing_required: list[str] = field(default_factory=list)
    missing_stages: set[str] = field(default_factory=set)
    signatures: dict[str, str] = field(default_factory=dict)  # func -> one-line C signature
    notes: list[str] = field(default_factory=list)
    syn_recv_args: int | None = None  # 6, or 7 with the 2026 opt_child_init backport


def _signature(btf: BTF, func: str) -> str:
    proto = btf.func_proto(func)
    args = ", ".join(f"{t} {n}".strip() if not t.endswith("*") else f"{t}{n}"
                     for n, t in proto.args)
    return f"{proto.ret} {func}({args})"


def probe_functions(btf: BTF) -> FuncFeatures:
    """The function hooks' view of this kernel, from BTF only (feature checks:
    does the function exist, how many arguments does it take)."""
    ff = FuncFeatures()
    for define, (struct, path) in FUNC_OFFSETS.items():
        try:
            off, size = btf.member_offset(struct, path), btf.member_size(struct, path)
        except BTFError as exc:
            ff.missing_required.append(f"{struct}.{path} ({exc})")
            continue
        if size != EXPECTED_SIZES[define]:
            ff.missing_required.append(f"{struct}.{path} is {size} bytes")
            continue
        ff.defines[define] = off
    for hook in FUNC_HOOKS:
        nargs = btf.func_arg_count(hook.func)
        if nargs is not None and nargs < hook.min_args:
            ff.notes.append(f"{hook.func} takes {nargs} arguments here, fewer than the "
                            f"{hook.min_args} acceptrace reads: not hooked")
            nargs = None
        if nargs is None:
            if hook.define is None:
                ff.missing_required.append(f"function {hook.func} ({hook.why})")
            else:
                ff.missing.append(hook.func)
                ff.notes.append(f"{hook.func} is not in this kernel's BTF (inlined or "
                                f"absent): {hook.why}")
            continue
        ff.present.append(hook.func)
        ff.signatures[hook.func] = _signature(btf, hook.func)
        if hook.define:
            ff.defines[hook.define] = 1
    ff.syn_recv_args = btf.func_arg_count("tcp_v4_syn_recv_sock")
    ff.missing_stages = stages_fed_by(ff.missing)
    return ff


def cflags(defines: dict[str, int]) -> list[str]:
    """-D flags; values are ints only, so no user string ever reaches the C."""
    out = []
    for name, value in sorted(defines.items()):
        if not name.isidentifier() or not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"refusing define {name}={value!r}")
        # Kernel addresses are 64-bit: written unsigned, so clang takes them as they are.
        out.append(f"-D{name}={value:#x}ULL" if value > 0x7FFFFFFF else f"-D{name}={value}")
    return out


# Per-CPU variables that, when set, make the kernel skip kprobe and tracepoint
# programs on that CPU (see softirq_entry in bpf/acceptrace.bpf.c).
BUSY_SYMBOLS: dict[str, str] = {
    "AT_KSYM_PER_CPU_OFFSET": "__per_cpu_offset",
    "AT_KSYM_BPF_PROG_ACTIVE": "bpf_prog_active",
    "AT_KSYM_CURRENT_KPROBE": "current_kprobe",  # absent without CONFIG_KPROBES
}
BUSY_REQUIRED = ("AT_KSYM_PER_CPU_OFFSET", "AT_KSYM_BPF_PROG_ACTIVE")
BUSY_ENUMS: dict[str, str] = {
    "AT_NET_RX_SOFTIRQ": "NET_RX_SOFTIRQ",
    "AT_TIMER_SOFTIRQ": "TIMER_SOFTIRQ",
}


def parse_kallsyms(text: str, names: set[str]) -> dict[str, int]:
    """Addresses of ``names`` in /proc/kallsyms text (vmlinux symbols only, the first
    of each name).  Addresses hidden by kptr_restrict read as 0 and are left out."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[2] not in names or parts[2] in out:
            continue  # a 4th field is a module's name
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        if addr:
            out[parts[2]] = addr
    return out


def busy_defines(btf: BTF, kallsyms: str | None = None) -> tuple[dict[str, int], str | None]:
    """The defines of the blind-spot counter, or ({}, why it cannot be counted)."""
    if kallsyms is None:
        try:
            kallsyms = Path("/proc/kallsyms").read_text()
        except OSError as exc:
            return {}, f"cannot read /proc/kallsyms ({exc.strerror})"
    found = parse_kallsyms(kallsyms, set(BUSY_SYMBOLS.values()))
    defines = {d: found[sym] for d, sym in BUSY_SYMBOLS.items() if sym in found}
    missing = [BUSY_SYMBOLS[d] for d in BUSY_REQUIRED if d not in defines]
    if missing:
        return {}, ("/proc/kallsyms has no address for " + ", ".join(missing)
                    + " (kernel built without CONFIG_KALLSYMS_ALL, or kptr_restrict=2)")
    for define, name in BUSY_ENUMS.items():
        if not btf.has_enum_value(name):
            return {}, f"this kernel's BTF has no enum value {name}"
        defines[define] = btf.enum_value(name)
    return defines, None


@dataclass
class KernelFacts:
    """Everything a start learns from BTF, tracefs and kallsyms: fixed for a boot.

    Worked out from the BTF once per boot and then remembered (BootMemo): reading
    and walking vmlinux's BTF in Python is most of a start's "prepare" step
    (0.4 s on a host, 6-8 s in a TCG guest)."""

    features: KernelFeatures
    funcs: FuncFeatures
    busy: dict[str, int]
    busy_why: str | None
    read_tracepoints: bool

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["funcs"]["missing_stages"] = sorted(self.funcs.missing_stages)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelFacts:
        """The facts as to_json wrote them; ValueError for anything else."""
        try:
            d = json.loads(text)
            feats = KernelFeatures(**d["features"])
            ff = dict(d["funcs"])
            ff["missing_stages"] = set(ff["missing_stages"])
            funcs = FuncFeatures(**ff)
            facts = cls(feats, funcs, dict(d["busy"]), d["busy_why"], bool(d["read_tracepoints"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not kernel facts: {exc}") from exc
        for defines in (facts.features.defines, facts.funcs.defines, facts.busy):
            for name, value in defines.items():
                if not name.isidentifier() or type(value) is not int:
                    raise ValueError(f"not a define: {name}={value!r}")
        return facts


FACTS_MEMO = "kernel-facts-"


def facts_fingerprint(tracefs: Path) -> str:
    """What the facts depend on besides the boot: this code (kernel.py, btf.py), the
    BTF file read and the tracefs looked at."""
    h = hashlib.sha256()
    for mod in (__file__, Path(__file__).with_name("btf.py")):
        h.update(Path(mod).read_bytes())
    path = btf_path()
    try:
        st = path.stat()
        h.update(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:
        h.update(str(path).encode())
    h.update(str(tracefs).encode())
    return h.hexdigest()[:16]


def compute_facts(tracefs: Path) -> KernelFacts:
    btf = load_btf()
    busy, why = busy_defines(btf)
    return KernelFacts(features=probe_features(btf, tracefs), funcs=probe_functions(btf),
                       busy=busy, busy_why=why, read_tracepoints=has_read_tracepoints(tracefs))


def kernel_facts(tracefs: Path) -> tuple[KernelFacts, bool]:
    """This boot's facts, and whether they were remembered from an earlier start
    (else worked out now, and remembered). UserError as compute_facts raises it."""
    memo = BootMemo(FACTS_MEMO + facts_fingerprint(tracefs))
    text = memo.get()
    if text is not None:
        try:
            return KernelFacts.from_json(text), True
        except ValueError:
            pass
    facts = compute_facts(tracefs)
    memo.put(facts.to_json())
    memo.forget_others(FACTS_MEMO)
    return facts, False
