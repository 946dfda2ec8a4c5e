"""Prometheus metrics from a cumulative Run: the exporter's metric families.

Owns what ``acceptrace export`` exposes -- names, labels, histogram ``le``
bounds -- as prometheus_client metric families built from a :class:`Run`
(its per-listener sections in ``run.targets``), and the custom collector that
serves them.  Pure: no bcc, no kernel access; the export loop (runner.py)
hands it each fresh Run, the namespaces' labels (nsname.py) and the SYN queues
read now.  docs/exporter.md lists every metric.

Identity of a series: (``namespace``, ``port``) for a traced listener, plus
``address`` for the listening sockets' gauges.  Sections that map to the same
identity -- a container restarted into a new network namespace under the same
name, a gone listener's totals beside its successor's -- are added up, so a
counter never goes backwards; the collector also guards every counter and
histogram sample and counts what it had to hold (``acceptrace_regressions_held_total``,
0 unless there is a bug).

Histograms: the ``le`` bounds are a subset of the kernel's log-linear bucket
bounds (hist.py): every ``16 / per_octave``-th sub-bucket bound from 16 us to
2**26 us (67.1 s).  Each is a kernel bucket boundary, so every cumulative count
is exact (no bucket is split), and ``histogram_quantile`` lands in the bucket
that holds the true quantile: off by at most that bucket's width, 1/per_octave
of the true value (25 % at the default 4 per octave).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from .hist import SUB, SUB_BITS, Histogram, bucket_index
from .model import STAGES, Listener, Run

PREFIX = "acceptrace_"
PER_OCTAVE_CHOICES = (1, 2, 4, 8, 16)
DEFAULT_PER_OCTAVE = 4
LE_MIN_EXP = 4     # 16 us: below it the kernel's buckets are single microseconds
LE_MAX_EXP = 26    # 67.1 s: the client's 6th SYN retransmit comes after 63 s
US = 1e-6

# connections_total{event}: the JSON's connections, and the queued ones that came
# through a syncookie (drops.syncookies in the JSON)
CONNECTION_EVENTS = ("syn", "created", "queued", "accepted", "read", "dispatched", "syn_retried")
# drops_total{reason}: the JSON's drop reasons that do not overlap, so the sum over
# reason is every listen drop; listen_overflow = syn_dropped + ack_dropped.
DROP_REASONS = ("syn_dropped", "ack_dropped", "syn_dropped_synq_full", "listen_drops_other")
TARGET_LABELS = ["namespace", "port"]
SOCKET_LABELS = ["namespace", "port", "address"]


def le_bounds_us(per_octave: int = DEFAULT_PER_OCTAVE, lo_exp: int = LE_MIN_EXP,
                 hi_exp: int = LE_MAX_EXP) -> list[int]:
    """The histogram's finite ``le`` bounds in microseconds: kernel bucket bounds
    ``(16 + s) << (e - 4)`` for s every 16/per_octave sub-buckets, e from lo_exp."""
    if per_octave not in PER_OCTAVE_CHOICES:
        raise ValueError(f"per_octave must be one of {PER_OCTAVE_CHOICES}, not {per_octave}")
    if not SUB_BITS <= lo_exp < hi_exp:
        raise ValueError(f"need {SUB_BITS} <= lo_exp < hi_exp")
    step = SUB // per_octave
    out = [(SUB + s) << (e - SUB_BITS) for e in range(lo_exp, hi_exp) for s in range(0, SUB, step)]
    return out + [1 << hi_exp]


def cumulative_buckets(h: Histogram, bounds_us: list[int]) -> list[tuple[str, float]]:
    """``(le, count of values < le)`` per bound, then ``+Inf``: exact, because each bound
    is a kernel bucket's lower bound (values are whole microseconds, so < is <=)."""
    out: list[tuple[str, float]] = []
    seen, i = 0, 0
    for b in bounds_us:
        stop = bucket_index(b)
        seen += sum(h.counts[i:stop])
        i = stop
        out.append((floatToGoString(b * US), float(seen)))
    out.append(("+Inf", float(h.count)))
    return out


def namespace_fallback(netns: dict | None) -> str:
    """A label from meta.netns alone (a saved run; the exporter passes nsname's)."""
    if not netns:
        return "host"
    name = str(netns.get("name") or "")
    if name.startswith("acceptrace's own"):
        return "host"
    if name.startswith("ip netns "):
        return "netns:" + name.removeprefix("ip netns ")
    return f"inode:{netns.get('inode')}"


@dataclass
class ExportView:
    """What one scrape shows: the run so far and what was read beside it."""

    run: Run
    names: dict[int, str] = field(default_factory=dict)   # netns inode -> label
    syn_queues: dict[tuple[int, int], int] = field(default_factory=dict)  # (inode, port)


@dataclass
class _Group:
    """The sections of one (namespace label, port), added up."""

    connections: dict[str, int | None] = field(default_factory=dict)
    drops: dict[str, int | None] = field(default_factory=dict)
    stages: dict[str, Histogram | None] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)
    listening: bool = False
    inodes: set[int] = field(default_factory=set)


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _sections(run: Run) -> list[Run]:
    return run.targets or ([run] if run.meta.port else [])


def _inode(sec: Run) -> int:
    return int((sec.meta.netns or {}).get("inode") or 0)


def _label(view: ExportView, sec: Run) -> str:
    return view.names.get(_inode(sec)) or namespace_fallback(sec.meta.netns)


def _groups(view: ExportView) -> dict[tuple[str, int], _Group]:
    groups: dict[tuple[str, int], _Group] = {}
    for sec in _sections(view.run):
        key = (_label(view, sec), sec.meta.port)
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(dict(sec.connections), dict(sec.drops), dict(sec.stages))
        else:
            for k, v in sec.connections.items():
                g.connections[k] = _add(g.connections.get(k, 0), v)
            for k, v in sec.drops.items():
                g.drops[k] = _add(g.drops.get(k, 0), v)
            for k, h in sec.stages.items():
                have = g.stages.get(k)
                g.stages[k] = None if h is None or have is None else have.merge(h)
        g.listeners.extend(sec.queues.listeners)
        g.listening = g.listening or bool(sec.extra.get("listening", True))
        g.inodes.add(_inode(sec))
    return groups


def families(view: ExportView, bounds_us: list[int]) -> list[Metric]:
    """Every metric family of one scrape (docs/exporter.md)."""
    run = view.run
    groups = _groups(view)
    conns = CounterMetricFamily(PREFIX + "connections_total",
                                "Connections at each step of the accept path (event: syn = SYN "
                                "time seen, queued, accepted, read, dispatched, syncookie = queued "
                                "through a syncookie, syn_retried = first SYN was dropped).",
                                labels=[*TARGET_LABELS, "event"])
    requests = CounterMetricFamily(PREFIX + "requests_total",
                                   "ASGI dispatches (uvicorn with httptools), keep-alive "
                                   "requests included.", labels=TARGET_LABELS)
    drops = CounterMetricFamily(PREFIX + "drops_total",
                                "Packets the listener dropped, by reason (syn_dropped, "
                                "ack_dropped: accept queue full; syn_dropped_synq_full: SYN queue "
                                "full without syncookies; listen_drops_other). Their sum is "
                                "ListenDrops; syn_dropped + ack_dropped is ListenOverflows.",
                                labels=[*TARGET_LABELS, "reason"])
    synack = CounterMetricFamily(PREFIX + "synack_retransmits_total",
                                 "SYN-ACKs the listener retransmitted.", labels=TARGET_LABELS)
    cookies = CounterMetricFamily(PREFIX + "syncookies_sent_total",
                                  "SYNs answered with a syncookie (SYN queue full).",
                                  labels=TARGET_LABELS)
    lost = CounterMetricFamily(PREFIX + "lost_events_total",
                               "Slow-connection samples the ring buffer had no room for "
                               "(counts and histograms are unaffected).", labels=TARGET_LABELS)
    stages = HistogramMetricFamily(PREFIX + "stage_duration_seconds",
                                   "Time connections spent in each stage of the accept path "
                                   "(le: kernel bucket bounds, docs/exporter.md).",
                                   labels=[*TARGET_LABELS, "stage"])
    listening = GaugeMetricFamily(PREFIX + "listening",
                                  "1 while a socket listens on the traced port, 0 once gone "
                                  "(its totals are kept).", labels=TARGET_LABELS)
    synq = GaugeMetricFamily(PREFIX + "syn_queue_length",
                             "Requests waiting for their final ACK now (SYN queue), all "
                             "listeners of the port.", labels=TARGET_LABELS)
    aq = GaugeMetricFamily(PREFIX + "accept_queue_length",
                           "Connections waiting for accept() now (Recv-Q of the listener).",
                           labels=SOCKET_LABELS)
    aq_limit = GaugeMetricFamily(PREFIX + "accept_queue_limit",
                                 "The accept queue's limit: min(listen() backlog, somaxconn) "
                                 "(Send-Q of the listener); it overflows above it.",
                                 labels=SOCKET_LABELS)
    sockets = GaugeMetricFamily(PREFIX + "listen_sockets",
                                "Listening sockets on the address and port (SO_REUSEPORT "
                                "groups: the queue gauges add theirs up).", labels=SOCKET_LABELS)

    for (ns, port), g in sorted(groups.items()):
        lv = [ns, str(port)]
        for event in CONNECTION_EVENTS:
            v = g.connections.get(event)
            if v is not None:
                conns.add_metric([*lv, event], v)
        if g.drops.get("syncookies") is not None:
            conns.add_metric([*lv, "syncookie"], g.drops["syncookies"])  # type: ignore[arg-type]
        if g.connections.get("requests") is not None:
            requests.add_metric(lv, g.connections["requests"])  # type: ignore[arg-type]
        for reason in DROP_REASONS:
            v = g.drops.get(reason)
            if v is not None:
                drops.add_metric([*lv, reason], v)
        for name, fam in (("synack_retransmits", synack), ("syncookies_sent", cookies),
                          ("lost_events", lost)):
            v = g.drops.get(name)
            if v is not None:
                fam.add_metric(lv, v)
        for stage in STAGES:
            h = g.stages.get(stage)
            if h is not None:
                stages.add_metric([*lv, stage], cumulative_buckets(h, bounds_us), h.sum * US)
        listening.add_metric(lv, 1.0 if g.listening else 0.0)
        if g.listening:
            synq.add_metric(lv, sum(view.syn_queues.get((ino, port), 0) for ino in g.inodes))
        by_addr: dict[str, list[Listener]] = {}
        for lst in g.listeners:
            if lst.depth_now is not None:  # listening now
                by_addr.setdefault(lst.address, []).append(lst)
        for addr, lsts in sorted(by_addr.items()):
            al = [*lv, addr]
            aq.add_metric(al, sum(x.depth_now or 0 for x in lsts))
            if all(x.backlog is not None for x in lsts):
                aq_limit.add_metric(al, sum(x.backlog or 0 for x in lsts))
            sockets.add_metric(al, len(lsts))

    out: list[Metric] = [conns, requests, drops, synack, cookies, lost, stages, listening, synq,
                         aq, aq_limit, sockets]
    out.append(_kernel_counters(view))
    out.extend(_run_wide(run))
    return [f for f in out if f.samples]


def _kernel_counters(view: ExportView) -> Metric:
    # Not "kernel_counter_total": promtool's lint rejects a name that holds its type.
    fam = CounterMetricFamily(PREFIX + "netstat",
                              "The traced namespace's own TCP counters since the exporter "
                              "started (/proc/net/netstat and snmp; name as nstat spells it).",
                              labels=["namespace", "name"])
    per_ns: dict[int, tuple[str, dict[str, int]]] = {}
    for sec in _sections(view.run):
        per_ns.setdefault(_inode(sec), (_label(view, sec), sec.kernel_counters))
    totals: dict[tuple[str, str], int] = {}
    for label, counters in per_ns.values():
        for name, v in counters.items():
            totals[(label, name)] = totals.get((label, name), 0) + v
    for (label, name), v in sorted(totals.items()):
        fam.add_metric([label, name], v)
    return fam


def _run_wide(run: Run) -> Iterator[Metric]:
    m = run.meta
    info = GaugeMetricFamily(PREFIX + "build_info", "What is running: version, backend, kernel.",
                             labels=["version", "backend", "kernel"])
    info.add_metric([m.version, m.backend, m.kernel], 1)
    yield info
    avail = GaugeMetricFamily(PREFIX + "stage_available",
                              "1 if this kernel's hooks measure the stage, 0 if not "
                              "(no series in stage_duration_seconds then).", labels=["stage"])
    for stage in STAGES:
        avail.add_metric([stage], 0.0 if run.stages.get(stage) is None else 1.0)
    yield avail
    for key, name, doc in (
        ("softirqs_busy", "softirqs_busy_total",
         "Network softirqs in which the kernel skipped the kprobe/tracepoint programs "
         "(docs/backends.md, blind spots)."),
        ("packets_unseen", "packets_unseen_total",
         "Packets to the traced ports in those softirqs: the most a drop counter can be short."),
    ):
        v = run.extra.get(key)
        if isinstance(v, int):
            fam = CounterMetricFamily(PREFIX + name, doc)
            fam.add_metric([], v)
            yield fam
    yield from _cost(run)
    untraced = GaugeMetricFamily(PREFIX + "listeners_untraced",
                                 "Listeners found but not traced: the run holds a bounded "
                                 "number of listeners (docs/listeners.md).")
    untraced.add_metric([], float(run.extra.get("listeners_untraced") or 0))
    yield untraced


def _cost(run: Run) -> Iterator[Metric]:
    """What tracing costs (the JSON's cost section): per BPF program -- a bounded label
    set, the attach points of one backend -- and acceptrace's own CPU and memory."""
    cost = run.cost
    if cost is None:
        return
    if cost.stats is not None:
        runs = CounterMetricFamily(PREFIX + "bpf_program_runs",
                                   "Runs of each of acceptrace's BPF programs while timed "
                                   "(the kernel's run_cnt).", labels=["program"])
        secs = CounterMetricFamily(PREFIX + "bpf_program_run_seconds",
                                   "Time spent in each BPF program while timed (the kernel's "
                                   "run_time_ns).",
                                   labels=["program"])
        missed = CounterMetricFamily(PREFIX + "bpf_program_missed_runs",
                                     "Runs the kernel skipped (recursion_misses): the figures "
                                     "the program feeds may be short by this many; only where "
                                     "this kernel counts them.", labels=["program"])
        timed = CounterMetricFamily(PREFIX + "bpf_programs_timed_seconds",
                                    "Wall time during which the kernel timed acceptrace's BPF "
                                    "programs (one interval in --cost-every): the runs and run "
                                    "seconds above are counted in it.")
        for p in cost.programs:
            runs.add_metric([p.hook], p.runs)
            secs.add_metric([p.hook], p.run_time_ns / 1e9)
            if p.missed is not None:
                missed.add_metric([p.hook], p.missed)
        timed.add_metric([], cost.timed_s)
        yield runs
        yield secs
        yield missed
        yield timed
    cpu = CounterMetricFamily(PREFIX + "cpu_seconds",
                              "acceptrace's own CPU time (user + system, all threads) "
                              "while tracing.")
    cpu.add_metric([], cost.user_cpu_s)
    yield cpu
    rss = GaugeMetricFamily(PREFIX + "peak_resident_memory_bytes",
                            "acceptrace's peak resident memory.")
    rss.add_metric([], cost.peak_rss_kib * 1024.0)
    yield rss


class RunCollector:
    """A prometheus_client collector over the export loop's latest view.

    ``view()`` returns what to show now (None: nothing traced yet).  Counter and
    histogram samples are held at their highest value so far: a series never goes
    backwards; each time one would have, ``acceptrace_regressions_held_total``
    counts it (docs/exporter.md).  Only the series of the last scrape are remembered.
    """

    def __init__(self, view: Callable[[], ExportView | None],
                 per_octave: int = DEFAULT_PER_OCTAVE) -> None:
        self.view = view
        self.bounds_us = le_bounds_us(per_octave)
        self.regressions = 0
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:  # one scrape at a time: a later view is never guarded first
            v = self.view()
            fams = self._guard(families(v, self.bounds_us) if v is not None else [])
            reg = CounterMetricFamily(PREFIX + "regressions_held",
                                      "Times a counter would have gone backwards and was held "
                                      "(0 unless acceptrace has a bug).")
            reg.add_metric([], self.regressions)
        return [*fams, reg]

    def _guard(self, fams: list[Metric]) -> list[Metric]:
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in fams:
            if fam.type not in ("counter", "histogram"):
                continue
            for i, s in enumerate(fam.samples):
                key = (s.name, tuple(sorted(s.labels.items())))
                last = self._last.get(key)
                if last is not None and s.value < last:
                    self.regressions += 1
                    fam.samples[i] = s._replace(value=last)
                seen[key] = max(s.value, last) if last is not None else s.value
        self._last = seen
        return fams
