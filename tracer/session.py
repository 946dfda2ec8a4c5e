"""One tracing run: turns backend snapshots into the Run model.

Owns the run's targets -- the traced (network namespace, port) listeners, each
in a target slot of the kernel's per-target rows -- finding them (every
listener of the namespaces when no port is given), reading each namespace's
own kernel figures, and building one section per target plus the totals.
Pure Python (no bcc): the backend is anything with the Backend protocol, so
this logic is unit-tested with a fake backend.
"""

from __future__ import annotations

import heapq
import itertools
import platform
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import __version__, hooks, listeners, procnet, servers
from .backend import Backend, ConnRecord, KernelSnapshot, ProcSnapshot, TargetSnapshot
from .bpfstats import ProgStats
from .dispatch import DispatchTracker
from .hist import Histogram
from .layout import family_name
from .model import (
    DISPATCH_STAGES,
    MAX_INTERVALS,
    RESPONSE_STAGES,
    STAGES,
    Cost,
    Interval,
    Listener,
    Meta,
    ProcessCount,
    ProgramCost,
    Run,
    Sample,
    halve_intervals,
)
from .netns import NetNamespace

KERNEL_COUNTERS = (
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpExtSyncookiesSent",
    "TcpExtSyncookiesRecv",
    "TcpExtSyncookiesFailed",
    "TcpExtTCPReqQFullDrop",
    "TcpExtTCPReqQFullDoCookies",
    "TcpPassiveOpens",
)
QUEUE_HISTS = ("accept_queue_depth", "syn_queue_depth")
# Memory bounds for a run of weeks (acceptrace export): what is kept per run does
# not grow with traffic, restarts or containers coming and going.
NOTES_FIRST = 50          # the run's first notes (dispatch, setup) are kept ...
NOTES_RECENT = 50         # ... and its latest (listeners found or gone)
GONE_LISTENERS_KEPT = 16  # per target: older gone sockets are folded into one sum
COMMS_KEPT = 4096         # process names remembered
# At the end, reads again while a final-ACK overflow straddles the last one
# (Session._acks_while_reading): one more is nearly always enough.
FINAL_READS = 3


def us(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1000.0, 3)


def span(a: int | None, b: int | None) -> int | None:
    """b - a in ns when both are known and ordered."""
    if a is None or b is None or b < a:
        return None
    return b - a


def record_total_ns(r: ConnRecord) -> int | None:
    end = r.response_ns or r.dispatch_ns or r.first_read_ns or r.accepted_ns
    return span(r.syn_ns or r.queued_ns, end)


def record_to_sample(r: ConnRecord) -> Sample:
    return Sample(
        family=family_name(r.family),
        saddr=r.saddr,
        sport=r.sport,
        daddr=r.daddr,
        dport=r.dport,
        pid=r.pid,
        comm=r.comm,
        syncookie=r.syncookie,
        synack_retransmits=r.synack_retransmits,
        handshake_us=us(span(r.syn_ok_ns or r.syn_ns, r.queued_ns)),
        accept_queue_us=us(span(r.queued_ns, r.accepted_ns)),
        syn_to_accept_us=us(span(r.syn_ns, r.accepted_ns)),
        accept_to_read_us=us(span(r.accepted_ns, r.first_read_ns)),
        total_us=us(record_total_ns(r)),
        accept_to_dispatch_us=us(span(r.accepted_ns, r.dispatch_ns)),
        read_to_dispatch_us=us(span(r.first_read_ns, r.dispatch_ns)),
        syn_to_dispatch_us=us(span(r.syn_ns, r.dispatch_ns)),
        dispatch_to_response_us=us(span(r.dispatch_ns, r.response_ns)),
        requests=r.requests if r.dispatch_ns else None,
        read_to_response_us=us(span(r.first_read_ns, r.response_ns)),
        syn_to_response_us=us(span(r.syn_ns, r.response_ns)),
        syn_retransmits=r.syn_retransmits,
        syn_retry_us=us(span(r.syn_ns, r.syn_ok_ns)) if r.syn_retransmits is not None else None,
    )


class Slowest:
    """The N slowest connections seen, by total time (a bounded min-heap)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._heap: list[tuple[int, int, ConnRecord]] = []
        self._seq = itertools.count()

    def add(self, r: ConnRecord) -> None:
        total = record_total_ns(r)
        if total is None or self.n <= 0:
            return
        item = (total, next(self._seq), r)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, item)
        elif total > self._heap[0][0]:
            heapq.heapreplace(self._heap, item)

    def threshold_ns(self) -> int:
        """What the kernel should send from now on: only what would enter the list."""
        return self._heap[0][0] + 1 if len(self._heap) >= self.n else 0

    def records(self) -> list[ConnRecord]:
        return [r for _, _, r in sorted(self._heap, key=lambda x: (-x[0], x[1]))]


@dataclass
class ListenerDrops:
    """sk_drops of the port's listeners, from sock_diag, as deltas over the run."""

    port: int
    netns: NetNamespace = field(default_factory=NetNamespace.own)
    baseline: dict[int, int] = field(default_factory=dict)
    last: dict[int, procnet.ListenerStats] = field(default_factory=dict)
    current: dict[int, procnet.ListenerStats] = field(default_factory=dict)  # listening now
    retired: int = 0   # drops of gone sockets no longer listed (GONE_LISTENERS_KEPT)

    def _mine(self, stats: dict[int, procnet.ListenerStats]) -> dict[int, procnet.ListenerStats]:
        return {ino: st for ino, st in stats.items() if st.port == self.port}

    def start(self, stats: dict[int, procnet.ListenerStats] | None = None) -> None:
        self.last = self.current = self._mine(
            stats if stats is not None else self.netns.listener_drops(self.port))
        self.last = dict(self.last)
        self.baseline = {ino: st.drops for ino, st in self.last.items()}

    def update(self, stats: dict[int, procnet.ListenerStats] | None = None) -> None:
        self.current = self._mine(
            stats if stats is not None else self.netns.listener_drops(self.port))
        self.last.update(self.current)
        # A server restarted every minute for weeks: keep the latest gone sockets,
        # fold the older ones' drops into one sum (the oldest come first in ``last``).
        gone = [ino for ino in self.last if ino not in self.current]
        for ino in gone[:max(0, len(gone) - GONE_LISTENERS_KEPT)]:
            self.retired += self.last.pop(ino).drops - self.baseline.pop(ino, 0)

    def delta(self) -> int:
        # A listener created during the run started from 0 drops.
        return self.retired + sum(st.drops - self.baseline.get(ino, 0)
                                  for ino, st in self.last.items())


@dataclass
class Target:
    """One traced listener: a (network namespace, port) pair and its target slot."""

    slot: int
    netns: NetNamespace
    port: int
    slowest: Slowest
    drops: ListenerDrops
    first_s: float = 0.0                       # when the run began tracing it
    prev: TargetSnapshot = field(default_factory=TargetSnapshot)
    last: TargetSnapshot = field(default_factory=TargetSnapshot)
    prev_ground: tuple[int, int] = (0, 0)
    syn_dropped_total: int = 0
    # the raw figures of intervals whose reads straddled a final-ACK overflow
    # (session._interval), not yet turned into SYN drops
    carry: tuple[int, int, int, int] | None = None
    recent: Interval | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.netns.inode, self.port)

    @property
    def listening(self) -> bool:
        return bool(self.drops.current)


@dataclass
class _NsState:
    """What the session reads of one namespace each interval."""

    netns: NetNamespace
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    somaxconn: int | None = None
    sysctls: dict[str, int] = field(default_factory=dict)  # as of its first read
    listeners: dict[int, procnet.ListenerStats] = field(default_factory=dict)
    gone: bool = False     # released (--all-namespaces: nothing holds it any more)


class Session:
    """The run: its targets, their kernel rows, and each namespace's own counters.

    ``ports`` (``port`` for one): the traced ports, in each of ``namespaces``
    (``netns`` for one; acceptrace's own by default).  No port at all: every
    TCP listener of the namespaces, found at start and at each interval
    (``find_namespaces`` adds namespaces that appear, for --all-namespaces),
    up to ``backend.slots`` listeners.
    """

    def __init__(
        self,
        backend: Backend,
        port: int | None,
        interval_s: float,
        *,
        slowest_n: int = 20,
        clock: Callable[[], float] = time.monotonic,
        netns: NetNamespace | None = None,
        ports: list[int] | None = None,
        namespaces: list[NetNamespace] | None = None,
        find_namespaces: Callable[[], list[NetNamespace]] | None = None,
        gone_namespaces: Callable[[], list[NetNamespace]] | None = None,
        cost_every: int = 1,
    ) -> None:
        self.backend = backend
        self.ports = list(ports) if ports is not None else ([port] if port else [])
        self.all_listeners = not self.ports
        spaces = namespaces if namespaces is not None else [netns or NetNamespace.own()]
        self.spaces: dict[int, _NsState] = {ns.inode: _NsState(ns) for ns in spaces}
        self.find_namespaces = find_namespaces
        self.gone_namespaces = gone_namespaces or (lambda: [])
        self.interval_s = interval_s
        self.clock = clock
        self.slowest_n = slowest_n
        self.intervals: list[Interval] = []
        self.targets: dict[tuple[int, int], Target] = {}
        self.untraced: set[tuple[int, int]] = set()   # listeners beyond backend.slots
        self.started_wall = datetime.now(timezone.utc)
        self._started_iso = self.started_wall.isoformat(timespec="seconds")
        self._kernel = platform.release()
        self._hostname = socket.gethostname()
        self.t0 = clock()
        self._prev_t = self.t0
        self.last: KernelSnapshot = KernelSnapshot()
        self.dispatch = (DispatchTracker(self.ports[0] if self.ports else 0, backend, clock)
                         if backend.dispatch else None)
        self._next_scan = 0.0
        # pid -> its program and server, read from /proc when first seen accepting
        self._procs: dict[int, tuple[str | None, servers.Server]] = {}
        self._notes_first: list[str] = []
        self._notes_recent: deque[str] = deque(maxlen=NOTES_RECENT)
        self._notes_left_out = 0
        self._retired_counters: dict[str, int] = {}  # gone namespaces no target needed
        self.messages: list[str] = []   # for the live views: listeners found or gone
        self._started = False           # start() done: what is found now is new
        # the cost: programs' statistics and our own CPU at start() and at the last tick
        self._prog0: dict[str, ProgStats] = {}
        self._prog_last: dict[str, ProgStats] = {}
        self._cpu0 = 0.0
        # The kernel times the programs during interval k when k % cost_every == 0 (0:
        # never): timing slows every BPF program on the host.  What the timed intervals
        # added up to, and whether the one now open is timed.
        self.cost_every = cost_every
        self._ticks = 0
        self._timing = False
        self._timed: dict[str, ProgStats] = {}
        self._timed_s = 0.0
        self._timed_conns = 0
        # queued and accepted summed over the intervals, and the larger of the two at
        # the last tick: the run's connections (Cost.connections) so far.  An
        # interval's connections are what that figure grew by (a connection queued in
        # one interval and accepted in the next is in one of them, not both).
        self._queued_sum = self._accepted_sum = self._conns_last = 0
        self._vm = procnet.in_virtual_machine()
        if not self.all_listeners:
            for ns in spaces:
                for p in self.ports:
                    self._add_target(ns, p)

    # -- compatibility with one-target callers --------------------------------------
    @property
    def port(self) -> int:
        return self.ports[0] if self.ports else 0

    @property
    def netns(self) -> NetNamespace:
        return next(iter(self.spaces.values())).netns

    @property
    def listener_drops(self) -> ListenerDrops:
        return next(iter(self.targets.values())).drops

    def listening(self) -> bool:
        return any(t.listening for t in self.targets.values())

    # -- notes ----------------------------------------------------------------------
    def add_notes(self, msgs: list[str]) -> None:
        """Keep the run's first notes and its latest ones (bounded, for weeks-long runs)."""
        for msg in msgs:
            if len(self._notes_first) < NOTES_FIRST:
                self._notes_first.append(msg)
            else:
                if len(self._notes_recent) == self._notes_recent.maxlen:
                    self._notes_left_out += 1
                self._notes_recent.append(msg)

    @property
    def notes(self) -> list[str]:
        gap = ([f"({self._notes_left_out} notes left out)"] if self._notes_left_out else [])
        return self._notes_first + gap + list(self._notes_recent)

    # -- targets --------------------------------------------------------------------
    def _add_target(self, ns: NetNamespace, port: int) -> Target | None:
        key = (ns.inode, port)
        if key in self.targets or key in self.untraced:
            return self.targets.get(key)
        if len(self.targets) >= self.backend.slots:
            self.untraced.add(key)
            return None
        t = Target(slot=len(self.targets), netns=ns, port=port,
                   slowest=Slowest(self.slowest_n), drops=ListenerDrops(port, ns),
                   first_s=round(self.clock() - self.t0, 3) if self._started else 0.0)
        self.targets[key] = t
        return t

    def _push_targets(self) -> None:
        self.backend.set_targets({t.key: t.slot for t in self.targets.values()})

    def _dump_port(self, st: _NsState) -> int | None:
        """What one sock_diag dump asks for: the port when only one is traced in the
        namespace, else every listener."""
        mine = [t for t in self.targets.values() if t.netns.inode == st.netns.inode]
        return mine[0].port if not self.all_listeners and len(mine) == 1 else None

    def _read_listeners(self, st: _NsState) -> None:
        """One sock_diag dump per namespace."""
        st.listeners = {} if st.gone else st.netns.listener_drops(self._dump_port(st))

    def _discover(self) -> None:
        """Every listener of the namespaces as a target (no --port); say what changed."""
        if self.find_namespaces is not None:
            for ns in self.find_namespaces():
                if ns.inode not in self.spaces:
                    st = self.spaces[ns.inode] = _NsState(ns)
                    st.before = st.after = ns.netstat()
                    st.somaxconn = ns.somaxconn()
                    st.sysctls = ns.sysctls()

        before = len(self.targets)
        for st in self.spaces.values():
            if self.all_listeners:
                now = {ls.port for ls in st.listeners.values()}
                if not st.gone and self.untraced:  # untraced: those listening now (bounded)
                    self.untraced = {k for k in self.untraced
                                     if k[0] != st.netns.inode or k[1] in now}
                for port in sorted(now):
                    t = self._add_target(st.netns, port)
                    if t is not None and t.slot >= before and self._started:
                        self.messages.append(f"a listener appeared on port {port}"
                                             + _where(st.netns))
                        t.drops.start(st.listeners)
                        t.drops.baseline = {}  # new: every drop it had is the run's
        if len(self.targets) != before:
            self._push_targets()

    def start(self) -> None:
        for st in self.spaces.values():
            st.before = st.after = st.netns.netstat()
            st.somaxconn = st.netns.somaxconn()
            st.sysctls = st.netns.sysctls()
            self._read_listeners(st)
        self._discover()
        for t in self.targets.values():
            t.drops.start(self.spaces[t.netns.inode].listeners)
        self._push_targets()
        self.started_wall = datetime.now(timezone.utc)
        self._started_iso = self.started_wall.isoformat(timespec="seconds")
        self._timing = self.backend.time_programs(self.cost_every > 0)
        self._prog0 = self._prog_last = self.backend.program_stats()
        self._cpu0 = procnet.own_cpu_and_rss()[0]
        self.t0 = self._prev_t = self.clock()
        self._started = True

    def scan_servers(self, every_s: float = 2.0) -> list[str]:
        """Rescan the server processes (at most every ``every_s``); new messages."""
        msgs, self.messages = self.messages, []
        if self.dispatch is None:
            self.add_notes(msgs)
            return msgs
        now = self.clock()
        if now >= self._next_scan:
            self._next_scan = now + every_s
            if not self.listening() or now - self.t0 < every_s:
                for st in self.spaces.values():
                    self._read_listeners(st)
                for t in self.targets.values():
                    t.drops.update(self.spaces[t.netns.inode].listeners)
            inodes = {ino for t in self.targets.values() for ino in t.drops.last if ino}
            self.dispatch.refresh(inodes)
        msgs += self.dispatch.take_messages()
        self.add_notes(msgs)
        return msgs

    def add_records(self, records: list[ConnRecord]) -> None:
        if not records:
            return
        by_slot = {t.slot: t for t in self.targets.values()}
        touched: set[int] = set()
        for r in records:
            t = by_slot.get(r.slot)
            if t is not None:
                t.slowest.add(r)
                touched.add(t.slot)
        # Each target's threshold: only what its own list would still take (an idle
        # listener's empty list must not make the kernel send every other one's).
        for t in self.targets.values():
            if t.slot in touched:
                self.backend.set_sample_threshold(t.slot, t.slowest.threshold_ns())

    def poll(self, timeout_ms: int) -> None:
        self.add_records(self.backend.poll(timeout_ms))

    # -- intervals ------------------------------------------------------------------
    def tick(self, record: bool = True) -> Interval:
        """Close an interval: read the kernel's aggregates and record the deltas."""
        now = self.clock()
        snap = self.backend.snapshot()
        timed, prog_before = self._timing, self._prog_last
        self._ticks += 1
        time_next = self.cost_every > 0 and self._ticks % self.cost_every == 0
        if timed and not time_next:   # off before the read: no run of the next one in it
            self._timing = self.backend.time_programs(False)
        self._prog_last = self.backend.program_stats()
        if time_next and not timed:
            self._timing = self.backend.time_programs(True)
        for ns in self.gone_namespaces():
            old = self.spaces.get(ns.inode)
            if old is not None and not old.gone:
                old.gone = True  # its figures stay as last read
                self.messages.append(f"network namespace {ns.label} is gone")
                self._forget(old)
        for st in self.spaces.values():
            if st.gone:
                continue
            st.listeners, st.after = st.netns.read_together(self._dump_port(st))
            st.somaxconn = st.netns.somaxconn()
        self._discover()
        straddled = self._acks_while_reading(snap)
        for tsnap in snap.targets.values():
            for p in tsnap.procs:
                self._identify(p.pid)
        dur = now - self._prev_t
        # This interval's final-ACK overflows of each namespace's traced listeners.
        ack_by_ns: dict[int, int] = {}
        for t in self.targets.values():
            cur = snap.target(t.slot)
            ack_by_ns[t.netns.inode] = ack_by_ns.get(t.netns.inode, 0) + (
                cur.counters.get("ack_overflow", 0) - t.prev.counters.get("ack_overflow", 0))
        ivs: list[tuple[Interval, dict[str, Histogram]]] = []
        for t in self.targets.values():
            st = self.spaces[t.netns.inode]
            if not st.gone:
                t.drops.update(st.listeners)
            else:
                t.drops.current = {}
            lo = "TcpExtListenOverflows"
            ground = (t.drops.delta(), st.after.get(lo, 0) - st.before.get(lo, 0))
            cur = snap.target(t.slot)
            iv, dh = self._interval(t, t.prev, cur, now - self.t0, dur, ground,
                                    ack_by_ns.get(t.netns.inode, 0),
                                    t.netns.inode in straddled)
            t.recent = iv
            ivs.append((iv, dh))
            t.prev, t.prev_ground, t.last = cur, ground, cur
        total = _sum_intervals(ivs, round(now - self.t0, 3), round(dur, 3))
        self._queued_sum += total.queued
        self._accepted_sum += total.accepted
        conns = max(self._queued_sum, self._accepted_sum)
        if timed:
            self._add_timed(prog_before, dur, conns - self._conns_last)
        self._conns_last = conns
        if record:
            self.intervals.append(total)
            if len(self.intervals) > MAX_INTERVALS:  # bounded over days: older ones coarser
                self.intervals = halve_intervals(self.intervals)
        self._prev_t, self.last = now, snap
        return total

    def _acks_while_reading(self, snap: KernelSnapshot) -> set[int]:
        """The namespaces (inodes) in which the programs counted a final-ACK overflow
        after ``snap`` was taken, while the kernel's counters were read.  Such an
        overflow may be in this interval's ListenOverflows and sk_drops but is in
        the next interval's ack_overflow: the SYN drops derived from them
        (``_syn_dropped``) would be 1 too high in one interval and 1 too low in the
        next, and the sum of the intervals' minimums one short of the truth.  Only
        where the split is derived (tracepoint backend)."""
        if self.backend.exact_drops or not self.backend.ack_overflow_observable:
            return set()
        now = self.backend.ack_overflows()
        return {t.netns.inode for t in self.targets.values()
                if now.get(t.slot, 0) != snap.target(t.slot).counters.get("ack_overflow", 0)}

    def _forget(self, st: _NsState) -> None:
        """A gone namespace: its untraced listeners are no more; with no target in it,
        only its counters' deltas are kept (folded into the run's totals), so a run
        of weeks over containers that come and go stays bounded."""
        ino = st.netns.inode
        self.untraced = {k for k in self.untraced if k[0] != ino}
        if any(t.netns.inode == ino for t in self.targets.values()):
            return
        for k, v in procnet.counter_deltas(st.before, st.after, KERNEL_COUNTERS).items():
            self._retired_counters[k] = self._retired_counters.get(k, 0) + v
        del self.spaces[ino]

    def _responses_seen(self) -> bool:
        """A hook sees the server's first write back (the response stages are not null)."""
        return not set(RESPONSE_STAGES) & self.backend.missing_stages

    def _stages(self, dh: dict[str, Histogram]) -> dict[str, dict[str, object]]:
        dispatch_on = self.dispatch is not None and self.dispatch.available
        out: dict[str, dict[str, object]] = {}
        for name in STAGES:
            h = dh.get(name)
            if h is None or (name in DISPATCH_STAGES and not dispatch_on):
                continue
            if name in self.backend.missing_stages:
                continue
            out[name] = {"count": h.count, "p50": h.percentile(0.5), "p99": h.percentile(0.99)}
        return out

    def _interval(
        self,
        t: Target,
        prev: TargetSnapshot,
        cur: TargetSnapshot,
        t_s: float,
        dur: float,
        ground: tuple[int, int],
        ns_ack: int,
        straddled: bool = False,
    ) -> tuple[Interval, dict[str, Histogram]]:
        def d(name: str) -> int:
            return cur.counters.get(name, 0) - prev.counters.get(name, 0)

        dh: dict[str, Histogram] = {}
        for name, h in cur.hists.items():
            p = prev.hists.get(name)
            dh[name] = h.delta(p) if p is not None else h

        def depth_max(name: str) -> int | None:
            h = dh.get(name)
            return int(h.max) if h is not None and h.max is not None else None

        if self.backend.exact_drops:
            syn: int | None = d("syn_dropped_acceptq_full")
        else:
            raw = (d("ack_overflow"), ground[0] - t.prev_ground[0],
                   ground[1] - t.prev_ground[1], ns_ack)
            if t.carry is not None:
                raw = (raw[0] + t.carry[0], raw[1] + t.carry[1],
                       raw[2] + t.carry[2], raw[3] + t.carry[3])
            if straddled:
                # Its reads straddled a final-ACK overflow: merged with the next
                # interval, whose figure then holds both (this one's is 0).
                t.carry, syn = raw, 0
            else:
                t.carry, syn = None, self._syn_dropped(*raw)
        t.syn_dropped_total += syn or 0
        overflow = None if syn is None else syn + d("ack_overflow")
        dispatch_on = self.dispatch is not None and self.dispatch.available
        iv = Interval(
            t_s=round(t_s, 3),
            duration_s=round(dur, 3),
            queued=d("queued"),
            accepted=d("accepted"),
            read=d("read"),
            listen_overflow=overflow,
            synack_retransmits=d("synack_retransmits"),
            accept_queue_depth_max=depth_max("accept_queue_depth"),
            stages=self._stages(dh),
            syn=d("syn_timed"),
            dispatched=d("dispatched") if dispatch_on else None,
            syn_dropped=syn,
            synq_dropped=d("syn_dropped_synq_full") if self.backend.exact_drops else None,
            syncookies=d("syncookies"),
            syn_queue_depth_max=depth_max("syn_queue_depth"),
            responded=d("responded") if self._responses_seen() else None,
            accept_queue_depth_now=(
                sum(st.recv_q for st in t.drops.current.values()) if t.drops.current else None
            ),
        )
        return iv, dh

    def _syn_dropped(self, ack_overflow: int, sk_drops: int, overflows: int,
                     ns_ack: int | None = None) -> int | None:
        """SYNs this port's listeners dropped because the accept queue was full.

        The SYN is only consumed (no tracepoint sees it), so it is derived from
        two kernel counters, each an upper bound of it:
        - the listeners' sk_drops minus 2 per final-ACK overflow (such an ACK
          costs two: tcp_listendrop() in syn_recv_sock, then the skb's drop in
          tcp_v4_rcv) -- also counts other listener drops, e.g. an RST to a
          request in the SYN queue, or SYN-queue-full drops without syncookies;
        - the namespace's ListenOverflows minus the final-ACK overflows of its
          traced listeners (``ns_ack``) -- also counts other ports' overflows.
        The smaller is exact unless both kinds of noise happen in one interval;
        the run's figure is the sum of the intervals' (tighter than one minimum
        over the whole run).
        """
        if not self.backend.ack_overflow_observable:
            return None
        ns_ack = ack_overflow if ns_ack is None else ns_ack
        return max(0, min(sk_drops - 2 * ack_overflow, overflows - ns_ack))

    def finish(self) -> Run:
        """Read the kernel a last time (before the programs are detached) and build the run.
        Connections still open then (accepted, no response or close yet) are offered to
        the slowest list as they are: a slow one still waiting is the one to show."""
        self.add_records(self.backend.in_flight())
        record = self.clock() - self._prev_t > 0.05 or not self.intervals
        self.tick(record=record)
        for _ in range(FINAL_READS):
            if all(t.carry is None for t in self.targets.values()):
                break
            self.tick(record=record)  # a straddled last interval: read once more
        return self.build_run()

    # -- the run --------------------------------------------------------------------
    def _identify(self, pid: int) -> tuple[str | None, servers.Server]:
        """The program (its main thread's comm: the kernel records the thread that called
        accept(), e.g. tokio-rt-worker) and the server of ``pid``, read once, while it
        runs; an exited process keeps the name the kernel gave."""
        if pid not in self._procs:
            if len(self._procs) >= COMMS_KEPT:
                self._procs.clear()  # pids come and go: start over rather than grow
            self._procs[pid] = servers.identify(pid)
        return self._procs[pid]

    def _comm(self, pid: int | None, fallback: str | None) -> str | None:
        if pid is None:
            return fallback
        return self._identify(pid)[0] or fallback

    def _process(self, p: ProcSnapshot) -> ProcessCount:
        comm, server = self._identify(p.pid)
        if comm is None:  # gone before it was read: not known (null), not "unknown"
            return ProcessCount(pid=p.pid, comm=p.comm, accepted=p.accepted)
        return ProcessCount(pid=p.pid, comm=comm, accepted=p.accepted,
                            server=server.name, worker_class=server.worker_class)

    def _meta(self, port: int, st: _NsState | None) -> Meta:
        m = Meta(port=port, backend=self.backend.name)
        m.kernel = self._kernel
        m.started = self._started_iso
        m.duration_s = round(self._prev_t - self.t0, 3)
        m.version = __version__
        m.hostname = self._hostname
        m.interval_s = self.interval_s
        m.hooks = list(self.backend.hooks)
        m.notes = list(self.backend.notes) + list(self.notes)
        if st is not None:
            m.somaxconn = st.somaxconn
            m.sysctls = dict(st.sysctls)
            m.netns = st.netns.describe()
        m.ports = list(self.ports)
        m.all_listeners = self.all_listeners
        m.all_namespaces = self.find_namespaces is not None
        return m

    def _section(self, t: Target) -> Run:
        """One target's figures, its namespace's kernel counters beside them."""
        st = self.spaces[t.netns.inode]
        snap = t.last
        c = snap.counters
        sk_drops = t.prev_ground[0]
        ack = c.get("ack_overflow", 0)
        observable = self.backend.ack_overflow_observable
        exact = self.backend.exact_drops
        syn_dropped = t.syn_dropped_total if observable else None
        run = Run.new(port=t.port, backend=self.backend.name)
        run.meta = self._meta(t.port, st)
        run.connections = {
            "syn": c.get("syn_timed", 0),
            # children the kernel made (its TcpPassiveOpens, for this listener): queued
            # ones, and those freed when another CPU's child took their request first
            "created": c.get("created", 0),
            "queued": c.get("queued", 0),
            "accepted": c.get("accepted", 0),
            "read": c.get("read", 0),
            # connections whose client had to send its SYN again (first one dropped)
            "syn_retried": c.get("syn_retried", 0) if exact else None,
        }

        def at_decision(name: str) -> int | None:
            return c.get(name, 0) if exact else None

        if exact:
            syn_dropped = c.get("syn_dropped_acceptq_full", 0)
        run.drops = {
            "listen_overflow": None if syn_dropped is None else syn_dropped + ack,
            "syn_dropped": syn_dropped,
            "ack_dropped": ack if observable else None,
            "synack_retransmits": c.get("synack_retransmits", 0),
            "syncookies": c.get("syncookies", 0),
            "lost_events": c.get("lost_events", 0),
            "syn_dropped_acceptq_full": at_decision("syn_dropped_acceptq_full"),
            "syn_dropped_synq_full": at_decision("syn_dropped_synq_full"),
            "syncookies_sent": at_decision("syncookies_sent"),
            # The tracepoint backend sees these from kfree_skb's reason (6.15+).
            "ack_dropped_acceptq_full": ack if observable else None,
            "listen_drops_other": at_decision("listen_drops_other"),
        }
        run.kernel_counters = procnet.counter_deltas(st.before, st.after, KERNEL_COUNTERS)
        # Before the first read of the kernel's maps every stage is empty, not unknown.
        run.stages = {name: snap.hists.get(name) or Histogram.empty("us") for name in STAGES}
        dispatch_on = self.dispatch is not None and self.dispatch.available
        if not dispatch_on:
            for name in DISPATCH_STAGES:
                run.stages[name] = None
        for name in self.backend.missing_stages:
            run.stages[name] = None  # no hook on this kernel measures it
        responding = self._responses_seen()
        run.connections["responded"] = c.get("responded", 0) if responding else None
        run.connections["dispatched"] = c.get("dispatched", 0) if dispatch_on else None
        run.connections["requests"] = c.get("requests", 0) if dispatch_on else None
        run.queues.accept_queue_depth = snap.hists.get("accept_queue_depth")
        run.queues.syn_queue_depth = snap.hists.get("syn_queue_depth")
        run.queues.listeners = self._listeners(t)
        # The smallest limit: the queue that fills first (each listener's is in listeners).
        backlogs = [lst.backlog for lst in run.queues.listeners if lst.backlog is not None]
        backlogs = backlogs or [ls.max_backlog for ls in snap.listeners]
        run.queues.backlog = min(backlogs) if backlogs else None
        run.processes = sorted((self._process(p) for p in snap.procs),
                               key=lambda p: (-p.accepted, p.pid))
        run.slowest = [record_to_sample(r) for r in t.slowest.records()]
        for sample in run.slowest:
            sample.comm = self._comm(sample.pid, sample.comm)
        run.recent = t.recent
        run.extra = {
            # (>= 0: the two are counted in that order, but read from per-CPU values)
            "accept_untracked": max(0, c.get("accept_untracked", 0) - c.get("accept_early", 0)),
            "queue_missed": c.get("queue_missed", 0),
            "listener_sk_drops": sk_drops,
            # SYNs that reached tcp_conn_request (fentry/kprobe): retransmits included
            "syns": c.get("syns", 0) if exact else None,
            "listening": t.listening,     # false: its listeners are gone (totals kept)
            "first_seen_s": t.first_s,
        }
        run.extra.update(self._blind_extra())
        return run

    def _blind_extra(self) -> dict[str, int | None]:
        """What the kernel skipped (docs/backends.md, "Blind spots").  Counted for the
        whole run, not per listener (a softirq, or a packet seen before any socket
        lookup, belongs to no one target): in a section it is the run's figure, the
        most that section's drop counters can be short."""
        c = self.last.counters
        return {
            # softirqs in which kprobe/tracepoint programs were skipped (null: not countable)
            "softirqs_busy": c.get("softirqs_busy", 0) if self.backend.busy_counted else None,
            # TCP packets to the traced ports in those softirqs (kprobe-fed drops only)
            "packets_unseen": (c.get("packets_unseen", 0)
                               if self.backend.unseen_counted else None),
        }

    def build_run(self) -> Run:
        sections = [self._section(t) for t in sorted(self.targets.values(), key=lambda t: t.slot)]
        single = len(self.spaces) == 1 and not self._retired_counters
        st0 = next(iter(self.spaces.values())) if single else None
        if len(sections) == 1:
            run = Run.from_section(sections[0].section_json())
        else:
            run = _total(sections, self.slowest_n)
        run.meta = self._meta(self.port, st0)
        run.meta.namespaces = [st.netns.describe() for st in self.spaces.values()]
        if not single:
            # each namespace's counters once, those of namespaces gone and forgotten too
            totals = dict(self._retired_counters)
            for st in self.spaces.values():
                for k, v in procnet.counter_deltas(st.before, st.after, KERNEL_COUNTERS).items():
                    totals[k] = totals.get(k, 0) + v
            run.kernel_counters = totals
            run.meta.somaxconn = None
            run.meta.sysctls = {}
        elif st0 is not None:
            run.kernel_counters = procnet.counter_deltas(st0.before, st0.after, KERNEL_COUNTERS)
        run.intervals = list(self.intervals)
        run.recent = self.intervals[-1] if self.intervals else None
        run.extra.pop("listening", None)
        run.extra.pop("first_seen_s", None)
        run.extra.update(self._blind_extra())
        # listeners found but not traced: the run holds backend.slots targets
        run.extra["listeners_untraced"] = len(self.untraced)
        run.targets = sections
        if len(sections) > 1:
            # the listener table's order (listeners.py): worst first
            order = {id(r.section): i for i, r in enumerate(listeners.table(run))}
            sections.sort(key=lambda sec: order[id(sec)])
        for i, sec in enumerate(sections):
            sec.extra["rank"] = i + 1
        run.cost = self._cost(run)
        return run

    def _add_timed(self, before: dict[str, ProgStats], seconds: float, conns: int) -> None:
        """Add a timed interval: each program's runs and time in it, its length and its
        connections (the per-connection figures' denominator)."""
        for label, st in self._prog_last.items():
            d = st.minus(before.get(label, ProgStats(0, 0, 0)))
            self._timed[label] = self._timed.get(label, ProgStats(0, 0, 0)).plus(d)
        self._timed_s += seconds
        self._timed_conns += conns

    def _cost(self, run: Run) -> Cost:
        """What the run cost so far: each program's runs and time in the kernel over the
        timed intervals, the runs it skipped since start(), and acceptrace's own CPU
        and memory."""
        cpu, rss = procnet.own_cpu_and_rss()
        programs = []
        for label, st in sorted(self._prog_last.items()):
            d = st.minus(self._prog0.get(label, ProgStats(0, 0, 0)))
            t = self._timed.get(label, ProgStats(0, 0, None))
            counted = self.backend.misses_counted(label)
            programs.append(ProgramCost(hook=label, runs=t.runs, run_time_ns=t.run_time_ns,
                                        missed=d.misses if counted else None,
                                        feeds=hooks.feeds(label)))
        conns = max(run.connections.get("queued") or 0, run.connections.get("accepted") or 0)
        return Cost(stats=self.backend.stats_how, why=self.backend.stats_why,
                    seconds=round(max(0.0, self._prev_t - self.t0), 3), programs=programs,
                    user_cpu_s=round(max(0.0, cpu - self._cpu0), 3), peak_rss_kib=rss,
                    connections=conns, virtual_machine=self._vm,
                    timed_seconds=round(self._timed_s, 3), timed_connections=self._timed_conns)

    def _listeners(self, t: Target) -> list[Listener]:
        """The port's listeners (sock_diag), each with what the kernel programs saw of it,
        matched by socket inode: several listeners on one port (SO_REUSEPORT, a server
        restarted with another backlog) each keep their own figures."""
        by_ino = {ls.inode: ls for ls in t.last.listeners if ls.inode}
        out = []
        for st in t.drops.last.values():
            kern = by_ino.get(st.inode)
            gone = st.inode not in t.drops.current
            out.append(
                Listener(
                    family=st.family,
                    address=st.address,
                    port=st.port,
                    backlog=st.send_q,
                    # seen by sock_diag but no child was queued on it while traced: 0
                    max_depth=kern.max_depth if kern is not None else 0,
                    inode=st.inode or None,
                    depth_now=None if gone else st.recv_q,
                )
            )
        return out


def _where(ns: NetNamespace) -> str:
    return "" if ns.is_own else f" in network namespace {ns.label}"


def _add_opt(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _max_opt(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _sum_intervals(ivs: list[tuple[Interval, dict[str, Histogram]]], t_s: float,
                   dur: float) -> Interval:
    """The run's interval: the targets' counts added, stages from their merged deltas."""
    total = Interval(t_s=t_s, duration_s=dur, queued=0, accepted=0, read=0, listen_overflow=0,
                     synack_retransmits=0, accept_queue_depth_max=None, syn=0, syn_dropped=0,
                     dispatched=0)
    if not ivs:
        total.listen_overflow = total.syn_dropped = total.dispatched = None
        return total
    merged: dict[str, Histogram] = {}
    now_depth: int | None = None
    for iv, dh in ivs:
        total.queued += iv.queued
        total.accepted += iv.accepted
        total.read += iv.read
        total.listen_overflow = _add_opt(total.listen_overflow, iv.listen_overflow)
        total.synack_retransmits += iv.synack_retransmits
        total.accept_queue_depth_max = _max_opt(total.accept_queue_depth_max,
                                                iv.accept_queue_depth_max)
        total.syn = _add_opt(total.syn, iv.syn)
        total.syn_dropped = _add_opt(total.syn_dropped, iv.syn_dropped)
        total.synq_dropped = (iv.synq_dropped if total.synq_dropped is None
                              else _add_opt(total.synq_dropped, iv.synq_dropped))
        total.syncookies += iv.syncookies
        total.syn_queue_depth_max = _max_opt(total.syn_queue_depth_max, iv.syn_queue_depth_max)
        if iv.accept_queue_depth_now is not None:
            now_depth = (now_depth or 0) + iv.accept_queue_depth_now
        total.dispatched = _add_opt(total.dispatched, iv.dispatched)
        total.responded = (iv.responded if total.responded is None
                           else _add_opt(total.responded, iv.responded))
        for name, h in dh.items():
            if name not in merged:
                merged[name] = h
            elif h.count:  # an idle listener's empty delta adds nothing (and copies 464 buckets)
                merged[name] = merged[name].merge(h)
    total.accept_queue_depth_now = now_depth
    names = set().union(*(iv.stages for iv, _ in ivs))
    total.stages = {
        name: {"count": merged[name].count, "p50": merged[name].percentile(0.5),
               "p99": merged[name].percentile(0.99)}
        for name in STAGES if name in names and name in merged}
    return total


def _total(sections: list[Run], slowest_n: int) -> Run:
    """The top of a run over several targets: counts added, histograms merged, the
    slowest connections of all, the smallest backlog."""
    run = Run.new(port=0, backend=sections[0].meta.backend if sections else "")
    if not sections:
        return run
    run.connections = {}
    run.drops = {}
    for sec in sections:
        for k, v in sec.connections.items():
            run.connections[k] = _add_opt(run.connections.get(k, 0), v)
        for k, v in sec.drops.items():
            run.drops[k] = _add_opt(run.drops.get(k, 0), v)
        for name, h in sec.stages.items():
            if h is None:
                run.stages[name] = None
            elif h.count and run.stages.get(name) is not None:
                run.stages[name] = run.stages[name].merge(h)  # type: ignore[union-attr]
        for q in ("accept_queue_depth", "syn_queue_depth"):
            h = getattr(sec.queues, q)
            mine = getattr(run.queues, q)
            if h is not None and (mine is None or h.count):
                setattr(run.queues, q, h if mine is None else mine.merge(h))
        run.queues.listeners.extend(sec.queues.listeners)
        for k, v in sec.extra.items():
            if isinstance(v, int) and not isinstance(v, bool):
                run.extra[k] = run.extra.get(k, 0) + v
            elif v is None and k not in run.extra:
                run.extra[k] = None
    backlogs = [s.queues.backlog for s in sections if s.queues.backlog is not None]
    run.queues.backlog = min(backlogs) if backlogs else None
    procs: dict[int, ProcessCount] = {}
    for sec in sections:
        for p in sec.processes:
            have = procs.get(p.pid)
            if have is None:
                procs[p.pid] = ProcessCount(pid=p.pid, comm=p.comm, accepted=p.accepted,
                                            server=p.server, worker_class=p.worker_class)
            else:
                have.accepted += p.accepted
    run.processes = sorted(procs.values(), key=lambda p: (-p.accepted, p.pid))
    slow = [s for sec in sections for s in sec.slowest]
    run.slowest = sorted(slow, key=lambda s: -(s.total_us or 0))[:slowest_n]
    return run
