"""Session logic with a fake backend (no root): deltas, drops, slowest, nulls."""

from __future__ import annotations

from acceptrace import session as S
from acceptrace.backend import (
    ConnRecord,
    KernelSnapshot,
    ListenerSnapshot,
    ProcSnapshot,
    TargetSnapshot,
)
from acceptrace.hist import Histogram
from acceptrace.procnet import ListenerStats


class FakeBackend:
    name = "tracepoint"
    hooks = ["tracepoint:sock:sk_data_ready"]
    notes: list[str] = []

    dispatch = False
    dispatch_targets: list = []
    slots = 1
    busy_counted = False
    unseen_counted = False
    stats_how: str | None = None
    stats_why: str | None = "not measured (a fake backend)"
    programs: dict = {}

    def misses_counted(self, label: str) -> bool:
        return label.startswith("raw_tracepoint:")

    def program_stats(self) -> dict:
        return dict(self.programs)

    def time_programs(self, on: bool) -> bool:
        self.timing.append(on)
        return on and self.stats_how is not None

    def __init__(self, observable: bool = True, exact: bool = False,
                 missing_stages: set[str] | None = None) -> None:
        self.ack_overflow_observable = observable
        self.exact_drops = exact
        self.missing_stages = missing_stages or set()
        if exact:
            self.name = "fentry"
        self.snaps: list[KernelSnapshot] = []
        self.records: list[list[ConnRecord]] = []
        self.thresholds: list[int] = []
        # ack_overflow as read after the kernel's counters, per tick (default: as in
        # the tick's snapshot, i.e. no final-ACK overflow while they were read)
        self.acks_after: list[dict[int, int]] = []
        self._last = KernelSnapshot()
        self.timing: list[bool] = []   # what time_programs() was asked, in order

    def snapshot(self) -> KernelSnapshot:
        self._last = self.snaps.pop(0)
        return self._last

    def ack_overflows(self) -> dict[int, int]:
        if self.acks_after:
            return self.acks_after.pop(0)
        return {slot: t.counters.get("ack_overflow", 0) for slot, t in self._last.targets.items()}

    def poll(self, timeout_ms: int) -> list[ConnRecord]:
        return self.records.pop(0) if self.records else []

    flying: list[ConnRecord] = []

    def in_flight(self) -> list[ConnRecord]:
        return list(self.flying)

    def set_sample_threshold(self, slot: int, total_ns: int) -> None:
        self.thresholds.append(total_ns)

    def set_targets(self, targets: dict[tuple[int, int], int]) -> None:
        self.targets = targets

    def close(self) -> None:
        pass


def snap(queued: int, accepted: int, ack: int, waits_us: list[int]) -> KernelSnapshot:
    h = Histogram.empty("us")
    for w in waits_us:
        h.add(w)
    depth = Histogram.empty("connections")
    for d in range(1, queued + 1):
        depth.add(min(d, 3))
    return KernelSnapshot(targets={0: TargetSnapshot(
        hists={"accept_queue": h, "accept_queue_depth": depth},
        counters={"queued": queued, "accepted": accepted, "ack_overflow": ack, "syn_timed": queued},
        procs=[ProcSnapshot(42, "server", accepted)],
        listeners=[ListenerSnapshot(1, 2, 8000, 2, 3)],
    )})


def rec(syn: int | None, queued: int, accepted: int, read: int | None = None) -> ConnRecord:
    return ConnRecord(2, "127.0.0.1", 40000, "127.0.0.1", 8000, 42, "server", syn is None, 0,
                      syn, queued, accepted, read)


def make_session(monkeypatch, backend, drops: list[int],
                 overflows: list[int] | None = None) -> S.Session:
    seq = iter(drops)
    lo = iter(overflows or [0] * len(drops))

    def fake_listener_drops(port):
        return {7: ListenerStats(family="ipv4", address="127.0.0.1", port=port, inode=7,
                                 drops=next(seq), recv_q=0, send_q=2)}

    class FakeNetns:
        """The traced namespace's kernel figures, scripted."""

        inode = 4026531840
        is_own = True
        label = "test"
        listener_drops = staticmethod(fake_listener_drops)

        @staticmethod
        def netstat() -> dict[str, int]:
            return {"TcpExtListenOverflows": next(lo)}

        @staticmethod
        def somaxconn() -> int:
            return 4096

        @staticmethod
        def sysctls() -> dict[str, int]:
            return {"net.ipv4.tcp_abort_on_overflow": 0}

        @staticmethod
        def read_together(port):
            return fake_listener_drops(port), FakeNetns.netstat()

        @staticmethod
        def describe() -> dict[str, object]:
            return {"inode": FakeNetns.inode, "name": "test", "pid": None}

    clock = iter([0.0, 0.0, 1.0, 2.0, 2.0, 2.0])
    sess = S.Session(backend, 8000, 1.0, slowest_n=2, clock=lambda: next(clock),
                     netns=FakeNetns())  # type: ignore[arg-type]
    sess.start()
    return sess


def test_intervals_and_drop_split(monkeypatch):
    be = FakeBackend()
    be.snaps = [snap(3, 1, 1, [100, 200]), snap(5, 4, 2, [100, 200, 300, 5000])]
    sess = make_session(monkeypatch, be, drops=[10, 15, 22], overflows=[100, 104, 110])
    iv1 = sess.tick()
    iv2 = sess.tick()
    assert (iv1.queued, iv1.accepted) == (3, 1)
    assert (iv2.queued, iv2.accepted) == (2, 3)
    # sk_drops +5 with 1 ACK overflow: 3 SYNs + 1 ACK; then +7 with 1 more: 5 + 1.
    assert iv1.listen_overflow == 4
    assert iv2.listen_overflow == 6
    assert iv2.stages["accept_queue"]["count"] == 2
    run = sess.build_run()
    assert run.drops["ack_dropped"] == 2
    assert run.drops["syn_dropped"] == 12 - 2 * 2
    assert run.drops["listen_overflow"] == 8 + 2
    assert run.kernel_counters == {"TcpExtListenOverflows": 10}
    assert run.connections["accepted"] == 4
    assert run.queues.backlog == 2
    assert run.processes[0].pid == 42


def test_syn_drops_take_the_tighter_kernel_bound(monkeypatch):
    """sk_drops also counts e.g. RSTs to requests; ListenOverflows other ports'
    overflows: the smaller of the two upper bounds is used, interval by interval."""
    be = FakeBackend()
    be.snaps = [snap(3, 1, 1, [100]), snap(3, 1, 1, [100])]
    # interval 1: 2 RSTs inflate sk_drops (5 = 2*1 ack + 1 syn + 2 rst), LO = 1 ack + 1 syn
    # interval 2: another port overflows 7 times; our sk_drops unchanged
    sess = make_session(monkeypatch, be, drops=[0, 5, 5], overflows=[0, 2, 9])
    assert sess.tick().listen_overflow == 2
    assert sess.tick().listen_overflow == 0
    run = sess.build_run()
    assert run.drops["syn_dropped"] == 1  # 1 + 0, not min(5 - 2, 9 - 1) over the run
    assert run.drops["listen_overflow"] == 2


def test_a_final_ack_overflow_straddling_the_reads_is_not_lost(monkeypatch):
    """A tick reads the programs' counters, then the kernel's.  A final-ACK overflow
    in between is in the kernel's counters of one interval and in ack_overflow of
    the next (make test, 2026-12-05: listen_overflow 27 for the kernel's 28).
    Interval 1: 3 SYNs dropped and that ACK (sk_drops +3+2, ListenOverflows +3+1,
    ack_overflow +0); interval 2: 2 SYNs (+2, +2) and the ACK's count (+1).  Read
    per interval, min(5, 4) + min(0, 1) = 4 of 5; the two read as one, 5."""
    be = FakeBackend()
    be.snaps = [snap(3, 1, 0, [100]), snap(3, 1, 1, [100])]
    be.acks_after = [{0: 1}, {0: 1}]  # the ACK counted after the first snapshot
    sess = make_session(monkeypatch, be, drops=[0, 5, 7], overflows=[0, 4, 6])
    iv1, iv2 = sess.tick(), sess.tick()
    assert (iv1.syn_dropped, iv2.syn_dropped) == (0, 5)  # merged into the second
    run = sess.build_run()
    assert run.drops["syn_dropped"] == 5
    assert run.drops["listen_overflow"] == 6 == run.kernel_counters["TcpExtListenOverflows"]


def test_a_straddled_last_interval_is_read_again(monkeypatch):
    """finish() does not end on a merged interval: it reads once more."""
    be = FakeBackend()
    be.snaps = [snap(3, 1, 0, [100]), snap(3, 1, 1, [100])]
    be.acks_after = [{0: 1}, {0: 1}]
    sess = make_session(monkeypatch, be, drops=[0, 5, 7], overflows=[0, 4, 6])
    sess.tick()
    run = sess.finish()
    assert run.drops["syn_dropped"] == 5 and run.drops["ack_dropped"] == 1


def test_unobservable_split_is_null(monkeypatch):
    be = FakeBackend(observable=False)
    be.snaps = [snap(3, 1, 0, [100])]
    sess = make_session(monkeypatch, be, drops=[0, 4])
    iv = sess.tick()
    assert iv.listen_overflow is None
    run = sess.build_run()
    assert run.drops["syn_dropped"] is None
    assert run.drops["ack_dropped"] is None
    assert run.drops["listen_overflow"] is None
    assert run.drops["lost_events"] == 0


def test_slowest_keeps_the_n_slowest_and_raises_threshold(monkeypatch):
    be = FakeBackend()
    sess = make_session(monkeypatch, be, drops=[0])
    sess.add_records([rec(1000, 2000, 10_000), rec(1000, 2000, 5_000)])
    assert be.thresholds[-1] == 4_000 + 1  # list full: only slower than 4 us from now
    sess.add_records([rec(None, 2000, 100_000, 100_500), rec(1000, 2000, 3_000)])
    out = sess.targets[(4026531840, 8000)].slowest.records()
    assert [S.record_total_ns(r) for r in out] == [98_500, 9_000]
    assert be.thresholds[-1] == 9_001
    sample = S.record_to_sample(out[0])
    assert sample.handshake_us is None and sample.syn_to_accept_us is None
    assert sample.accept_queue_us == 98.0 and sample.accept_to_read_us == 0.5
    assert sample.syncookie is True


def test_span_rejects_unordered():
    assert S.span(10, 5) is None
    assert S.span(None, 5) is None
    assert S.span(5, 10) == 5


def exact_snap(syn_acc: int, synq: int, cookies: int, ack: int, other: int,
               retried: int) -> KernelSnapshot:
    s = snap(3, 1, ack, [100])
    s.targets[0].counters.update({
        "syn_dropped_acceptq_full": syn_acc, "syn_dropped_synq_full": synq,
        "syncookies_sent": cookies, "listen_drops_other": other, "syn_retried": retried,
    })
    return s


def test_exact_backend_takes_drops_from_decision_points(monkeypatch):
    """fentry/kprobe: the split comes from the kernel's own tests, not from the
    sk_drops / ListenOverflows bounds (which would say otherwise here)."""
    be = FakeBackend(exact=True)
    be.snaps = [exact_snap(3, 0, 0, 1, 0, 2), exact_snap(7, 4, 9, 2, 1, 5)]
    sess = make_session(monkeypatch, be, drops=[0, 50, 60], overflows=[0, 50, 60])
    assert sess.tick().syn_dropped == 3
    iv = sess.tick()
    assert iv.syn_dropped == 4 and iv.listen_overflow == 4 + 1
    run = sess.build_run()
    d = run.drops
    assert (d["syn_dropped"], d["ack_dropped"], d["listen_overflow"]) == (7, 2, 9)
    assert d["syn_dropped_acceptq_full"] == 7 and d["ack_dropped_acceptq_full"] == 2
    assert (d["syn_dropped_synq_full"], d["syncookies_sent"], d["listen_drops_other"]) == (4, 9, 1)
    assert run.connections["syn_retried"] == 5


def test_tracepoint_backend_reports_unsplittable_drops_as_null(monkeypatch):
    be = FakeBackend()
    be.snaps = [snap(3, 1, 1, [100])]
    sess = make_session(monkeypatch, be, drops=[0, 3], overflows=[0, 2])
    sess.tick()
    run = sess.build_run()
    for key in ("syn_dropped_acceptq_full", "syn_dropped_synq_full", "syncookies_sent",
                "listen_drops_other"):
        assert run.drops[key] is None, key
    assert run.drops["ack_dropped_acceptq_full"] == 1  # kfree_skb's reason says so
    assert run.connections["syn_retried"] is None


def test_stage_without_a_hook_is_null(monkeypatch):
    be = FakeBackend(exact=True, missing_stages={"accept_to_read"})
    be.snaps = [exact_snap(0, 0, 0, 0, 0, 0)]
    sess = make_session(monkeypatch, be, drops=[0, 0])
    iv = sess.tick()
    assert "accept_to_read" not in iv.stages
    run = sess.build_run()
    assert run.stages["accept_to_read"] is None
    assert run.stages["accept_queue"] is not None


def test_syn_retry_in_the_sample():
    r = ConnRecord(2, "10.0.0.2", 40000, "10.0.0.1", 8000, 42, "srv", False, 1,
                   1_000_000, 1_002_000_000, 1_002_050_000, 1_002_100_000,
                   syn_ok_ns=1_001_000_000, syn_retransmits=1)
    s = S.record_to_sample(r)
    assert s.syn_retransmits == 1
    assert s.syn_retry_us == 1_000_000.0       # first SYN -> the one that got through
    assert s.handshake_us == 1_000.0           # that SYN -> queued, not from the first
    assert s.syn_to_accept_us == 1_001_050.0   # the whole wait, from the first SYN


class FakeNs:
    """A namespace whose listeners and counters the test sets."""

    def __init__(self, inode: int, ports: list[int]) -> None:
        self.inode = inode
        self.label = f"ns{inode}"
        self.is_own = False
        self.ports = ports
        self.counters = {"TcpExtListenOverflows": 0, "TcpPassiveOpens": 0}

    def listener_drops(self, port):
        return {self.inode * 100 + p: ListenerStats("ipv4", "127.0.0.1", p,
                                                    self.inode * 100 + p, 0, 0, 128)
                for p in self.ports if port is None or p == port}

    def netstat(self):
        return dict(self.counters)

    def somaxconn(self):
        return 4096

    def sysctls(self):
        return {}

    def read_together(self, port):
        return self.listener_drops(port), self.netstat()

    def describe(self):
        return {"inode": self.inode, "name": self.label, "pid": None}


def tsnap(accepted: int, wait_us: int) -> TargetSnapshot:
    h = Histogram.empty("us")
    for _ in range(accepted):
        h.add(wait_us)
    return TargetSnapshot(hists={"accept_queue": h},
                          counters={"queued": accepted, "accepted": accepted})


def test_every_listener_gets_a_slot_and_its_own_section():
    be = FakeBackend(exact=True)
    be.slots = 8
    a, b = FakeNs(1, [80, 443]), FakeNs(2, [80])
    sess = S.Session(be, None, 1.0, namespaces=[a, b])  # type: ignore[list-item]
    sess.start()
    assert be.targets == {(1, 80): 0, (1, 443): 1, (2, 80): 2}
    a.counters = {"TcpExtListenOverflows": 0, "TcpPassiveOpens": 5}
    b.counters = {"TcpExtListenOverflows": 0, "TcpPassiveOpens": 7}
    b.ports = [80, 8080]  # a new listener appears
    be.snaps = [KernelSnapshot(targets={0: tsnap(2, 100), 1: tsnap(3, 50_000), 2: tsnap(7, 10)})]
    sess.tick()
    assert be.targets[(2, 8080)] == 3
    assert any("port 8080" in m for m in sess.messages)
    run = sess.build_run()
    assert run.connections["accepted"] == 12
    assert run.kernel_counters["TcpPassiveOpens"] == 12  # each namespace once
    assert run.meta.netns is None and run.meta.all_listeners
    by = {(t.meta.netns["inode"], t.meta.port): t for t in run.targets}  # type: ignore[index]
    assert by[(1, 443)].connections["accepted"] == 3
    assert by[(2, 80)].kernel_counters["TcpPassiveOpens"] == 7
    # no overflow anywhere: ranked by accept-queue p99, the slow one first
    assert run.targets[0].meta.port == 443 and run.targets[0].extra["rank"] == 1
    assert run.stages["accept_queue"].count == 12  # type: ignore[union-attr]


def test_listeners_beyond_the_slots_are_counted_not_traced():
    be = FakeBackend()
    be.slots = 2
    ns = FakeNs(1, [1, 2, 3, 4])
    sess = S.Session(be, None, 1.0, namespaces=[ns])  # type: ignore[list-item]
    sess.start()
    assert len(be.targets) == 2
    be.snaps = [KernelSnapshot()]
    sess.tick()
    assert sess.build_run().extra["listeners_untraced"] == 2


def test_a_gone_namespace_keeps_its_totals_and_is_not_read_again():
    be = FakeBackend(exact=True)
    be.slots = 4
    own, gone = FakeNs(1, [80]), FakeNs(2, [80])
    released: list = []
    sess = S.Session(be, 80, 1.0, namespaces=[own, gone],  # type: ignore[list-item]
                     find_namespaces=lambda: [], gone_namespaces=lambda: released)
    sess.start()
    be.snaps = [KernelSnapshot(targets={1: tsnap(4, 10)}) for _ in range(2)]
    sess.tick()
    released.append(gone)

    def boom(*_a):
        raise AssertionError("a released namespace was read")

    gone.netstat = boom  # type: ignore[method-assign]
    gone.listener_drops = boom  # type: ignore[method-assign]
    sess.tick()
    run = sess.build_run()
    sec = next(t for t in run.targets if t.meta.netns["inode"] == 2)  # type: ignore[index]
    assert sec.connections["accepted"] == 4 and sec.extra["listening"] is False


def test_blind_spot_figures_are_the_runs_in_every_section():
    """packets_unseen/softirqs_busy are counted for the whole run (no one listener owns a
    softirq): each section repeats the run's figure as its bound, never a sum."""
    be = FakeBackend(exact=True)
    be.slots = 4
    be.busy_counted = True
    be.unseen_counted = True
    ns = FakeNs(1, [80, 443])
    sess = S.Session(be, None, 1.0, namespaces=[ns])  # type: ignore[list-item]
    sess.start()
    be.snaps = [KernelSnapshot(targets={0: tsnap(2, 10), 1: tsnap(3, 10)},
                               counters={"packets_unseen": 3, "softirqs_busy": 5})]
    sess.tick()
    run = sess.build_run()
    assert run.extra["packets_unseen"] == 3 and run.extra["softirqs_busy"] == 5
    assert [t.extra["packets_unseen"] for t in run.targets] == [3, 3]
    assert [t.extra["softirqs_busy"] for t in run.targets] == [5, 5]


def test_cost_is_the_kernels_statistics_since_start_per_connection():
    """The cost section: each program's runs and time since start() (not since load),
    per traced connection; missed runs only where the kernel counts them."""
    from acceptrace.bpfstats import ProgStats
    from acceptrace.model import Run

    be = FakeBackend(exact=True)
    be.slots = 2
    be.stats_how, be.stats_why = "BPF_ENABLE_STATS", None
    be.programs = {"tracepoint:sock:inet_sock_set_state": ProgStats(100, 50_000, 7),
                   "raw_tracepoint:softirq_entry": ProgStats(10, 1_000, 2)}
    ns = FakeNs(1, [80])
    clock = iter([0.0, 0.0, 2.0, 2.0])
    sess = S.Session(be, None, 1.0, namespaces=[ns],  # type: ignore[list-item]
                     clock=lambda: next(clock))
    sess.start()
    be.programs = {"tracepoint:sock:inet_sock_set_state": ProgStats(300, 250_000, 9),
                   "raw_tracepoint:softirq_entry": ProgStats(30, 3_000, 5)}
    be.snaps = [KernelSnapshot(targets={0: tsnap(20, 10)})]
    sess.tick()
    run = sess.build_run()
    cost = run.cost
    assert cost is not None and cost.stats == "BPF_ENABLE_STATS" and cost.seconds == 2.0
    by = {p.hook: p for p in cost.programs}
    tp, raw = by["tracepoint:sock:inet_sock_set_state"], by["raw_tracepoint:softirq_entry"]
    assert (tp.runs, tp.run_time_ns, tp.missed) == (200, 200_000, None)  # not counted: null
    assert (raw.runs, raw.run_time_ns, raw.missed) == (20, 2_000, 3)
    assert raw.feeds == ["softirqs_busy"] and tp.ns_per_run == 1000.0
    assert cost.connections == 20
    assert cost.events_per_connection == 11.0            # 220 runs / 20 connections
    assert cost.kernel_ns_per_connection == 10_100.0      # 202 000 ns / 20
    assert abs(cost.kernel_cpu_pct - 100 * 202_000e-9 / 2.0) < 1e-9  # type: ignore[operator]
    back = Run.from_json(run.to_json()).cost
    assert back is not None and back.to_json() == cost.to_json()


def timed_session(cost_every: int) -> tuple[FakeBackend, S.Session, list[float]]:
    """A session over a fake backend whose statistics are on, with --cost-every
    ``cost_every``; the clock reads the list's one value (set it before each tick)."""
    be = FakeBackend(exact=True)
    be.stats_how, be.stats_why = "BPF_ENABLE_STATS", None
    now = [0.0]
    sess = S.Session(be, None, 1.0, namespaces=[FakeNs(1, [80])],  # type: ignore[list-item]
                     clock=lambda: now[0], cost_every=cost_every)
    return be, sess, now


def test_cost_is_timed_one_interval_in_n_and_per_connection_over_those():
    """--cost-every 2: the kernel times the programs in intervals 0, 2, ... only (off
    before the stats are read, on after); runs and time are the timed intervals', the
    per-connection and per-second figures divide by their connections and length, and
    the skipped runs (counted by the kernel all the time) are the whole run's."""
    from acceptrace.bpfstats import ProgStats

    be, sess, now = timed_session(2)
    hook = "raw_tracepoint:softirq_entry"
    be.programs = {hook: ProgStats(100, 10_000, 0)}
    sess.start()
    assert be.timing == [True]
    # interval k: (its end, the program's counters then, accepted so far)
    steps = [(1.0, ProgStats(200, 30_000, 1), 10),     # timed: +100 runs, +20 us, 10 conns
             (3.0, ProgStats(260, 45_000, 2), 40),     # not timed (another holder's runs)
             (4.0, ProgStats(320, 55_000, 4), 50),     # timed: +60 runs, +10 us, 10 conns
             (6.0, ProgStats(320, 55_000, 5), 90)]     # not timed
    for end, st, acc in steps:
        now[0] = end
        be.programs = {hook: st}
        be.snaps = [KernelSnapshot(targets={0: tsnap(acc, 10)})]
        sess.tick()
    assert be.timing == [True, False, True, False, True]   # the 5th interval is timed
    cost = sess.build_run().cost
    assert cost is not None
    assert (cost.seconds, cost.timed_seconds) == (6.0, 2.0)
    assert (cost.connections, cost.timed_connections) == (90, 20)
    (p,) = cost.programs
    assert (p.runs, p.run_time_ns, p.missed) == (160, 30_000, 5)
    assert cost.events_per_connection == 8.0              # 160 runs / 20 timed connections
    assert cost.kernel_ns_per_connection == 1_500.0       # 30 000 ns / 20
    assert cost.kernel_cpu_pct is not None
    assert abs(cost.kernel_cpu_pct - 100 * 30_000e-9 / 2.0) < 1e-12
    j = cost.to_json()
    assert j["kernel_cpu_ms_per_s"] == 0.015 and j["timed_seconds"] == 2.0
    from acceptrace.render import cost_line
    assert "[BPF timed 2 s of 6 s]" in cost_line(cost)


def test_timed_connections_count_a_connection_once_across_intervals():
    """Queued in one timed interval, accepted in the next (both timed: --cost-every 1):
    each connection is in the per-connection figure's denominator once, as in the run's."""
    from acceptrace.bpfstats import ProgStats

    be, sess, now = timed_session(1)
    be.programs = {"raw_tracepoint:softirq_entry": ProgStats(0, 0, 0)}
    sess.start()
    for end, queued, accepted in ((1.0, 8, 0), (2.0, 8, 8), (3.0, 12, 10)):
        now[0] = end
        snap = tsnap(0, 10)
        snap.counters.update(queued=queued, accepted=accepted)
        be.snaps = [KernelSnapshot(targets={0: snap})]
        sess.tick()
    cost = sess.build_run().cost
    assert cost is not None
    assert cost.connections == 12 and cost.timed_connections == 12, cost


def test_cost_every_0_never_times_and_says_so():
    from acceptrace.bpfstats import ProgStats
    from acceptrace.render import cost_line

    be, sess, now = timed_session(0)
    be.programs = {"raw_tracepoint:softirq_entry": ProgStats(0, 0, 0)}
    sess.start()
    now[0] = 1.0
    be.snaps = [KernelSnapshot(targets={0: tsnap(5, 10)})]
    sess.tick()
    assert be.timing == [False]
    cost = sess.build_run().cost
    assert cost is not None and cost.timed_seconds == 0 and cost.kernel_cpu_pct is None
    assert cost.kernel_ns_per_connection is None
    assert cost_line(cost).startswith("cost: BPF not timed yet")


def test_cost_without_kernel_statistics_is_null_not_zero():
    from acceptrace.model import Cost

    c = Cost(stats=None, seconds=10.0, why="BPF_ENABLE_STATS failed (Operation not permitted)",
             user_cpu_s=0.5, connections=100)
    j = c.to_json()
    assert j["kernel_cpu_pct"] is None and j["events_per_connection"] is None
    assert j["user_cpu_pct"] == 5.0 and j["programs"] == [] and j["missed"] is None

class ChurningNs(FakeNs):
    """A namespace whose server restarts every interval (a new socket inode), and where
    a short-lived listener on a new port appears each time."""

    def __init__(self, inode: int) -> None:
        super().__init__(inode, [80])
        self.round = 0

    def listener_drops(self, port):
        self.round += 1
        out = {1000 + self.round: ListenerStats("ipv4", "0.0.0.0", 80, 1000 + self.round,
                                                self.round % 3, 0, 128)}
        if port is None:  # every listener: one on a port not seen before
            out[5000 + self.round] = ListenerStats("ipv4", "0.0.0.0", 10000 + self.round,
                                                   5000 + self.round, 0, 0, 128)
        return {k: v for k, v in out.items() if port is None or v.port == port}


def test_a_run_of_weeks_stays_bounded(monkeypatch):
    """acceptrace export ticks for weeks without recording intervals: servers restart,
    listeners and namespaces come and go, process ids churn; what the session keeps
    must not grow with any of it, and no counter may go backwards meanwhile."""
    monkeypatch.setattr(S, "COMMS_KEPT", 10)  # names are looked up per build_run: 31 pids
    be = FakeBackend()
    be.slots = 2
    own = ChurningNs(1)
    appeared: list = []
    released: list = []

    def find():
        out, appeared[:] = list(appeared), []
        return out

    def gone():
        out, released[:] = list(released), []
        return out

    sess = S.Session(be, None, 1.0, namespaces=[own],  # type: ignore[list-item]
                     find_namespaces=find, gone_namespaces=gone)
    sess.start()
    last_drops = 0
    for i in range(3000):
        # a container without listeners starts, and the one before it stops
        ns = FakeNs(100 + i, [])
        appeared.append(ns)
        if i:
            released.append(FakeNs(99 + i, []))
        procs = [ProcSnapshot(100_000 + i, "worker", i)]  # a new worker pid each time
        be.snaps.append(KernelSnapshot(targets={0: TargetSnapshot(
            hists={"accept_queue": Histogram.empty("us")},
            counters={"queued": i, "accepted": i}, procs=procs)}))
        sess.tick(record=False)
        sess.scan_servers()
        if i % 100 == 0 or i == 2999:
            run = sess.build_run()
            drops = sum(t.drops.delta() for t in sess.targets.values())
            assert drops >= last_drops
            last_drops = drops
            assert run.connections["accepted"] == i
    assert sess.intervals == []
    assert len(sess.notes) <= S.NOTES_FIRST + S.NOTES_RECENT + 1
    assert any("left out" in n for n in sess.notes)
    assert len(sess.spaces) <= 3             # own, the running container, one just gone
    assert len(sess.untraced) <= 2           # only listeners that listen now
    assert len(sess.targets) == be.slots
    for t in sess.targets.values():
        assert len(t.drops.last) <= S.GONE_LISTENERS_KEPT + 1
        assert len(t.drops.baseline) <= S.GONE_LISTENERS_KEPT + 1
    assert len(sess._procs) <= S.COMMS_KEPT
    # every restart's drops are still in the total: the rounds' sk_drops were 0, 1, 2, ...
    t80 = sess.targets[(1, 80)]
    assert t80.drops.retired > 0


def test_response_stage_and_count_or_null_without_a_send_hook(monkeypatch):
    def snap_with_response() -> KernelSnapshot:
        s = snap(3, 3, 0, [10, 20, 30])
        h = Histogram.empty("us")
        for v in (100_500, 101_000):
            h.add(v)
        s.targets[0].hists["read_to_response"] = h
        s.targets[0].counters["responded"] = 2
        return s

    be = FakeBackend(exact=True)
    be.snaps = [snap_with_response()]
    sess = make_session(monkeypatch, be, drops=[0, 0])
    iv = sess.tick()
    assert iv.responded == 2 and iv.stages["read_to_response"]["count"] == 2
    run = sess.build_run()
    assert run.connections["responded"] == 2
    assert run.stages["read_to_response"].count == 2
    assert run.to_json()["intervals"][0]["responded"] == 2
    # a kernel where nothing sees the server's writes: null, not 0
    be = FakeBackend(exact=True, missing_stages={"read_to_response", "syn_to_response"})
    be.snaps = [snap_with_response()]
    sess = make_session(monkeypatch, be, drops=[0, 0])
    iv = sess.tick()
    assert iv.responded is None and "read_to_response" not in iv.stages
    run = sess.build_run()
    assert run.connections["responded"] is None and run.stages["syn_to_response"] is None


def test_processes_are_their_program_and_server(monkeypatch):
    """The kernel names the thread that accepted (tokio-rt-worker); the run names the
    program and the server, read from /proc once per process while it runs."""
    from acceptrace.servers import Server

    seen: list[int] = []

    def identify(pid: int) -> tuple[str | None, Server]:
        seen.append(pid)
        return "granian", Server("granian")

    monkeypatch.setattr(S.servers, "identify", identify)
    be = FakeBackend()
    s1 = snap(2, 2, 0, [10, 20])
    s1.targets[0].procs = [ProcSnapshot(42, "tokio-rt-worker", 2)]
    s2 = snap(3, 3, 0, [10, 20, 30])
    s2.targets[0].procs = [ProcSnapshot(42, "tokio-rt-worker", 3)]
    be.snaps = [s1, s2]
    r = rec(1_000, 2_000, 3_000, 4_000)
    r.comm = "tokio-rt-worker"
    be.records = [[r]]
    sess = make_session(monkeypatch, be, drops=[0, 0, 0])
    sess.poll(0)
    sess.tick()
    sess.tick()
    run = sess.build_run()
    assert [(p.pid, p.comm, p.server, p.accepted) for p in run.processes] == \
        [(42, "granian", "granian", 3)]
    assert run.slowest[0].comm == "granian"
    assert seen == [42]   # once per process
    d = run.to_json()["processes"][0]
    assert d["server"] == "granian" and d["worker_class"] is None


def test_a_connection_still_open_at_the_end_is_among_the_slowest(monkeypatch):
    """Accepted and read but never answered before the run ended: not sent by the kernel
    (its story is still open), taken from the per-connection map at finish()."""
    be = FakeBackend()
    be.snaps = [snap(1, 1, 0, [50]), snap(1, 1, 0, [50])]
    sess = make_session(monkeypatch, be, [0, 0, 0])
    sess.tick()
    be.flying = [rec(None, 1_000_000, 3_000_000, 3_500_000)]
    run = sess.finish()
    assert [s.accept_queue_us for s in run.slowest] == [2000.0]
