"""One tracing run: turns backend snapshots into the Run model.

Pure Python (no bcc): the backend is anything with the Backend protocol, so
this logic is unit-tested with a fake backend.
"""

from __future__ import annotations

import heapq
import itertools
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, procnet
from .backend import Backend, ConnRecord, KernelSnapshot
from .dispatch import DispatchTracker
from .hist import Histogram
from .layout import family_name
from .model import DISPATCH_STAGES, STAGES, Interval, Listener, ProcessCount, Run, Sample
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


def program_name(pid: int) -> str | None:
    """The process's own name (its main thread's comm): the kernel records the name of
    the thread that called accept(), e.g. tokio-rt-worker for a Rust server."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or None
    except OSError:
        return None  # exited: the thread's name is all there is


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

    def start(self) -> None:
        self.last = self.netns.listener_drops(self.port)
        self.baseline = {ino: st.drops for ino, st in self.last.items()}

    def update(self) -> None:
        self.last.update(self.netns.listener_drops(self.port))

    def delta(self) -> int:
        # A listener created during the run started from 0 drops.
        return sum(st.drops - self.baseline.get(ino, 0) for ino, st in self.last.items())


class Session:
    def __init__(
        self,
        backend: Backend,
        port: int,
        interval_s: float,
        *,
        slowest_n: int = 20,
        clock: Callable[[], float] = time.monotonic,
        netns: NetNamespace | None = None,
    ) -> None:
        self.backend = backend
        self.netns = netns or NetNamespace.own()
        self.port = port
        self.interval_s = interval_s
        self.clock = clock
        self.slowest = Slowest(slowest_n)
        self.intervals: list[Interval] = []
        self.listener_drops = ListenerDrops(port, self.netns)
        self.started_wall = datetime.now(timezone.utc)
        self.t0 = clock()
        self._prev = KernelSnapshot()
        self._prev_t = self.t0
        self._prev_ground = (0, 0)
        self._syn_dropped_total = 0
        self.netstat_before: dict[str, int] = {}
        self.netstat_after: dict[str, int] = {}
        self.last: KernelSnapshot = KernelSnapshot()
        self.dispatch = DispatchTracker(port, backend, clock) if backend.dispatch else None
        self._next_scan = 0.0
        self.notes: list[str] = []

    def start(self) -> None:
        self.netstat_before = self.netstat_after = self.netns.netstat()
        self.listener_drops.start()
        self.started_wall = datetime.now(timezone.utc)
        self.t0 = self._prev_t = self.clock()

    def scan_servers(self, every_s: float = 2.0) -> list[str]:
        """Rescan the server processes (at most every ``every_s``); new messages."""
        if self.dispatch is None:
            return []
        now = self.clock()
        if now >= self._next_scan:
            self._next_scan = now + every_s
            if not self.listener_drops.last or now - self.t0 < every_s:
                self.listener_drops.update()
            self.dispatch.refresh({ino for ino in self.listener_drops.last if ino})
        msgs = self.dispatch.take_messages()
        self.notes.extend(msgs)
        return msgs

    def add_records(self, records: list[ConnRecord]) -> None:
        if not records:
            return
        for r in records:
            self.slowest.add(r)
        self.backend.set_sample_threshold(self.slowest.threshold_ns())

    def poll(self, timeout_ms: int) -> None:
        self.add_records(self.backend.poll(timeout_ms))

    def _ground(self) -> tuple[int, int]:
        """(listener sk_drops, netns ListenOverflows) since the start: the kernel's view."""
        lo = "TcpExtListenOverflows"
        return (
            self.listener_drops.delta(),
            self.netstat_after.get(lo, 0) - self.netstat_before.get(lo, 0),
        )

    def tick(self, record: bool = True) -> Interval:
        """Close an interval: read the kernel's aggregates and record the deltas."""
        now = self.clock()
        snap = self.backend.snapshot()
        self.listener_drops.update()
        self.netstat_after = self.netns.netstat()
        ground = self._ground()
        iv = self._interval(self._prev, snap, now - self.t0, now - self._prev_t, ground)
        if record:
            self.intervals.append(iv)
        self._prev, self._prev_t, self._prev_ground, self.last = snap, now, ground, snap
        return iv

    def _interval(
        self,
        prev: KernelSnapshot,
        cur: KernelSnapshot,
        t_s: float,
        dur: float,
        ground: tuple[int, int],
    ) -> Interval:
        def d(name: str) -> int:
            return cur.counters.get(name, 0) - prev.counters.get(name, 0)

        stages = {}
        dispatch_on = self.dispatch is not None and self.dispatch.available
        for name in STAGES:
            h = cur.hists.get(name)
            if h is None or (name in DISPATCH_STAGES and not dispatch_on):
                continue
            if name in self.backend.missing_stages:
                continue
            p = prev.hists.get(name)
            dh = h.delta(p) if p is not None else h
            stages[name] = {
                "count": dh.count, "p50": dh.percentile(0.5), "p99": dh.percentile(0.99)
            }
        def depth_max(name: str) -> int | None:
            h, p = cur.hists.get(name), prev.hists.get(name)
            dh = h.delta(p) if h is not None and p is not None else h
            return int(dh.max) if dh is not None and dh.max is not None else None

        if self.backend.exact_drops:
            syn: int | None = d("syn_dropped_acceptq_full")
        else:
            syn = self._syn_dropped(
                d("ack_overflow"),
                ground[0] - self._prev_ground[0],
                ground[1] - self._prev_ground[1],
            )
        self._syn_dropped_total += syn or 0
        overflow = None if syn is None else syn + d("ack_overflow")
        return Interval(
            t_s=round(t_s, 3),
            duration_s=round(dur, 3),
            queued=d("queued"),
            accepted=d("accepted"),
            read=d("read"),
            listen_overflow=overflow,
            synack_retransmits=d("synack_retransmits"),
            accept_queue_depth_max=depth_max("accept_queue_depth"),
            stages=stages,
            syn=d("syn_timed"),
            dispatched=(
                d("dispatched") if self.dispatch is not None and self.dispatch.available else None
            ),
            syn_dropped=syn,
            syncookies=d("syncookies"),
            syn_queue_depth_max=depth_max("syn_queue_depth"),
            accept_queue_depth_now=(
                sum(st.recv_q for st in self.listener_drops.last.values())
                if self.listener_drops.last else None
            ),
        )

    def _syn_dropped(self, ack_overflow: int, sk_drops: int, overflows: int) -> int | None:
        """SYNs this port's listeners dropped because the accept queue was full.

        The SYN is only consumed (no tracepoint sees it), so it is derived from
        two kernel counters, each an upper bound of it:
        - the listeners' sk_drops minus 2 per final-ACK overflow (such an ACK
          costs two: tcp_listendrop() in syn_recv_sock, then the skb's drop in
          tcp_v4_rcv) -- also counts other listener drops, e.g. an RST to a
          request in the SYN queue, or SYN-queue-full drops without syncookies;
        - the namespace's ListenOverflows minus this port's ACK overflows --
          also counts other ports' overflows.
        The smaller is exact unless both kinds of noise happen in one interval;
        the run's figure is the sum of the intervals' (tighter than one minimum
        over the whole run).
        """
        if not self.backend.ack_overflow_observable:
            return None
        return max(0, min(sk_drops - 2 * ack_overflow, overflows - ack_overflow))

    def finish(self) -> Run:
        """Read the kernel a last time (before the programs are detached) and build the run."""
        self.tick(record=self.clock() - self._prev_t > 0.05 or not self.intervals)
        return self.build_run()

    def build_run(self) -> Run:
        snap = self.last
        c = snap.counters
        sk_drops = self._prev_ground[0]
        ack = c.get("ack_overflow", 0)
        observable = self.backend.ack_overflow_observable
        exact = self.backend.exact_drops
        syn_dropped = self._syn_dropped_total if observable else None
        after = self.netstat_after
        run = Run.new(port=self.port, backend=self.backend.name)
        run.meta.kernel = platform.release()
        run.meta.started = self.started_wall.isoformat(timespec="seconds")
        run.meta.duration_s = round(self._prev_t - self.t0, 3)
        run.meta.version = __version__
        run.meta.hostname = socket.gethostname()
        run.meta.interval_s = self.interval_s
        run.meta.hooks = list(self.backend.hooks)
        run.meta.notes = list(self.backend.notes) + list(self.notes)
        run.meta.somaxconn = self.netns.somaxconn()
        run.meta.netns = self.netns.describe()
        run.connections = {
            "syn": c.get("syn_timed", 0),
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
        run.kernel_counters = procnet.counter_deltas(self.netstat_before, after, KERNEL_COUNTERS)
        # Before the first read of the kernel's maps every stage is empty, not unknown.
        run.stages = {name: snap.hists.get(name) or Histogram.empty("us") for name in STAGES}
        dispatch_on = self.dispatch is not None and self.dispatch.available
        if not dispatch_on:
            for name in DISPATCH_STAGES:
                run.stages[name] = None
        for name in self.backend.missing_stages:
            run.stages[name] = None  # no hook on this kernel measures it
        run.connections["dispatched"] = c.get("dispatched", 0) if dispatch_on else None
        run.connections["requests"] = c.get("requests", 0) if dispatch_on else None
        run.queues.accept_queue_depth = snap.hists.get("accept_queue_depth")
        run.queues.syn_queue_depth = snap.hists.get("syn_queue_depth")
        run.queues.listeners = self._listeners(snap)
        # The smallest limit: the queue that fills first (each listener's is in listeners).
        backlogs = [lst.backlog for lst in run.queues.listeners if lst.backlog is not None]
        backlogs = backlogs or [ls.max_backlog for ls in snap.listeners]
        run.queues.backlog = min(backlogs) if backlogs else None
        run.processes = sorted(
            (ProcessCount(pid=p.pid, comm=program_name(p.pid) or p.comm, accepted=p.accepted)
             for p in snap.procs),
            key=lambda p: (-p.accepted, p.pid),
        )
        run.slowest = [record_to_sample(r) for r in self.slowest.records()]
        run.intervals = list(self.intervals)
        run.extra = {
            "accept_untracked": c.get("accept_untracked", 0) - c.get("accept_early", 0),
            "queue_missed": c.get("queue_missed", 0),
            "listener_sk_drops": sk_drops,
            # SYNs that reached tcp_conn_request (fentry/kprobe): retransmits included
            "syns": c.get("syns", 0) if exact else None,
            # softirqs in which kprobe/tracepoint programs were skipped (null: not countable)
            "softirqs_busy": (c.get("softirqs_busy", 0)
                              if self.backend.busy_counted else None),
            # TCP packets to the port in those softirqs (kprobe-fed drops only, else null)
            "packets_unseen": (c.get("packets_unseen", 0)
                               if self.backend.unseen_counted else None),
        }
        return run

    def _listeners(self, snap: KernelSnapshot) -> list[Listener]:
        """The port's listeners (sock_diag), each with what the kernel programs saw of it,
        matched by socket inode: several listeners on one port (SO_REUSEPORT, a server
        restarted with another backlog) each keep their own figures."""
        by_ino = {ls.inode: ls for ls in snap.listeners if ls.inode}
        out = []
        for st in self.listener_drops.last.values():
            kern = by_ino.get(st.inode)
            out.append(
                Listener(
                    family=st.family,
                    address=st.address,
                    port=st.port,
                    backlog=st.send_q,
                    # seen by sock_diag but no child was queued on it while traced: 0
                    max_depth=kern.max_depth if kern is not None else 0,
                    inode=st.inode or None,
                    depth_now=st.recv_q,
                )
            )
        return out
