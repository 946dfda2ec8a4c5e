"""Choosing a backend: from this kernel's facts to a plan, and from plans to a loaded backend.

``plan_backend`` is pure: it decides, from the hook catalogue (hooks.py) and
the kernel's facts (kernel.py), which hooks a backend compiles in and with
which glue, every -D define its program gets, and what the run can and
cannot measure.  ``open_backend`` hands a plan to a loader (bpfloader.py by
default, a fake one in the unit tests); ``choose_backend`` is ``--backend``,
``auto`` trying fentry, then kprobe, then tracepoint by loading each.  Used by
the run loop (runner.py) and by doctor alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import headers, hooks, kernel, stale
from .backend import Backend
from .bootmemo import BootMemo
from .errors import KernelRefused, UserError
from .hist import NBUCKETS
from .hooks import ATTACH_KPROBE, ATTACH_OFF, Hook, Plan
from .layout import H_COUNT

BACKEND_CHOICES = ("auto", "fentry", "kprobe", "tracepoint")
AUTO_ORDER = ("fentry", "kprobe", "tracepoint")
ACK_OVERFLOW_NOTE = (
    "skb:kfree_skb has no TCP_LISTEN_OVERFLOW reason with rx_sk here (Linux 6.15+): "
    "final-ACK overflows cannot be told apart, so ack_dropped and syn_dropped are null"
)
CONN_MAX = 65536
RINGBUF_PAGES = 64
# Test knobs (undocumented for users): a tiny ring buffer or connection map, to overrun
# them on purpose (tests/test_faults.py).  Validated: never pasted into C unchecked.
RINGBUF_PAGES_ENV = "ACCEPTRACE_RINGBUF_PAGES"
CONN_MAX_ENV = "ACCEPTRACE_CONN_MAX"


def _knob(env: str, default: int, lo: int, hi: int, power_of_two: bool) -> int:
    """An integer test knob from the environment; UserError (one line) if it is not one."""
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw.strip(), 10)
    except ValueError:
        v = -1
    if not lo <= v <= hi or (power_of_two and v & (v - 1)):
        want = "a power of two" if power_of_two else "an integer"
        raise UserError(f"{env} must be {want} from {lo} to {hi}, not {raw!r}")
    return v
# Per-target rows (bpf/acceptrace.h): each target slot costs AT_H_COUNT histograms
# per possible CPU.  The programs hold at most MAX_SLOTS targets and never more
# histogram memory than HIST_BUDGET (docs/listeners.md).
HIST_BYTES = 32 + 8 * NBUCKETS        # sizeof(struct at_hist)
HIST_BUDGET = 64 << 20
MAX_SLOTS = 256
ALL_LISTENERS_SLOTS = 64              # a run without --port: room for this many listeners


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs per-CPU maps allocate for ("0-3,8-11" -> 8)."""
    try:
        text = open(path).read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return max(1, n)


def target_capacity(ncpu: int) -> int:
    """The most targets one run can hold on a machine with ``ncpu`` possible CPUs."""
    per_slot = ncpu * H_COUNT * HIST_BYTES
    return max(1, min(MAX_SLOTS, HIST_BUDGET // per_slot))


def test_knobs() -> dict[str, int]:
    """The test knobs' values: a bad one is one line before anything is loaded."""
    return {"AT_CONN_MAX": _knob(CONN_MAX_ENV, CONN_MAX, 1, 1 << 24, False),
            "AT_RINGBUF_PAGES": _knob(RINGBUF_PAGES_ENV, RINGBUF_PAGES, 1, 1 << 16, True)}


def require_root() -> None:
    if os.geteuid() != 0:
        raise UserError(
            "must run as root: loading BPF programs needs CAP_BPF and CAP_PERFMON "
            "(try: sudo acceptrace ...)",
            exit_code=1,
        )


@dataclass
class Prepared:
    """What a start learned before loading anything."""

    facts: kernel.KernelFacts
    header_line: str | None = None
    tracefs_mounted: bool = False
    stale_lines: list[str] = field(default_factory=list)  # probes of killed BCC runs removed


def prepare() -> Prepared:
    """Everything that can fail with a clear message before a program is loaded."""
    require_root()
    test_knobs()
    from .bpfloader import import_bcc  # noqa: PLC0415 - keep bcc out of import time

    import_bcc()
    tracefs, mounted = kernel.ensure_tracefs()
    # A killed earlier run (ours or another BCC tool's) may have left tracefs probes.
    stale_lines = stale.describe(*stale.remove_stale(tracefs))
    facts, _remembered = kernel.kernel_facts(tracefs)
    tree = headers.find_header_tree()
    headers.activate(tree)
    return Prepared(facts=facts, header_line=tree.description if tree.kind == "merged" else None,
                    tracefs_mounted=mounted, stale_lines=stale_lines)


def unavailable(hook: Hook, facts: kernel.KernelFacts) -> str | None:
    """Why this kernel does not have the hook (None: it does)."""
    if hook.kind == "function":
        nargs = facts.func_args.get(hook.point)
        if nargs is None:
            return "is not in this kernel's BTF (inlined or absent)"
        if nargs < hook.min_args:
            return (f"takes {nargs} arguments here, fewer than the {hook.min_args} "
                    "acceptrace reads")
    elif hook.kind == "raw_tracepoint":
        nargs = facts.raw_tracepoints.get(hook.point)
        if nargs is None:
            return "is not a tracepoint of this kernel"
        if nargs < hook.min_args:
            return (f"passes {nargs} arguments here, fewer than the {hook.min_args} "
                    "acceptrace reads")
    elif hook.kind == "tracepoint":
        fields = facts.tracepoints.get(hook.point)
        if fields is None:
            return "is not a tracepoint of this kernel"
        lacking = [f for f in hook.fields if f not in fields]
        if lacking:
            return "has no field " + ", ".join(lacking)
    for define in hook.needs:
        if define not in facts.defines:
            return f"needs {kernel.OPTIONAL_ENUMS.get(define, define)}, not in this kernel's BTF"
    return None


def plan_backend(name: str, facts: kernel.KernelFacts, dispatch: bool,
                 overrides: dict[str, int] | None = None, slots: int = 1) -> Plan:
    """The plan of backend ``name`` on this kernel; UserError (one line) if it cannot run.

    ``overrides``: row -> attach type, for what the kernel refused on a first try
    (the fentry backend's syn_recv_sock rows: ATTACH_KPROBE, or ATTACH_OFF).
    ``slots``: how many targets (namespace, port) the programs hold."""
    if name not in hooks.SOURCES:
        raise UserError(f"no such backend: {name}")
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"slots must be 1..{MAX_SLOTS}, not {slots}")
    overrides = overrides or {}
    if name in hooks.FUNC_BACKENDS and facts.func_missing:
        raise UserError("this kernel's BTF " + "; ".join(facts.func_missing))
    if name == "kprobe" and not facts.kprobes:
        raise UserError("kprobes are not available (no kprobe_events in tracefs: "
                        "the kernel is built without CONFIG_KPROBES)")
    plan = Plan(backend=name, dispatch=dispatch, chosen={}, notes=list(facts.notes),
                prog_info=dict(facts.prog_info))
    refused: list[str] = []

    for h in hooks.rows(backend=name):
        if h.when != "always":
            continue
        if h.replaced_by is not None:
            better = hooks.BY_NAME[h.replaced_by]
            if name in better.backends and unavailable(better, facts) is None:
                continue
        why = unavailable(h, facts)
        if why is None and overrides.get(h.name, h.attach_type(name)) == ATTACH_OFF:
            why = "was refused by this kernel"
        if why is not None:
            if h.is_required(name):
                refused.append(f"{h.point} {why} ({h.why})")
            else:
                plan.missing.append(h.name)
                plan.notes.append(f"{h.point} {why}: {h.why}")
            continue
        plan.chosen[h.name] = overrides.get(h.name, h.attach_type(name))
    if refused:
        hint = (" (the sk_data_ready and sock_recv_length tracepoints appeared in Linux 6.3)"
                if name == "tracepoint" else "")
        raise UserError("this kernel lacks " + "; ".join(refused) + hint)
    if name == "tracepoint" and not plan.ack_overflow_observable:
        plan.notes.append(ACK_OVERFLOW_NOTE)

    # The blind-spot counter: where kallsyms shows the per-CPU busy flags, and the
    # port's packets in busy softirqs where kprobes feed the drop counters.
    if facts.busy_why is None:
        plan.chosen["softirq_entry"] = hooks.BY_NAME["softirq_entry"].attach_type(name)
        if any(t == ATTACH_KPROBE for t in plan.chosen.values()):
            for row in ("softirq_exit", "netif_receive_skb"):
                plan.chosen[row] = hooks.BY_NAME[row].attach_type(name)
    else:
        plan.notes.append(f"softirqs_busy not counted: {facts.busy_why}")
    base = {**facts.defines, **test_knobs(), "AT_SLOTS": slots}
    if name in hooks.FUNC_BACKENDS:
        base.update(facts.func_defines)
    if plan.busy_counted:
        base.update(facts.busy)
        base["AT_HAVE_KSYM_CURRENT_KPROBE"] = int("AT_KSYM_CURRENT_KPROBE" in facts.busy)
    plan.base_defines = base
    plan.slots = slots
    # catalogue order, whatever order the rows were decided in
    order = [h.name for h in hooks.CATALOGUE]
    plan.chosen = dict(sorted(plan.chosen.items(), key=lambda kv: order.index(kv[0])))
    return plan


class Loader(Protocol):
    """Compiles and attaches a plan: bpfloader.load, or a fake in the unit tests."""

    def __call__(self, plan: Plan) -> Backend: ...


def _bpf_loader() -> Loader:
    from . import bpfloader  # noqa: PLC0415 - bcc only when a program is loaded

    return bpfloader.load


def open_backend(name: str, prep: Prepared, dispatch: bool,
                 loader: Loader | None = None, slots: int = 1) -> Backend:
    """Plan and load one backend; UserError (one line) when this kernel refuses it."""
    load = loader or _bpf_loader()
    if name == "fentry":
        return _open_fentry(prep.facts, dispatch, load, slots)
    return load(plan_backend(name, prep.facts, dispatch, slots=slots))


SYN_RECV_ROWS = ("tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock")
FENTRY_REFUSED = "fentry-refused"
SYN_RECV_REFUSED = "fexit-syn-recv-refused"


def _open_fentry(facts: kernel.KernelFacts, dispatch: bool, load: Loader,
                 slots: int = 1) -> Backend:
    """The fentry backend, with the kernel's refusals remembered for the boot.

    tcp_v{4,6}_syn_recv_sock takes 7 arguments since a 2026 stable backport; x86
    trampolines carried at most 6 before Linux 6.6 (473e3150e30a).  Try, then plan
    those two rows again as kprobes (or, without kprobes, as not hooked).  A kernel
    that refused fentry programs as such (a policy, no trampolines) refuses them
    until reboot: --backend auto then falls back without compiling again.
    """
    policy = BootMemo(FENTRY_REFUSED)
    if (why := policy.get()) is not None:
        raise UserError(why + " (remembered since an earlier start in this boot)")

    def attempt(plan: Plan) -> Backend:
        try:
            return load(plan)
        except KernelRefused as exc:
            policy.put(str(exc))
            raise

    plan = plan_backend("fentry", facts, dispatch, slots=slots)
    syn_recv = [r for r in SYN_RECV_ROWS if r in plan.chosen]
    if not syn_recv:
        return attempt(plan)
    memo = BootMemo(SYN_RECV_REFUSED)
    first = memo.get()
    if first is None:
        try:
            return attempt(plan)
        except KernelRefused:
            raise
        except UserError as exc:
            first = str(exc)
            # The kernel's answer cannot change before a reboot: the next start
            # skips this compile (under TCG, half of a fentry start on 6.1).
            memo.put(first)
    glue = ATTACH_KPROBE if facts.kprobes else ATTACH_OFF
    plan = plan_backend("fentry", facts, dispatch, {r: glue for r in syn_recv}, slots)
    plan.notes.append(f"fexit on tcp_v4_syn_recv_sock refused ({first})")
    plan.notes.append("tcp_v{4,6}_syn_recv_sock hooked with kretprobes instead" if glue
                      else "no kprobes either: final-ACK drops are not counted (null)")
    return attempt(plan)


def choose_backend(choice: str, prep: Prepared, dispatch: bool, say: Callable[[str], None],
                   loader: Loader | None = None, slots: int = 1) -> Backend:
    """--backend NAME, or auto: fentry, then kprobe, then tracepoint, by loading each."""
    if choice not in BACKEND_CHOICES:
        raise UserError(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, not {choice!r}")
    if choice != "auto":
        try:
            return open_backend(choice, prep, dispatch, loader, slots)
        except UserError as exc:
            raise UserError(f"the {choice} backend cannot run here: {exc}") from None
    refused: list[str] = []
    for name in AUTO_ORDER:
        try:
            backend = open_backend(name, prep, dispatch, loader, slots)
        except UserError as exc:
            refused.append(f"{name}: {exc}")
            say(f"{name} backend unavailable ({exc}); falling back")
            continue
        backend.notes[:0] = [f"backend auto: {r}" for r in refused]
        return backend
    raise UserError("no backend can run on this kernel: " + "; ".join(refused))
