"""The data model of one run (schema ``acceptrace/v1``), separate from any renderer.

``Run.to_json()``/``Run.from_json()`` round-trip exactly; docs/schema.md
documents every field.  ``None`` (JSON null) always means "this backend
cannot observe it", never zero.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from .hist import Histogram

T = TypeVar("T")
SCHEMA = "acceptrace/v1"
KERNEL_STAGES: tuple[str, ...] = ("handshake", "accept_queue", "syn_to_accept", "accept_to_read")
DISPATCH_STAGES: tuple[str, ...] = (
    "accept_to_dispatch", "read_to_dispatch", "syn_to_dispatch", "dispatch_to_response",
)
STAGES: tuple[str, ...] = KERNEL_STAGES + DISPATCH_STAGES
CONNECTION_KEYS = ("syn", "queued", "accepted", "read")
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


def _hist_from(d: Any) -> Histogram | None:
    return None if d is None else Histogram.from_json(d)


def _known_fields(cls: type[T], d: Any, what: str) -> T:
    """Build dataclass ``cls`` from ``d``, ignoring keys a later version added."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be an object, not {d!r}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in d.items() if k in known})
    except TypeError as exc:
        raise ValueError(f"{what}: {exc}") from exc


def _opt_int(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} must be an integer or null, not {v!r}")
    return v


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
        if not isinstance(m.port, int) or not 0 <= m.port <= 65535:
            raise ValueError(f"meta.port must be a port number, not {m.port!r}")
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
    def from_json(cls, d: dict) -> Queues:
        return cls(
            backlog=_opt_int(d.get("backlog"), "queues.backlog"),
            accept_queue_depth=_hist_from(d.get("accept_queue_depth")),
            syn_queue_depth=_hist_from(d.get("syn_queue_depth")),
            listeners=[_known_fields(Listener, x, "listeners") for x in d.get("listeners", [])],
        )


@dataclass
class ProcessCount:
    pid: int
    comm: str
    accepted: int


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
    then ``programs`` is empty and only the userspace figures are known."""

    stats: str | None
    seconds: float                       # the wall time over which it was measured
    programs: list[ProgramCost] = field(default_factory=list)
    user_cpu_s: float = 0.0              # acceptrace's own CPU (all its threads)
    peak_rss_kib: int = 0
    connections: int = 0                 # traced connections over the same time
    virtual_machine: bool = False        # figures include a hypervisor's overhead
    why: str | None = None

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
        """In-kernel time of acceptrace's programs, in % of one CPU."""
        r = self.per_second(self.kernel_ns / 1e9) if self.stats else None
        return None if r is None else 100.0 * r

    @property
    def user_cpu_pct(self) -> float | None:
        r = self.per_second(self.user_cpu_s)
        return None if r is None else 100.0 * r

    @property
    def events_per_connection(self) -> float | None:
        return self.runs / self.connections if self.stats and self.connections else None

    @property
    def kernel_ns_per_connection(self) -> float | None:
        return self.kernel_ns / self.connections if self.stats and self.connections else None

    @property
    def missed(self) -> int | None:
        counted = [p.missed for p in self.programs if p.missed is not None]
        return sum(counted) if counted else None

    def to_json(self) -> dict:
        def r(x: float | None, n: int = 3) -> float | None:
            return None if x is None else round(x, n)

        kcpu = self.per_second(self.kernel_ns / 1e6) if self.stats else None
        return {
            "stats": self.stats,
            "why": self.why,
            "seconds": self.seconds,
            "virtual_machine": self.virtual_machine,
            "kernel_cpu_ms_per_s": r(kcpu, 4),
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
        if not isinstance(d, dict):
            raise ValueError(f"cost must be an object, not {d!r}")
        try:
            progs = [ProgramCost(hook=str(p["hook"]), runs=int(p["runs"]),
                                 run_time_ns=int(p["run_time_ns"]),
                                 missed=_opt_int(p.get("missed"), "cost.programs.missed"),
                                 feeds=[str(f) for f in p.get("feeds", [])])
                     for p in d.get("programs", [])]
            return cls(stats=None if d.get("stats") is None else str(d["stats"]),
                       seconds=float(d["seconds"]), programs=progs,
                       user_cpu_s=float(d.get("user_cpu_s", 0.0)),
                       peak_rss_kib=int(d.get("peak_rss_kib", 0)),
                       connections=int(d.get("connections", 0)),
                       virtual_machine=bool(d.get("virtual_machine", False)),
                       why=None if d.get("why") is None else str(d["why"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed cost: {exc}") from exc


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
        if not isinstance(d, dict):
            raise ValueError("the top level is not a JSON object")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema is {d.get('schema')!r}, expected {SCHEMA!r}")
        run = cls.from_section(d)
        try:
            run.targets = [cls.from_section(t) for t in d.get("targets") or []]
            run.cost = Cost.from_json(d["cost"]) if d.get("cost") is not None else None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"malformed report: {exc}") from exc
        return run

    @classmethod
    def from_section(cls, d: Any) -> Run:
        if not isinstance(d, dict):
            raise ValueError("a section is not a JSON object")
        try:
            run = cls(
                meta=Meta.from_json(d["meta"]),
                connections={k: _opt_int(v, f"connections.{k}")
                             for k, v in d["connections"].items()},
                drops={k: _opt_int(v, f"drops.{k}") for k, v in d["drops"].items()},
                kernel_counters={k: int(v) for k, v in d.get("kernel_counters", {}).items()},
                stages={k: _hist_from(v) for k, v in d["stages"].items()},
                queues=Queues.from_json(d.get("queues", {})),
                processes=[_known_fields(ProcessCount, p, "processes")
                           for p in d.get("processes", [])],
                slowest=[_known_fields(Sample, s, "slowest") for s in d.get("slowest", [])],
                intervals=[_known_fields(Interval, i, "intervals")
                           for i in d.get("intervals", [])],
                extra=dict(d.get("extra", {})),
                recent=(_known_fields(Interval, d["recent"], "recent")
                        if d.get("recent") is not None else None),
            )
        except KeyError as exc:
            raise ValueError(f"missing field {exc}") from exc
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"malformed report: {exc}") from exc
        return run

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def loads(cls, text: str) -> Run:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from exc
        return cls.from_json(data)

    def write_atomic(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, self.dumps())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Run:
        return cls.loads(Path(path).read_text())
