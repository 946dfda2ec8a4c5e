"""Loading and reading the BPF programs: the only module that imports bcc.

It compiles the source a plan names (selection.Plan) with the plan's defines,
attaches what BCC does not attach by itself (the kprobe glue), and reads the
maps back into backend.KernelSnapshot; it decides nothing but what the kernel
refused.
"""

from __future__ import annotations

import ctypes as ct
import errno
import importlib.resources
import operator
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import bpfstats
from . import layout as L
from .backend import ConnRecord, KernelSnapshot, ListenerSnapshot, ProcSnapshot, TargetSnapshot
from .errors import KernelRefused, UserError
from .hist import NBUCKETS, Histogram
from .hooks import ATTACH_KPROBE, Plan
from .kernel import cflags
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
    L.C_CREATED: "created",
}
HIST_NAMES: dict[int, tuple[str, str, int]] = {
    L.H_HANDSHAKE: ("handshake", "us", 1000),
    L.H_ACCEPT_QUEUE: ("accept_queue", "us", 1000),
    L.H_SYN_TO_ACCEPT: ("syn_to_accept", "us", 1000),
    L.H_ACCEPT_TO_READ: ("accept_to_read", "us", 1000),
    L.H_ACCEPTQ_DEPTH: ("accept_queue_depth", "connections", 1),
    L.H_SYNQ_DEPTH: ("syn_queue_depth", "connections", 1),
    L.H_READ_TO_RESPONSE: ("read_to_response", "us", 1000),
    L.H_SYN_TO_RESPONSE: ("syn_to_response", "us", 1000),
}
DISPATCH_HIST_NAMES: dict[int, tuple[str, str, int]] = {
    L.H_ACCEPT_TO_DISPATCH: ("accept_to_dispatch", "us", 1000),
    L.H_READ_TO_DISPATCH: ("read_to_dispatch", "us", 1000),
    L.H_SYN_TO_DISPATCH: ("syn_to_dispatch", "us", 1000),
    L.H_DISPATCH_TO_RESPONSE: ("dispatch_to_response", "us", 1000),
}
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


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([\w.-]+\.bpf\.h)"\s*$')


def translation_unit(directory: Path, name: str, _stack: tuple[str, ...] = ()) -> str:
    """bpf/<name> with our own ``#include "*.bpf.h"`` lines replaced by the headers'
    text, with #line markers (compiler messages keep their file and line).

    BCC rewrites map operations (``conns.lookup(...)``) only in the main file it
    compiles: the shared logic in the headers must reach it as main-file text.
    Every occurrence is expanded (an include may sit under an #if; the headers'
    guards drop repeats); only files shipped beside the source are."""
    stack = (*_stack, name)
    out: list[str] = [f'#line 1 "{name}"']
    for n, line in enumerate((directory / name).read_text().splitlines(), start=1):
        m = _INCLUDE.match(line)
        if m is None:
            out.append(line)
            continue
        header = m.group(1)
        if header in stack or not (directory / header).is_file():
            raise ValueError(f"{name}:{n}: cannot include {header}")
        out.append(translation_unit(directory, header, stack))
        out.append(f'#line {n + 1} "{name}"')
    return "\n".join(out)


def _compile(src_name: str, flags: list[str]) -> Any:
    """Compile bpf/<src_name> (shipped in the package) with BCC and load it."""
    bcc = import_bcc()
    res = importlib.resources.files("acceptrace.bpf")
    with importlib.resources.as_file(res / src_name) as src, _CaptureFd2() as cap:
        src_path = Path(src)
        text = translation_unit(src_path.parent, src_path.name)
        try:
            return bcc.BPF(text=text.encode(), cflags=[f"-I{src_path.parent}", *flags])
        except Exception as exc:  # bcc raises plain Exception
            detail = cap.first_error() or str(exc)
    if "super-user" in detail and os.geteuid() == 0:
        # BCC's wording for EPERM; as root that is a policy, not a missing privilege.
        raise KernelRefused(
            f"BPF program {src_name} failed to load: EPERM although running as root: a "
            "kernel security policy (lockdown, an LSM) refuses this program type")
    raise UserError(f"BPF program {src_name} failed to load: {detail}")


# Calls that sleep (accept, recvmsg): a kretprobe instance per sleeping task.
KRETPROBE_MAXACTIVE = 512


def load(plan: Plan) -> BccBackend:
    """Compile ``plan``'s source with its defines, load it, attach it (selection.Loader).

    KernelRefused when the kernel refuses the program type as such."""
    if plan.backend == "fentry" and not import_bcc().BPF.support_kfunc():
        raise KernelRefused("BCC or the kernel lacks fentry (BPF trampoline) support")
    return BccBackend(plan, _compile(plan.source, cflags(plan.defines())))


class BccBackend:
    """One compiled bpf/<backend>.bpf.c, attached as its plan says (selection.Plan)."""

    def __init__(self, plan: Plan, bpf: Any) -> None:
        self.plan = plan
        self.name = plan.backend
        self.dispatch = plan.dispatch
        self.notes = plan.notes
        self.dispatch_targets: list[DispatchTarget] = []
        self.hooks: list[str] = []
        self.defines = plan.defines()
        self.slots = plan.slots
        self._pending: list[ConnRecord] = []
        self._ports: set[int] = set()
        self._slots_used: set[int] = set()
        # rows whose counters moved in one of the last two snapshots: their
        # histograms are read again (a program counts, then adds to a histogram)
        self._dirty: dict[int, int] = {}
        self._last_rows: dict[int, tuple[int, ...]] = {}
        self._last_hists: dict[int, dict[str, Histogram]] = {}
        self.bpf: Any = bpf
        self._stats: bpfstats.StatsSwitch | None = None
        self.stats_how: str | None = None
        self.stats_why: str | None = "this kernel's BTF has no bpf_prog_info run-time fields"
        try:
            self._attach()
            if plan.prog_info:
                # The kernel times our programs from here on (off again at close()).
                self._stats = bpfstats.StatsSwitch.on()
                self.stats_how, self.stats_why = self._stats.how, self._stats.why
            self.hooks = plan.points()
            self._hists = self.bpf.get_table("hists")
            self._counters = self.bpf.get_table("counters")
            # per-CPU values: one slot per possible CPU (what the kernel copies out)
            self._ncpu = len(_bcc.utils.get_possible_cpus())
            self._procs = self.bpf.get_table("procs")
            self._listeners = self.bpf.get_table("listeners")
            self._sample_min = self.bpf.get_table("sample_min")
            self._targets = self.bpf.get_table("targets")
            self._watched = self.bpf.get_table("watched_ports")
            self.bpf["samples"].open_ring_buffer(self._on_sample)
        except BaseException:
            self.close()
            raise

    # What the session reads of the plan (backend.Backend).
    @property
    def exact_drops(self) -> bool:
        return self.plan.exact_drops

    @property
    def ack_overflow_observable(self) -> bool:
        return self.plan.ack_overflow_observable

    @property
    def missing_stages(self) -> set[str]:
        return self.plan.missing_stages

    @property
    def busy_counted(self) -> bool:
        return self.plan.busy_counted

    @property
    def unseen_counted(self) -> bool:
        return self.plan.unseen_counted

    def misses_counted(self, label: str) -> bool:
        return self.plan.misses_counted(label)

    def time_programs(self, on: bool) -> bool:
        """Turn the kernel's timing of BPF programs on or off (it slows every BPF program
        on the host while on); returns whether our programs are timed from now on."""
        if self._stats is None or self.stats_how is None:
            return False
        return self._stats.resume() if on else self._stats.pause()

    def program_stats(self) -> dict[str, bpfstats.ProgStats]:
        """Each attached program's statistics, by attach point; {} when off."""
        if self._stats is None or self.stats_how is None:
            return {}
        out: dict[str, bpfstats.ProgStats] = {}
        attached = set(self.hooks)
        for fname, fn in list(self.bpf.funcs.items()):
            label = _program_label(fname.decode() if isinstance(fname, bytes) else str(fname),
                                   self.plan)
            if label is None or not (label in attached or label.startswith("uprobe:")):
                continue
            try:
                st = bpfstats.prog_stats(int(fn.fd), self.plan.prog_info)
            except OSError:
                continue
            have = out.get(label)
            out[label] = st if have is None else have.plus(st)
        return out

    def _attach(self) -> None:
        """Attach the kprobe glue (BCC attached the rest when it loaded the program)."""
        for hook, glue in self.plan.rows():
            if glue != ATTACH_KPROBE:
                continue
            entry, ret = hook.kprobe_programs()
            try:
                with _CaptureFd2():
                    if entry:
                        self.bpf.attach_kprobe(event=hook.point.encode(), fn_name=entry.encode())
                    if ret:
                        self.bpf.attach_kretprobe(
                            event=hook.point.encode(), fn_name=ret.encode(),
                            maxactive=KRETPROBE_MAXACTIVE if hook.sleeps else 0)
            except Exception as exc:  # bcc raises plain Exception
                msg = _first_line(exc)
                if hook.is_required(self.name) or hook.vital:
                    raise UserError(f"kprobe on {hook.point} failed: {msg}") from exc
                self.plan.lose(hook.name, f"kprobe on {hook.point} failed ({msg}): {hook.why}")

    def set_targets(self, targets: dict[tuple[int, int], int]) -> None:
        """Trace the listeners of these (network namespace inode, port) pairs, from now
        on, each in its target slot."""
        want = {(int(ns), int(port)): int(slot) for (ns, port), slot in targets.items()}
        for slot in want.values():
            if not 0 <= slot < self.slots:
                raise ValueError(f"target slot {slot} outside 0..{self.slots - 1}")
        for k in list(self._targets.keys()):
            if (int(k.netns), int(k.port)) not in want:
                del self._targets[k]
        for (ns, port), slot in want.items():
            self._targets[self._targets.Key(netns=ns, port=port, pad=0)] = ct.c_uint32(slot)
        self._slots_used |= set(want.values())
        ports = {port for _, port in want}
        for port in self._ports - ports:
            self._watched[ct.c_int(port)] = ct.c_uint8(0)
        for port in ports:
            self._watched[ct.c_int(port)] = ct.c_uint8(1)
        self._ports = ports

    # -- ring buffer -------------------------------------------------------------
    def _on_sample(self, _ctx: Any, data: Any, _size: int) -> None:
        s = ct.cast(data, ct.POINTER(L.AtSample)).contents
        self._pending.append(_record(s.conn))

    def in_flight(self) -> list[ConnRecord]:
        """The connections accepted but not sent yet -- their story still open (no
        response or close) when the run ended -- from the per-connection map, for the
        session to keep those slow enough for its slowest list.  Read once, at the end."""
        return [_record(c) for c in self.bpf["conns"].values()
                if c.accepted_ns and c.queued_ns and not c.sampled]

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
                               fn_name=b"on_dispatch_uprobe")
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

    def set_sample_threshold(self, slot: int, total_ns: int) -> None:
        self._sample_min[ct.c_int(slot)] = ct.c_uint64(max(0, int(total_ns)))

    # -- maps ------------------------------------------------------------------------
    def _read_hist(self, index: int, unit: str, scale: int) -> Histogram:
        percpu = self._hists[ct.c_int(index)]
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
            for i, n in enumerate(h.buckets):
                if n:
                    buckets[i] += n
        return Histogram.from_kernel(unit, count, total, lo or 0, hi, buckets, scale)

    def _counter_rows(self) -> dict[int, tuple[int, ...]]:
        """Every row of the counters array, summed over CPUs: one batch lookup where the
        kernel has it (5.6+), else one lookup per entry."""
        sums = _percpu_u64_sums(self._counters.map_fd, (self.slots + 1) * L.C_COUNT,
                                self._ncpu)
        if sums is not None:
            return {slot: tuple(sums[L.counter_index(slot, 0):
                                     L.counter_index(slot, 0) + L.C_COUNT])
                    for slot in sorted(self._slots_used) + [self.slots]}
        flat: dict[int, int] = {}
        for slot in sorted(self._slots_used) + [self.slots]:
            for cid in COUNTER_NAMES:
                i = L.counter_index(slot, cid)
                flat[i] = int(sum(self._counters[ct.c_int(i)]))
        return {slot: tuple(flat.get(L.counter_index(slot, cid), 0) for cid in range(L.C_COUNT))
                for slot in sorted(self._slots_used) + [self.slots]}

    def ack_overflows(self) -> dict[int, int]:
        rows = self._counter_rows()
        return {slot: rows[slot][L.C_ACK_OVERFLOW] for slot in sorted(self._slots_used)}

    def snapshot(self, full: bool = False) -> KernelSnapshot:
        """The kernel's aggregates now.  A target's histograms are read only when its
        counters moved in this or the previous snapshot (or ``full``): every program
        that adds to a histogram also counts in the same row, so an idle listener's
        histograms are those already read, and 50 idle listeners cost 50 rows of
        counters, not 500 histogram lookups."""
        names = dict(HIST_NAMES)
        if self.dispatch:
            names.update(DISPATCH_HIST_NAMES)
        rows = self._counter_rows()
        snap = KernelSnapshot(counters={
            name: rows[self.slots][cid] for cid, name in COUNTER_NAMES.items()})
        for slot in sorted(self._slots_used):
            row = rows[slot]
            if row != self._last_rows.get(slot):
                self._dirty[slot] = 2
            if not any(row) and not full:
                # nothing counted in this row yet: nothing added to its histograms
                if slot not in self._last_hists:
                    self._last_hists[slot] = {name: Histogram.empty(unit)
                                              for name, unit, _ in names.values()}
            elif full or self._dirty.get(slot, 0) > 0 or slot not in self._last_hists:
                self._last_hists[slot] = {
                    name: self._read_hist(L.hist_index(slot, hid), unit, scale)
                    for hid, (name, unit, scale) in names.items()}
                self._dirty[slot] = self._dirty.get(slot, 0) - 1
            self._last_rows[slot] = row
            snap.targets[slot] = TargetSnapshot(
                hists=dict(self._last_hists[slot]),
                counters={name: row[cid] for cid, name in COUNTER_NAMES.items()},
            )
        for k, v in self._procs.items():
            t = snap.targets.get(int(k.slot))
            if t is not None:
                t.procs.append(
                    ProcSnapshot(int(k.tgid), v.comm.decode(errors="replace"), int(v.accepted)))
        for k, v in self._listeners.items():
            t = snap.targets.get(int(v.slot))
            if t is not None:
                t.listeners.append(
                    ListenerSnapshot(
                        int(k.value), int(v.family), int(v.port), int(v.max_backlog),
                        int(v.max_depth), int(v.ino)
                    )
                )
        return snap

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            bpf.cleanup()
            self.bpf = None
        stats = getattr(self, "_stats", None)
        if stats is not None:
            stats.close()
            self._stats = None


def _percpu_u64_sums(map_fd: int, n: int, ncpu: int) -> list[int] | None:
    """Entries 0..n-1 of a per-CPU array of u64, each summed over the CPUs, in one
    BPF_MAP_LOOKUP_BATCH (Linux 5.6+) into a flat buffer summed at C speed; None
    where the kernel cannot (the caller then looks entries up one by one).  BCC's
    own items_lookup_batch() builds a Python object per entry and CPU: 1 122
    entries (50 listeners) a tick cost more than the rest of the tick."""
    lib = _bcc.libbcc.lib
    keys = (ct.c_uint32 * n)()
    vals = (ct.c_uint64 * (n * ncpu))()
    batch = ct.c_uint32(0)
    total = 0
    while total < n:
        cnt = ct.c_uint32(n - total)
        res = lib.bpf_lookup_batch(map_fd, ct.byref(batch) if total else None,
                                   ct.byref(batch), ct.byref(keys, 4 * total),
                                   ct.byref(vals, 8 * ncpu * total), ct.byref(cnt))
        err = ct.get_errno()
        total += cnt.value
        if res != 0:
            if err != errno.ENOENT:
                return None
            break
        if cnt.value == 0:
            break
    # An array's batch lookup walks its keys in order: entry i is at i.
    if total != n or any(keys[i] != i for i in (0, n - 1)):
        return None
    flat = memoryview(vals).cast("B").cast("Q").tolist()
    sums = flat[0::ncpu]
    for cpu in range(1, ncpu):
        sums = list(map(operator.add, sums, flat[cpu::ncpu]))
    return sums


# BCC's names of the programs it loads itself (TRACEPOINT_PROBE, RAW_TRACEPOINT_PROBE,
# KFUNC_PROBE, KRETFUNC_PROBE) -> the attach-point prefix meta.hooks uses.
_AUTOLOAD = (("tracepoint__", "tracepoint"), ("raw_tracepoint__", "raw_tracepoint"),
             ("kfunc__vmlinux__", "fentry"), ("kretfunc__vmlinux__", "fexit"),
             ("kfunc__", "fentry"), ("kretfunc__", "fexit"))


def _program_label(fname: str, plan: Plan) -> str | None:
    """The attach point (as meta.hooks names it) of the program BCC loaded as ``fname``."""
    for prefix, kind in _AUTOLOAD:
        if fname.startswith(prefix):
            rest = fname[len(prefix):]
            return f"{kind}:{rest.replace('__', ':', 1)}" if kind == "tracepoint" else \
                f"{kind}:{rest}"
    for hook, _glue in plan.rows():
        entry, ret = hook.kprobe_programs()
        if fname == entry:
            return f"kprobe:{hook.point}"
        if fname == ret:
            return f"kretprobe:{hook.point}"
    if fname == "on_dispatch_uprobe":
        return "uprobe:dispatch"
    return None


def _record(c: Any) -> ConnRecord:
    """A ConnRecord from the kernel's struct at_conn (bpf/acceptrace.h)."""

    def ts(v: int) -> int | None:
        return int(v) or None

    syn_seen = bool(c.flags & L.CONN_SYN_SEEN)
    return ConnRecord(
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
        slot=int(c.slot),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

