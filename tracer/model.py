"""The data model of one run (schema ``acceptrace/v1``), separate from any renderer.

``Run.to_json()``/``Run.from_json()`` round-trip exactly; docs/schema.md
documents every field.  ``None`` (JSON null) always means "this backend
cannot observe it", never zero.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from .hist import Histogram

T = TypeVar("T")
SCHEMA = "acceptrace/v1"
KERNEL_STAGES: tuple[str, ...] = ("handshake", "accept_queue", "syn_to_accept", "accept_to_read")
# Any TCP server, kernel-side: the first read to the first byte written back.
RESPONSE_STAGES: tuple[str, ...] = ("read_to_response", "syn_to_response")
DISPATCH_STAGES: tuple[str, ...] = (
    "accept_to_dispatch", "read_to_dispatch", "syn_to_dispatch", "dispatch_to_response",
)
STAGES: tuple[str, ...] = KERNEL_STAGES + RESPONSE_STAGES + DISPATCH_STAGES
CONNECTION_KEYS = ("syn", "queued", "accepted", "read", "responded")
DROP_KEYS = (
    "listen_overflow", "syn_dropped", "ack_dropped", "synack_retransmits", "syncookies",
    "lost_events",
    # Counted at the kernel's decision points (fentry/kprobe backends; null otherwise):
    "syn_dropped_acceptq_full", "syn_dropped_synq_full", "syncookies_sent",
    "ack_dropped_acceptq_full", "listen_drops_other",
)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write beside ``path`` and rename over it: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hist_json(h: Histogram | None) -> dict | None:
    return None if h is None else h.to_json()


def _hist_from(d: Any, what: str = "histogram") -> Histogram | None:
    if d is None:
        return None
    try:
        return Histogram.from_json(_object(d, what))
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


# -- reading a report: every value checked ----------------------------------------------
#
# A report is read from a file anyone may hand over (a truncated copy, another tool's
# JSON, a hostile one): every value is checked against the type its field has and
# against the range acceptrace writes, so that a Run read back renders without
# surprises, and a bad file is one ValueError naming the field.

MAX_REPORT_BYTES = 64 << 20   # far above what a run writes (docs/schema.md, "Limits")
MAX_COUNT = (1 << 64) - 1     # the kernel's counters are u64
MAX_NUMBER = 1e19             # durations in us, seconds: above any u64 of ns
MAX_STRING = 1 << 16
MAX_ITEMS = 1 << 20           # entries of one list or object


def _bad(what: str, v: Any, want: str) -> ValueError:
    shown = repr(v)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ValueError(f"{what} must be {want}, not {shown}")


def _count(v: Any, what: str) -> int:
    """A non-negative integer (a count, a pid, an inode)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
        raise _bad(what, v, "a non-negative integer")
    return v


def _number(v: Any, what: str) -> float | int:
    """A finite, non-negative number (a duration, a percentile, a sum)."""
    if (isinstance(v, bool) or not isinstance(v, (int, float))
            or not (0 <= v <= MAX_NUMBER) or (isinstance(v, float) and not math.isfinite(v))):
        raise _bad(what, v, "a finite non-negative number")
    return v


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_STRING:
        raise _bad(what, v, f"a string (at most {MAX_STRING} characters)")
    return v


def _flag(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(what, v, "true or false")
    return v


def _items(v: Any, what: str) -> list:
    if not isinstance(v, list) or len(v) > MAX_ITEMS:
        raise _bad(what, v, "a list")
    return v


def _object(v: Any, what: str) -> dict:
    if not isinstance(v, dict) or len(v) > MAX_ITEMS:
        raise _bad(what, v, "an object")
    return v


def _opt_int(v: Any, what: str) -> int | None:
    if v is None:
        return None
    try:
        return _count(v, what)
    except ValueError:
        raise _bad(what, v, "a non-negative integer or null") from None


def _opt_number(v: Any, what: str) -> float | int | None:
    if v is None:
        return None
    try:
        return _number(v, what)
    except ValueError:
        raise _bad(what, v, "a finite non-negative number or null") from None


def _counts(v: Any, what: str) -> dict[str, int | None]:
    return {_text(k, what): _opt_int(x, f"{what}.{k}") for k, x in _object(v, what).items()}


def _netns(v: Any, what: str) -> dict | None:
    if v is None:
        return None
    d = _object(v, what)
    for k, x in d.items():
        if k in ("inode", "pid"):
            _opt_int(x, f"{what}.{k}")
        elif k == "name":
            _text(x, f"{what}.{k}")
    return d


def _interval_stages(v: Any, what: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, st in _object(v, what).items():
        here = f"{what}.{_text(name, what)}"
        out[name] = {k: _opt_number(x, f"{here}.{k}")
                     for k, x in _object(st, here).items() if k in ("count", "p50", "p99")}
    return out


# Each field's declared type (the annotation's text) -> how a read value is checked.
_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "int": _count,
    "int | None": _opt_int,
    "float": _number,
    "float | None": _opt_number,
    "str": _text,
    "str | None": lambda v, w: None if v is None else _text(v, w),
    "bool": _flag,
    "list[str]": lambda v, w: [_text(x, f"{w}[]") for x in _items(v, w)],
    "list[int]": lambda v, w: [_count(x, f"{w}[]") for x in _items(v, w)],
    "list[dict]": lambda v, w: [_netns(x, f"{w}[]") or {} for x in _items(v, w)],
    "dict | None": _netns,
    "dict[str, dict[str, Any]]": _interval_stages,
    "dict[str, int]": lambda v, w: {_text(k, w): _count(x, f"{w}.{k}")
                                    for k, x in _object(v, w).items()},
}


def _known_fields(cls: type[T], d: Any, what: str) -> T:
    """Build dataclass ``cls`` from ``d``, every known field checked against its declared
    type; keys a later version added are ignored."""
    d = _object(d, what)
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in d:
            check = _CHECKS.get(str(f.type))
            if check is None:  # a field of a type nobody taught the reader: a bug here
                raise TypeError(f"{cls.__name__}.{f.name}: no check for {f.type}")
            kwargs[f.name] = check(d[f.name], f"{what}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = re.findall(r"'(\w+)'", str(exc))
        raise ValueError(f"{what}: missing field " + ", ".join(missing)
                         if "missing" in str(exc) else f"{what}: {exc}") from None


@dataclass
class Meta:
    port: int
    backend: str
    kernel: str = ""
    started: str = ""
    duration_s: float = 0.0
    version: str = ""
    hostname: str = ""
    interval_s: float = 1.0
    hooks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    somaxconn: int | None = None  # net.core.somaxconn of the traced namespace
    # that namespace's net.ipv4.tcp_abort_on_overflow, tcp_syncookies, tcp_max_syn_backlog
    # as of the run's start ({} over several namespaces, or from an older acceptrace)
    sysctls: dict[str, int] = field(default_factory=dict)
    # the traced network namespace: {"inode", "name", "pid"}; its kernel figures are these
    # (null at the top of a run over several namespaces: each target names its own)
    netns: dict | None = None
    ports: list[int] = field(default_factory=list)  # --port as given; [] every listener
    all_listeners: bool = False     # no --port: every TCP listener of the namespaces
    all_namespaces: bool = False    # --all-namespaces
    namespaces: list[dict] = field(default_factory=list)  # every namespace traced

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Meta:
        m = _known_fields(cls, d, "meta")
        for port in (m.port, *m.ports):
            if not 0 <= port <= 65535:
                raise ValueError(f"meta.port must be a port number, not {port!r}")
        return m


@dataclass
class Listener:
    family: str
    address: str
    port: int
    backlog: int | None = None
    max_depth: int | None = None
    inode: int | None = None      # the listening socket's inode (ss -e ino:, /proc/PID/fd)
    depth_now: int | None = None  # accept-queue depth at the end of the run (ss Recv-Q)


@dataclass
class Queues:
    backlog: int | None = None
    accept_queue_depth: Histogram | None = None
    syn_queue_depth: Histogram | None = None
    listeners: list[Listener] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "backlog": self.backlog,
            "accept_queue_depth": _hist_json(self.accept_queue_depth),
            "syn_queue_depth": _hist_json(self.syn_queue_depth),
            "listeners": [asdict(lst) for lst in self.listeners],
        }

    @classmethod
    def from_json(cls, d: Any) -> Queues:
        d = _object(d, "queues")
        return cls(
            backlog=_opt_int(d.get("backlog"), "queues.backlog"),
            accept_queue_depth=_hist_from(d.get("accept_queue_depth"),
                                          "queues.accept_queue_depth"),
            syn_queue_depth=_hist_from(d.get("syn_queue_depth"), "queues.syn_queue_depth"),
            listeners=[_known_fields(Listener, x, "queues.listeners[]")
                       for x in _items(d.get("listeners", []), "queues.listeners")],
        )


@dataclass
class ProcessCount:
    """A process that called accept() on the port.  ``comm``: its program (the main
    thread's name, not the accepting thread's); ``server``: which server it is
    (tracer/servers.py ``SERVER_NAMES``; null in reports written before it existed),
    ``worker_class``: gunicorn's worker class when known."""

    pid: int
    comm: str
    accepted: int
    server: str | None = None
    worker_class: str | None = None


@dataclass
class Sample:
    """One of the slowest connections; saddr/sport the client, daddr/dport the server."""

    family: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    pid: int | None
    comm: str | None
    syncookie: bool
    synack_retransmits: int
    handshake_us: float | None
    accept_queue_us: float | None
    syn_to_accept_us: float | None
    accept_to_read_us: float | None
    total_us: float | None
    accept_to_dispatch_us: float | None = None
    read_to_dispatch_us: float | None = None
    syn_to_dispatch_us: float | None = None
    dispatch_to_response_us: float | None = None
    requests: int | None = None
    # the first byte written back after the first read (any server)
    read_to_response_us: float | None = None
    syn_to_response_us: float | None = None
    # fentry/kprobe: client SYNs before the one that got through, and how long
    # that took (first SYN -> that SYN); None when the first SYN was not seen.
    syn_retransmits: int | None = None
    syn_retry_us: float | None = None



@dataclass
class Interval:
    """Deltas over one --interval: counts, drops, and per-stage percentiles."""

    t_s: float
    duration_s: float
    queued: int
    accepted: int
    read: int
    listen_overflow: int | None
    synack_retransmits: int
    accept_queue_depth_max: int | None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    syn: int | None = None                    # SYN times observed
    syn_dropped: int | None = None
    syncookies: int = 0
    syn_queue_depth_max: int | None = None
    accept_queue_depth_now: int | None = None  # ss Recv-Q summed over listeners, at the end
    dispatched: int | None = None
    synq_dropped: int | None = None            # SYN queue full, no syncookies (fentry/kprobe)
    responded: int | None = None               # first responses (null: no send hook)

    def then(self, later: Interval) -> Interval:
        """This interval and the ``later`` one after it as one: counts added exactly,
        maxima the larger, the depth now the later one's, and each stage's p50/p99 the
        larger of the two -- an upper bound of the pair's (at least half of each is at
        or below its own p50, so at least half of both is at or below the larger)."""
        def add(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        def top(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else max(a, b)

        stages: dict[str, dict[str, Any]] = {}
        for name in list(self.stages) + [n for n in later.stages if n not in self.stages]:
            a, b = self.stages.get(name, {}), later.stages.get(name, {})
            stages[name] = {"count": (a.get("count") or 0) + (b.get("count") or 0),
                            "p50": top(a.get("p50"), b.get("p50")),
                            "p99": top(a.get("p99"), b.get("p99"))}
        return Interval(
            t_s=later.t_s, duration_s=round(self.duration_s + later.duration_s, 3),
            queued=self.queued + later.queued, accepted=self.accepted + later.accepted,
            read=self.read + later.read,
            listen_overflow=add(self.listen_overflow, later.listen_overflow),
            synack_retransmits=self.synack_retransmits + later.synack_retransmits,
            accept_queue_depth_max=top(self.accept_queue_depth_max,
                                       later.accept_queue_depth_max),
            stages=stages, syn=add(self.syn, later.syn),
            syn_dropped=add(self.syn_dropped, later.syn_dropped),
            syncookies=self.syncookies + later.syncookies,
            syn_queue_depth_max=top(self.syn_queue_depth_max, later.syn_queue_depth_max),
            accept_queue_depth_now=later.accept_queue_depth_now,
            dispatched=add(self.dispatched, later.dispatched),
            synq_dropped=add(self.synq_dropped, later.synq_dropped),
            responded=add(self.responded, later.responded),
        )


# A run keeps at most this many intervals: beyond, each two neighbours are merged into
# one (Interval.then), so a run of days keeps a bounded report and memory, with the
# older intervals coarser (docs/schema.md, "intervals").
MAX_INTERVALS = 1024


def halve_intervals(ivs: list[Interval]) -> list[Interval]:
    """Each two neighbours as one (an odd last one stays as it is)."""
    out = [a.then(b) for a, b in zip(ivs[0::2], ivs[1::2])]
    if len(ivs) % 2:
        out.append(ivs[-1])
    return out



@dataclass
class ProgramCost:
    """One of acceptrace's BPF programs, over the run, as the kernel counted it."""

    hook: str                 # its attach point, as meta.hooks names it
    runs: int                 # runs (timed while the kernel's statistics were on)
    run_time_ns: int          # their total time in the kernel
    missed: int | None        # runs the kernel skipped (null: not counted for this attach type)
    feeds: list[str] = field(default_factory=list)  # the figures (counters, stages) it feeds

    @property
    def ns_per_run(self) -> float | None:
        return self.run_time_ns / self.runs if self.runs else None


@dataclass
class Cost:
    """What tracing cost, measured by the kernel and by acceptrace itself (docs/schema.md).

    ``stats``: what turned the kernel's BPF statistics on ("BPF_ENABLE_STATS",
    "kernel.bpf_stats_enabled", "already on"), null when they could not be (``why``):
    then ``programs`` is empty and only the userspace figures are known.

    The kernel times the programs during one interval in ``--cost-every`` (timing slows
    every BPF program on the host): ``programs``' runs and times are those of the timed
    intervals, ``timed_seconds`` long with ``timed_connections`` in them, and the
    per-second and per-connection figures are taken over those; ``missed`` (skipped
    runs) is counted by the kernel all the time, over the whole run.  Null timed_*
    (files before they existed): the whole run was timed."""

    stats: str | None
    seconds: float                       # the wall time over which it was measured
    programs: list[ProgramCost] = field(default_factory=list)
    user_cpu_s: float = 0.0              # acceptrace's own CPU (all its threads)
    peak_rss_kib: int = 0
    connections: int = 0                 # traced connections over the same time
    virtual_machine: bool = False        # figures include a hypervisor's overhead
    why: str | None = None
    timed_seconds: float | None = None   # of ``seconds``, the time the programs were timed
    timed_connections: int | None = None  # of ``connections``, those made in that time

    @property
    def timed_s(self) -> float:
        """The time the programs were timed (all of it in files before timed_seconds)."""
        return self.seconds if self.timed_seconds is None else self.timed_seconds

    @property
    def timed_conns(self) -> int:
        """The connections in that time (likewise)."""
        return self.connections if self.timed_connections is None else self.timed_connections

    @property
    def kernel_ns(self) -> int:
        return sum(p.run_time_ns for p in self.programs)

    @property
    def runs(self) -> int:
        return sum(p.runs for p in self.programs)

    def per_second(self, x: float) -> float | None:
        return x / self.seconds if self.seconds > 0 else None

    @property
    def kernel_cpu_pct(self) -> float | None:
        """In-kernel time of acceptrace's programs while timed, in % of one CPU."""
        if not self.stats or self.timed_s <= 0:
            return None
        return 100.0 * self.kernel_ns / 1e9 / self.timed_s

    @property
    def user_cpu_pct(self) -> float | None:
        r = self.per_second(self.user_cpu_s)
        return None if r is None else 100.0 * r

    @property
    def events_per_connection(self) -> float | None:
        return self.runs / self.timed_conns if self.stats and self.timed_conns else None

    @property
    def kernel_ns_per_connection(self) -> float | None:
        return self.kernel_ns / self.timed_conns if self.stats and self.timed_conns else None

    @property
    def missed(self) -> int | None:
        counted = [p.missed for p in self.programs if p.missed is not None]
        return sum(counted) if counted else None

    def to_json(self) -> dict:
        def r(x: float | None, n: int = 3) -> float | None:
            # a rate over a vanishing time is not a figure (and Infinity is not JSON)
            return None if x is None or not math.isfinite(x) else round(x, n)

        kcpu = self.kernel_cpu_pct
        return {
            "stats": self.stats,
            "why": self.why,
            "seconds": self.seconds,
            "timed_seconds": self.timed_seconds,
            "timed_connections": self.timed_connections,
            "virtual_machine": self.virtual_machine,
            "kernel_cpu_ms_per_s": r(None if kcpu is None else 10.0 * kcpu, 4),
            "kernel_cpu_pct": r(self.kernel_cpu_pct, 4),
            "user_cpu_s": self.user_cpu_s,
            "user_cpu_pct": r(self.user_cpu_pct),
            "peak_rss_kib": self.peak_rss_kib,
            "connections": self.connections,
            "events_per_connection": r(self.events_per_connection),
            "kernel_ns_per_connection": r(self.kernel_ns_per_connection, 1),
            "missed": self.missed,
            "programs": [{"hook": p.hook, "runs": p.runs, "run_time_ns": p.run_time_ns,
                          "ns_per_run": r(p.ns_per_run, 1), "missed": p.missed,
                          "feeds": list(p.feeds)} for p in self.programs],
        }

    @classmethod
    def from_json(cls, d: Any) -> Cost:
        d = _object(d, "cost")
        c = _known_fields(cls, {k: v for k, v in d.items() if k != "programs"}, "cost")
        c.programs = [_known_fields(ProgramCost, p, "cost.programs[]")
                      for p in _items(d.get("programs", []), "cost.programs")]
        return c


@dataclass
class Run:
    """A run, or (in ``targets``) one traced listener's section of it: the same fields,
    for one (namespace, port); the top level holds the totals over the sections."""

    meta: Meta
    connections: dict[str, int | None] = field(
        default_factory=lambda: dict.fromkeys(CONNECTION_KEYS, 0)
    )
    drops: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(DROP_KEYS, 0))
    kernel_counters: dict[str, int] = field(default_factory=dict)
    stages: dict[str, Histogram | None] = field(default_factory=dict)
    queues: Queues = field(default_factory=Queues)
    processes: list[ProcessCount] = field(default_factory=list)
    slowest: list[Sample] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    recent: Interval | None = None   # the last interval (the rates "now")
    targets: list[Run] = field(default_factory=list)  # one section per traced listener
    cost: Cost | None = None          # the whole run's (top level only; null in sections)

    def server(self) -> ProcessCount | None:
        """The server of this listener: its accepting process recognised as one (the one
        with the most accepts), or None."""
        known = [p for p in self.processes if p.server and p.server != "unknown"]
        return max(known, key=lambda p: p.accepted) if known else None

    @classmethod
    def new(cls, port: int, backend: str) -> Run:
        return cls(meta=Meta(port=port, backend=backend),
                   stages={name: Histogram.empty("us") for name in STAGES})

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, **self.section_json()}
        out["intervals"] = [asdict(i) for i in self.intervals]
        out["targets"] = [t.section_json() for t in self.targets]
        out["cost"] = self.cost.to_json() if self.cost is not None else None
        return out

    def section_json(self) -> dict:
        """The fields of one listener's section (no schema, intervals or sections)."""
        return {
            "meta": self.meta.to_json(),
            "connections": dict(self.connections),
            "drops": dict(self.drops),
            "kernel_counters": dict(self.kernel_counters),
            "stages": {k: _hist_json(v) for k, v in self.stages.items()},
            "queues": self.queues.to_json(),
            "processes": [asdict(p) for p in self.processes],
            "slowest": [asdict(s) for s in self.slowest],
            "extra": dict(self.extra),
            "recent": asdict(self.recent) if self.recent is not None else None,
        }

    @classmethod
    def from_json(cls, d: Any) -> Run:
        """The run in ``d`` (parsed JSON); ValueError naming the first bad field."""
        if not isinstance(d, dict):
            raise ValueError("the top level is not a JSON object")
        schema = d.get("schema")
        if schema != SCHEMA:
            if isinstance(schema, str) and schema.startswith("acceptrace/"):
                raise ValueError(f"schema {schema[:40]!r} is not one this version reads "
                                 f"({SCHEMA})")
            if schema is None:
                raise ValueError(f"it has no schema field (expected {SCHEMA!r})")
            raise ValueError(f"schema is {str(schema)[:40]!r}, expected {SCHEMA!r}")
        run = cls.from_section(d)
        run.intervals = [_known_fields(Interval, i, "intervals[]")
                         for i in _items(d.get("intervals", []), "intervals")]
        run.targets = [cls.from_section(t, "targets[]")
                       for t in _items(d.get("targets") or [], "targets")]
        run.cost = Cost.from_json(d["cost"]) if d.get("cost") is not None else None
        return run

    @classmethod
    def from_section(cls, d: Any, what: str = "") -> Run:
        """One listener's section (or the top level without intervals, targets, cost)."""
        if not isinstance(d, dict):
            raise ValueError(f"{what or 'a section'} is not a JSON object")
        pre = f"{what}." if what else ""
        for key in ("meta", "connections", "drops", "stages"):
            if key not in d:
                raise ValueError(f"missing field {pre}{key}")
        return cls(
            meta=Meta.from_json(d["meta"]),
            connections=_counts(d["connections"], f"{pre}connections"),
            drops=_counts(d["drops"], f"{pre}drops"),
            kernel_counters={k: _count(v, f"{pre}kernel_counters.{k}") for k, v in
                             _object(d.get("kernel_counters", {}),
                                     f"{pre}kernel_counters").items()},
            stages={_text(k, f"{pre}stages"): _hist_from(v, f"{pre}stages.{k}")
                    for k, v in _object(d["stages"], f"{pre}stages").items()},
            queues=Queues.from_json(d.get("queues", {})),
            processes=[_known_fields(ProcessCount, p, f"{pre}processes[]")
                       for p in _items(d.get("processes", []), f"{pre}processes")],
            slowest=[_known_fields(Sample, x, f"{pre}slowest[]")
                     for x in _items(d.get("slowest", []), f"{pre}slowest")],
            extra=_extra(d.get("extra", {}), f"{pre}extra"),
            recent=(_known_fields(Interval, d["recent"], f"{pre}recent")
                    if d.get("recent") is not None else None),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def loads(cls, text: str | bytes) -> Run:
        """A run from its JSON text; ValueError (one line) for anything else."""
        if len(text) > MAX_REPORT_BYTES:
            raise ValueError(f"{_size(len(text))}: larger than any report acceptrace writes "
                             f"({_size(MAX_REPORT_BYTES)} at most)")
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"not JSON: not UTF-8 text ({exc.reason} at byte {exc.start})") \
                from None
        except RecursionError:  # json's decoder recurses once per level of nesting
            raise ValueError("not JSON acceptrace writes: nested too deeply") from None
        except ValueError as exc:  # NaN/Infinity, an integer of thousands of digits
            why = ("an integer of thousands of digits" if "integer string conversion" in str(exc)
                   else str(exc))
            raise ValueError(f"not JSON acceptrace writes: {why}") from None
        return cls.from_json(data)

    def write_atomic(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, self.dumps())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Run:
        """Read a report file: OSError when it cannot be read, ValueError when it is not
        a report (never more than MAX_REPORT_BYTES are read)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_REPORT_BYTES:
                raise ValueError(f"{_size(size)}: larger than any report acceptrace writes "
                                 f"({_size(MAX_REPORT_BYTES)} at most)")
            data = f.read(MAX_REPORT_BYTES + 1)  # a file that grows while read
        return cls.loads(data)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# extra's known keys and their checks; other keys (a later version's) are kept as read.
_EXTRA_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "accept_untracked": _opt_int, "queue_missed": _opt_int, "listener_sk_drops": _opt_int,
    "syns": _opt_int, "softirqs_busy": _opt_int, "packets_unseen": _opt_int,
    "listeners_untraced": _opt_int, "rank": _opt_int, "listening": _flag,
    "first_seen_s": _opt_number,
}


def _extra(v: Any, what: str) -> dict[str, Any]:
    d = _object(v, what)
    return {k: (_EXTRA_CHECKS[k](x, f"{what}.{k}") if k in _EXTRA_CHECKS else x)
            for k, x in d.items()}
