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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import hooks
from .bootmemo import BootMemo
from .btf import BTF, BTFError
from .errors import UserError

BTF_PATH_ENV = "ACCEPTRACE_BTF"
DEFAULT_BTF = "/sys/kernel/btf/vmlinux"
TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

@dataclass(frozen=True)
class Offset:
    """A byte offset the C reads at (-D<define>), with the width it reads.

    ``need``: "all" -- every backend reads it, a kernel without it cannot be
    traced; "funcs" -- only the function hooks (fentry, kprobe) read it, those
    backends refuse without it; "optional" -- the C does without it when its
    ``flag`` define is 0 (IPv6 off; sk_protocol a bitfield before 5.6).
    """

    define: str
    struct: str
    path: str
    size: int
    need: Literal["all", "funcs", "optional"] = "all"
    flag: str | None = None


# The one table of offsets (struct, dotted member path, width read).
OFFSET_TABLE: tuple[Offset, ...] = (
    Offset("AT_OFF_SK_STATE", "sock", "__sk_common.skc_state", 1),
    Offset("AT_OFF_SK_NUM", "sock", "__sk_common.skc_num", 2),
    # the local port as sent (network order): still set when a socket reaches CLOSE,
    # where tcp_set_state() has released the port (skc_num = 0) before the tracepoint
    Offset("AT_OFF_INET_SPORT", "inet_sock", "inet_sport", 2),
    Offset("AT_OFF_SK_FAMILY", "sock", "__sk_common.skc_family", 2),
    Offset("AT_OFF_SK_DPORT", "sock", "__sk_common.skc_dport", 2),
    Offset("AT_OFF_SK_DADDR", "sock", "__sk_common.skc_daddr", 4),
    Offset("AT_OFF_SK_RCV_SADDR", "sock", "__sk_common.skc_rcv_saddr", 4),
    Offset("AT_OFF_SK_NET", "sock", "__sk_common.skc_net.net", 8),
    Offset("AT_OFF_NET_NS_INUM", "net", "ns.inum", 4),
    Offset("AT_OFF_SK_ACK_BACKLOG", "sock", "sk_ack_backlog", 4),
    Offset("AT_OFF_SK_MAX_ACK_BACKLOG", "sock", "sk_max_ack_backlog", 4),
    Offset("AT_OFF_ICSK_ACCEPTQ_TAIL", "inet_connection_sock",
           "icsk_accept_queue.rskq_accept_tail", 8),
    Offset("AT_OFF_ICSK_ACCEPTQ_QLEN", "inet_connection_sock", "icsk_accept_queue.qlen", 4),
    Offset("AT_OFF_REQ_SK", "request_sock", "sk", 8),
    Offset("AT_OFF_REQ_NUM_RETRANS", "request_sock", "num_retrans", 1),
    Offset("AT_OFF_TREQ_SNT_SYNACK", "tcp_request_sock", "snt_synack", 8),
    Offset("AT_OFF_TASK_FILES", "task_struct", "files", 8),
    Offset("AT_OFF_FILES_FDT", "files_struct", "fdt", 8),
    Offset("AT_OFF_FDT_FD", "fdtable", "fd", 8),
    Offset("AT_OFF_FDT_MAX_FDS", "fdtable", "max_fds", 4),
    Offset("AT_OFF_FILE_PRIVATE_DATA", "file", "private_data", 8),
    Offset("AT_OFF_SOCKET_SK", "socket", "sk", 8),
    Offset("AT_OFF_SK_SOCKET", "sock", "sk_socket", 8),
    Offset("AT_OFF_SOCKET_FILE", "socket", "file", 8),
    Offset("AT_OFF_FILE_INODE", "file", "f_inode", 8),
    Offset("AT_OFF_INODE_INO", "inode", "i_ino", 8),
    Offset("AT_OFF_SK_V6_DADDR", "sock", "__sk_common.skc_v6_daddr", 16, "optional",
           "AT_HAVE_IPV6"),
    Offset("AT_OFF_SK_V6_RCV_SADDR", "sock", "__sk_common.skc_v6_rcv_saddr", 16, "optional",
           "AT_HAVE_IPV6"),
    Offset("AT_OFF_SK_PROTOCOL", "sock", "sk_protocol", 2, "optional", "AT_HAVE_SK_PROTOCOL"),
    Offset("AT_OFF_SKB_HEAD", "sk_buff", "head", 8, "funcs"),
    Offset("AT_OFF_SKB_NETWORK_HEADER", "sk_buff", "network_header", 2, "funcs"),
    Offset("AT_OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header", 2, "funcs"),
    Offset("AT_OFF_NET_SYNCOOKIES", "net", "ipv4.sysctl_tcp_syncookies", 1, "funcs"),
)
OFFSETS: dict[str, Offset] = {o.define: o for o in OFFSET_TABLE if o.need == "all"}


@dataclass(frozen=True)
class Span:
    """Fields of one object the C reads with one bpf_probe_read_kernel() instead of
    one each (each read costs 30-60 ns where a whole program costs 60-70 ns:
    docs/performance.md).  Only for fields a few bytes apart: a read's cost grows
    with its length (126 bytes of a request cost as much as three small reads).
    Defines <name>_START (the lowest offset) and <name>_LEN (bytes from there to
    the end of the last field), LEN 0 when the fields lie further apart than
    ``limit`` bytes or one is missing: the C then reads them one by one."""

    name: str
    fields: tuple[str, ...]   # OFFSET_TABLE defines, all of one struct
    limit: int


SPANS: tuple[Span, ...] = (
    # sock_common's first bytes: both IPv4 addresses, both ports, family, state
    Span("AT_SKC_HEAD", ("AT_OFF_SK_DADDR", "AT_OFF_SK_RCV_SADDR", "AT_OFF_SK_DPORT",
                         "AT_OFF_SK_NUM", "AT_OFF_SK_FAMILY", "AT_OFF_SK_STATE"), 32),
    Span("AT_SK_BACKLOGS", ("AT_OFF_SK_ACK_BACKLOG", "AT_OFF_SK_MAX_ACK_BACKLOG"), 16),
    Span("AT_FDT_HEAD", ("AT_OFF_FDT_MAX_FDS", "AT_OFF_FDT_FD"), 16),
)


def span_defines(defines: dict[str, int]) -> dict[str, int]:
    """Each Span's <name>_START and <name>_LEN from the offsets in ``defines``."""
    sizes = {o.define: o.size for o in OFFSET_TABLE}
    out: dict[str, int] = {}
    for sp in SPANS:
        start, length = 0, 0
        if all(f in defines for f in sp.fields):
            start = min(defines[f] for f in sp.fields)
            end = max(defines[f] + sizes[f] for f in sp.fields)
            length = end - start if end - start <= sp.limit else 0
        out[sp.name + "_START"], out[sp.name + "_LEN"] = start, length
    return out
ENUMS: dict[str, str] = {
    "AT_TCP_LISTEN": "TCP_LISTEN",
    "AT_TCP_ESTABLISHED": "TCP_ESTABLISHED",
    "AT_TCP_SYN_RECV": "TCP_SYN_RECV",
    "AT_TCP_CLOSE": "TCP_CLOSE",
}
# Enum values some hooks need (a hook row's ``needs``): absent, the hook is off.
OPTIONAL_ENUMS: dict[str, str] = {
    "AT_DROP_REASON_LISTEN_OVERFLOW": "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW",
}


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


def resolve_offsets(btf: BTF) -> tuple[dict[str, int], list[str]]:
    """Every backend's offsets, enum values and AT_HAVE_* flags as defines; UserError
    for a required one.  The function hooks' own offsets: func_offsets()."""
    defines: dict[str, int] = {}
    notes: list[str] = []
    flags: dict[str, bool] = {}
    for o in OFFSET_TABLE:
        if o.need == "funcs":
            continue
        why = _offset(btf, o, defines)
        if o.flag is not None:
            flags[o.flag] = flags.get(o.flag, True) and why is None
        if why is None:
            continue
        if o.need == "all":
            raise UserError(f"this kernel's BTF {why}")
        notes.append(f"BTF {why}: its check is compiled out")
    defines.update({flag: int(ok) for flag, ok in flags.items()})
    defines.update(span_defines(defines))
    # bpf_get_current_task_btf() (5.11): the accept hook's walk from the task to
    # its fd table with plain loads (bpf/tracepoints.bpf.h on_accept_exit)
    defines["AT_HAVE_TASK_BTF"] = int(btf.has_func("bpf_get_current_task_btf"))
    for define, name in ENUMS.items():
        if not btf.has_enum_value(name):
            raise UserError(f"this kernel's BTF has no enum value {name}")
        defines[define] = btf.enum_value(name)
    for define, name in OPTIONAL_ENUMS.items():
        if btf.has_enum_value(name):
            defines[define] = btf.enum_value(name)
    return defines, notes


def _offset(btf: BTF, o: Offset, into: dict[str, int]) -> str | None:
    """Put o's offset into ``into``; else say what is wrong with it."""
    try:
        off, size = btf.member_offset(o.struct, o.path), btf.member_size(o.struct, o.path)
    except BTFError as exc:
        return f"lacks {o.struct}.{o.path} ({exc})"
    if size != o.size:
        return f"has {o.struct}.{o.path} of {size} bytes, not {o.size}"
    into[o.define] = off
    return None


def func_offsets(btf: BTF) -> tuple[dict[str, int], list[str]]:
    """The offsets only the function hooks read, and what this BTF lacks of them."""
    defines: dict[str, int] = {}
    missing = [why for o in OFFSET_TABLE if o.need == "funcs"
               if (why := _offset(btf, o, defines)) is not None]
    return defines, missing


def _signature(btf: BTF, func: str) -> str:
    proto = btf.func_proto(func)
    args = ", ".join(f"{t} {n}".strip() if not t.endswith("*") else f"{t}{n}"
                     for n, t in proto.args)
    return f"{proto.ret} {func}({args})"


def probe_functions(btf: BTF) -> tuple[dict[str, int], dict[str, str]]:
    """Argument count and one-line C signature of each function the catalogue hooks
    that this kernel's BTF has (absent: inlined, renamed or not built)."""
    args: dict[str, int] = {}
    sigs: dict[str, str] = {}
    for hook in hooks.rows("function"):
        n = btf.func_arg_count(hook.point)
        if n is not None:
            args[hook.point] = n
            sigs[hook.point] = _signature(btf, hook.point)
    return args, sigs


def probe_tracepoints(tracefs: Path) -> dict[str, list[str]]:
    """The fields of each tracepoint the catalogue hooks that this kernel has."""
    out: dict[str, list[str]] = {}
    for hook in hooks.rows("tracepoint"):
        cat, _, name = hook.point.partition(":")
        fields = tracepoint_fields(tracefs, cat, name)
        if fields is not None:
            out[hook.point] = sorted(fields)
    return out


def probe_raw_tracepoints(btf: BTF) -> dict[str, int]:
    """How many arguments each raw tracepoint the catalogue hooks passes its program
    (ctx->args[]), from BTF's btf_trace_<name>; absent: not a tracepoint here."""
    out: dict[str, int] = {}
    for hook in hooks.rows("raw_tracepoint"):
        args = btf.raw_tracepoint_args(hook.point)
        if args is not None:
            out[hook.point] = len(args)
    return out


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
# programs on that CPU (see bpf/blind.bpf.h).
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


def prog_info_facts(btf: BTF) -> dict[str, int]:
    """Where struct bpf_prog_info keeps a program's run-time statistics, and which
    attach paths count the runs the kernel skipped (bpfstats.py reads them):

    - ``size``, ``run_time_ns``, ``run_cnt`` (Linux 5.1), ``recursion_misses``
      (5.12, commit 9ed9e9ba2337 "bpf: Count the number of times recursion was
      prevented": fentry/fexit trampolines count from then on);
    - ``misses_raw_tp``: raw tracepoints skip a program re-entering itself and count
      it since 6.1 (05b24ff9b2cf "bpf: Prevent bpf program recursion for raw
      tracepoint probes", which also made bpf_prog_inc_misses_counter a function);
    - ``misses_perf``: kprobes and perf-event tracepoints count their skipped runs
      (trace_call_bpf() while bpf_prog_active is held) since 6.7 (dd8657894c11 "bpf:
      Count missed stats in trace_call_bpf"); its series added
      bpf_link_info.kprobe_multi.missed (e2b2cd592adb), the marker checked here.
    Empty where BTF has no struct bpf_prog_info with the run-time fields."""
    st = "bpf_prog_info"
    if not all(btf.has_member(st, m) for m in ("run_time_ns", "run_cnt")):
        return {}
    out = {"size": btf.struct_size(st), "run_time_ns": btf.member_offset(st, "run_time_ns"),
           "run_cnt": btf.member_offset(st, "run_cnt")}
    if btf.has_member(st, "recursion_misses"):
        out["recursion_misses"] = btf.member_offset(st, "recursion_misses")
        out["misses_raw_tp"] = int(btf.has_func("bpf_prog_inc_misses_counter"))
        out["misses_perf"] = int(btf.has_member("bpf_link_info", "kprobe_multi.missed"))
    return out


@dataclass
class KernelFacts:
    """Everything a start learns from BTF, tracefs and kallsyms: fixed for a boot.

    Facts only; what they mean for a backend is decided in selection.py.
    Worked out from the BTF once per boot and then remembered (BootMemo): reading
    and walking vmlinux's BTF in Python is most of a start's "prepare" step
    (0.4 s on a host, 6-8 s in a TCG guest)."""

    release: str
    defines: dict[str, int]          # every backend's offsets, enum values, AT_HAVE_* flags
    notes: list[str]                 # optional offsets this BTF lacks
    func_defines: dict[str, int]     # offsets only the function hooks read
    func_missing: list[str]          # ... that this BTF lacks: fentry/kprobe cannot run
    func_args: dict[str, int]        # hooked function -> its argument count (absent: not in BTF)
    signatures: dict[str, str]       # hooked function -> its C signature
    tracepoints: dict[str, list[str]]  # hooked tracepoint -> its fields (absent: not here)
    busy: dict[str, int]             # the blind-spot counter's defines ({}: not countable)
    busy_why: str | None             # why not
    kprobes: bool                    # kprobe_events in tracefs (CONFIG_KPROBES)
    prog_info: dict[str, int] = dataclasses.field(default_factory=dict)  # prog_info_facts()
    raw_tracepoints: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> args

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelFacts:
        """The facts as to_json wrote them; ValueError for anything else."""
        try:
            facts = cls(**json.loads(text))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not kernel facts: {exc}") from exc
        for defines in (facts.defines, facts.func_defines, facts.func_args, facts.busy,
                        facts.prog_info, facts.raw_tracepoints):
            if not isinstance(defines, dict):
                raise ValueError("not kernel facts: a table is not a mapping")
            for name, value in defines.items():
                if not isinstance(name, str) or type(value) is not int:
                    raise ValueError(f"not a define: {name}={value!r}")
        for defines in (facts.defines, facts.func_defines, facts.busy):
            for name in defines:
                if not name.isidentifier():
                    raise ValueError(f"not a define: {name}")
        return facts


FACTS_MEMO = "kernel-facts-"


def facts_fingerprint(tracefs: Path) -> str:
    """What the facts depend on besides the boot: this code (kernel.py, btf.py, hooks.py), the
    BTF file read and the tracefs looked at."""
    h = hashlib.sha256()
    for mod in (__file__, Path(__file__).with_name("btf.py"), Path(__file__).with_name("hooks.py")):
        h.update(Path(mod).read_bytes())
    path = btf_path()
    try:
        st = path.stat()
        h.update(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:
        h.update(str(path).encode())
    h.update(str(tracefs).encode())
    return h.hexdigest()[:16]


def compute_facts(tracefs: Path, btf: BTF | None = None) -> KernelFacts:
    """This kernel's facts, from its BTF (``btf``, else loaded now) and tracefs."""
    btf = btf if btf is not None else load_btf()
    defines, notes = resolve_offsets(btf)
    func_defines, func_missing = func_offsets(btf)
    args, sigs = probe_functions(btf)
    busy, why = busy_defines(btf)
    return KernelFacts(
        release=platform.release(), defines=defines, notes=notes, func_defines=func_defines,
        func_missing=func_missing, func_args=args, signatures=sigs,
        tracepoints=probe_tracepoints(tracefs), busy=busy, busy_why=why,
        kprobes=(tracefs / "kprobe_events").exists(), prog_info=prog_info_facts(btf),
        raw_tracepoints=probe_raw_tracepoints(btf))


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
