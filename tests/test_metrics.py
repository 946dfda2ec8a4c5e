"""The exporter's metric families from fixture runs (no root): le bounds, exact cumulative
counts, histogram_quantile's documented error, names, labels, merging, the guard."""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from acceptrace.hist import Histogram, bucket_bounds, bucket_index
from acceptrace.metrics import (
    DROP_REASONS,
    ExportView,
    RunCollector,
    cumulative_buckets,
    le_bounds_us,
    namespace_fallback,
)
from acceptrace.model import Listener, Run
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

FIXTURE = Path(__file__).parent / "fixtures" / "run-demo-overflow.json"
NAME = re.compile(r"^acceptrace_[a-z][a-z0-9_]*$")


def scrape(view: ExportView | None, per_octave: int = 4) -> str:
    reg = CollectorRegistry()
    reg.register(RunCollector(lambda: view, per_octave))
    return generate_latest(reg).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, metric: str, **labels: str) -> float:
    return samples(text)[(metric, tuple(sorted(labels.items())))]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' bucketQuantile (promql/quantile.go): linear inside the bucket."""
    count = buckets[-1][1]
    rank = q * count
    b = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    start, prev = (0.0, 0.0) if b == 0 else buckets[b - 1]
    end, cum = buckets[b]
    return start + (end - start) * ((rank - prev) / (cum - prev))


# -- le bounds -------------------------------------------------------------------------------

@pytest.mark.parametrize("per_octave", [1, 2, 4, 8, 16])
def test_le_bounds_are_kernel_bucket_bounds(per_octave):
    bounds = le_bounds_us(per_octave)
    assert len(bounds) == 22 * per_octave + 1
    assert bounds[0] == 16 and bounds[-1] == 1 << 26
    assert bounds == sorted(set(bounds))
    for b in bounds:
        assert bucket_bounds(bucket_index(b))[0] == b  # a boundary: no bucket is split
    # each le bucket is at most 1/per_octave of its lower bound wide
    for lo, hi in zip(bounds, bounds[1:]):
        assert (hi - lo) / lo <= 1 / per_octave


def test_le_bounds_reject_other_resolutions():
    with pytest.raises(ValueError):
        le_bounds_us(3)


def test_cumulative_counts_are_exact():
    rng = random.Random(7)
    h = Histogram.empty("us")
    values = [int(rng.lognormvariate(9, 3)) for _ in range(5000)]  # 1 us .. hours
    for v in values:
        h.add(v)
    bounds = le_bounds_us(4)
    out = cumulative_buckets(h, bounds)
    assert out[-1] == ("+Inf", float(len(values)))
    for (le, cum), b in zip(out, bounds):
        assert float(le) == pytest.approx(b * 1e-6)
        assert cum == sum(1 for v in values if v < b), b
    cums = [c for _, c in out]
    assert cums == sorted(cums)


@pytest.mark.parametrize("per_octave", [1, 2, 4, 8, 16])
def test_histogram_quantile_error_is_within_the_documented_bound(per_octave):
    """docs/exporter.md: histogram_quantile is off by at most 1/per_octave of the true
    quantile (the ceil(q*n)-th value) for values from 16 us to 67 s."""
    rng = random.Random(per_octave)
    bounds = le_bounds_us(per_octave)
    worst = 0.0
    for trial in range(40):
        h = Histogram.empty("us")
        n = rng.randint(1, 400)
        mu = rng.uniform(4, 16)
        values = sorted(min(max(16, int(rng.lognormvariate(mu, rng.uniform(0.01, 2)))),
                            (1 << 26) - 1) for _ in range(n))
        for v in values:
            h.add(v)
        buckets = [(float(le), c) for le, c in cumulative_buckets(h, bounds)]
        for q in (0.5, 0.9, 0.99, 0.999):
            true = values[max(1, math.ceil(q * n)) - 1]
            est = histogram_quantile(q, buckets) * 1e6
            err = abs(est - true) / true
            worst = max(worst, err)
            assert err <= 1 / per_octave + 1e-9, (trial, q, true, est)
    assert worst > 0  # the bound was exercised, not vacuous


# -- families from a fixture run --------------------------------------------------------------

def test_fixture_run_metrics_equal_its_json():
    run = Run.read(FIXTURE)
    text = scrape(ExportView(run))
    lv = {"namespace": "host", "port": str(run.meta.port)}
    for event in ("syn", "queued", "accepted", "read"):
        assert value(text, "acceptrace_connections_total", event=event, **lv) == \
            run.connections[event]
    assert value(text, "acceptrace_drops_total", reason="syn_dropped", **lv) == \
        run.drops["syn_dropped"]
    assert value(text, "acceptrace_netstat_total", namespace="host",
                 name="TcpExtListenOverflows") == run.kernel_counters["TcpExtListenOverflows"]
    aq = run.stages["accept_queue"]
    assert aq is not None
    assert value(text, "acceptrace_stage_duration_seconds_count", stage="accept_queue",
                 **lv) == aq.count
    assert value(text, "acceptrace_stage_duration_seconds_sum", stage="accept_queue",
                 **lv) == pytest.approx(aq.sum * 1e-6)
    # null in the JSON (not observable): no series, and stage_available says so
    assert ("acceptrace_stage_duration_seconds_count",
            tuple(sorted({**lv, "stage": "accept_to_dispatch"}.items()))) not in samples(text)
    assert value(text, "acceptrace_stage_available", stage="accept_to_dispatch") == 0
    assert value(text, "acceptrace_stage_available", stage="accept_queue") == 1
    assert value(text, "acceptrace_build_info", version=run.meta.version,
                 backend=run.meta.backend, kernel=run.meta.kernel) == 1


def test_names_follow_prometheus_rules():
    text = scrape(ExportView(Run.read(FIXTURE)))
    fams = list(text_string_to_metric_families(text))
    assert fams
    for fam in fams:
        assert NAME.match(fam.name), fam.name
        assert fam.documentation, fam.name
        for s in fam.samples:
            assert "pid" not in s.labels and "client" not in s.labels
            if fam.type == "counter":
                assert s.name.endswith("_total"), s.name
            elif fam.type == "gauge":
                assert not s.name.endswith(("_total", "_count", "_sum", "_bucket")), s.name


def test_promtool_checks_the_exposition(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: Debian's prometheus package (make setup)"
    res = subprocess.run([promtool, "check", "metrics"], input=scrape(ExportView(
        Run.read(FIXTURE))), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def section(inode: int, name: str, port: int, accepted: int, drops: int, waits: list[int],
            listening: bool = True, depth: int | None = 1) -> Run:
    sec = Run.new(port=port, backend="tracepoint")
    sec.meta.netns = {"inode": inode, "name": name, "pid": None}
    sec.connections.update(accepted=accepted, queued=accepted)
    sec.drops.update(syn_dropped=drops, ack_dropped=0, syn_dropped_synq_full=None,
                     listen_drops_other=None)
    for w in waits:
        sec.stages["accept_queue"].add(w)  # type: ignore[union-attr]
    sec.kernel_counters = {"TcpExtListenOverflows": drops}
    sec.queues.listeners = [Listener("ipv4", "0.0.0.0", port, backlog=128, inode=inode + port,
                                     depth_now=depth if listening else None)]
    sec.extra["listening"] = listening
    return sec


def test_sections_with_one_identity_are_added_up():
    """A container restarted into a new namespace under the same name: the gone
    namespace's totals and the new one's are one series, so it never goes back."""
    old = section(11, "pid 1", 8000, accepted=5, drops=3, waits=[100] * 5, listening=False)
    new = section(12, "pid 2", 8000, accepted=2, drops=1, waits=[5000] * 2)
    other = section(13, "pid 3", 8000, accepted=7, drops=0, waits=[10] * 7)
    run = Run.new(port=0, backend="tracepoint")
    run.targets = [old, new, other]
    view = ExportView(run, names={11: "docker:web", 12: "docker:web", 13: "docker:db"})
    text = scrape(view)
    web = {"namespace": "docker:web", "port": "8000"}
    assert value(text, "acceptrace_connections_total", event="accepted", **web) == 7
    assert value(text, "acceptrace_drops_total", reason="syn_dropped", **web) == 4
    assert value(text, "acceptrace_stage_duration_seconds_count", stage="accept_queue",
                 **web) == 7
    assert value(text, "acceptrace_netstat_total", namespace="docker:web",
                 name="TcpExtListenOverflows") == 4
    assert value(text, "acceptrace_listening", **web) == 1
    # only the listening socket's queue: the gone one has no depth now
    assert value(text, "acceptrace_accept_queue_length", address="0.0.0.0", **web) == 1
    assert value(text, "acceptrace_listen_sockets", address="0.0.0.0", **web) == 1
    assert value(text, "acceptrace_connections_total", event="accepted",
                 namespace="docker:db", port="8000") == 7
    # reasons that are null (tracepoint) have no series; the others add up to the overflows
    reasons = {dict(k[1])["reason"] for k in samples(text) if k[0] == "acceptrace_drops_total"}
    assert reasons == {"syn_dropped", "ack_dropped"} and set(DROP_REASONS) > reasons


def test_reuseport_sockets_add_their_queues():
    sec = section(11, "ip netns blue", 8000, accepted=1, drops=0, waits=[10])
    sec.queues.listeners.append(Listener("ipv4", "0.0.0.0", 8000, backlog=64, inode=99,
                                         depth_now=3))
    sec.queues.listeners.append(Listener("ipv6", "::", 8000, backlog=32, inode=98, depth_now=0))
    run = Run.new(port=0, backend="tracepoint")
    run.targets = [sec]
    text = scrape(ExportView(run, syn_queues={(11, 8000): 5}))
    lv = {"namespace": "netns:blue", "port": "8000"}
    assert value(text, "acceptrace_accept_queue_length", address="0.0.0.0", **lv) == 4
    assert value(text, "acceptrace_accept_queue_limit", address="0.0.0.0", **lv) == 192
    assert value(text, "acceptrace_listen_sockets", address="0.0.0.0", **lv) == 2
    assert value(text, "acceptrace_accept_queue_limit", address="::", **lv) == 32
    assert value(text, "acceptrace_syn_queue_length", **lv) == 5


def test_guard_holds_a_counter_that_would_go_back_and_counts_it():
    runs = [section(11, "x", 80, accepted=5, drops=2, waits=[10]),
            section(11, "x", 80, accepted=3, drops=2, waits=[10])]
    views = [ExportView(r, names={11: "host"}) for r in runs]
    reg = CollectorRegistry()
    reg.register(RunCollector(lambda: views.pop(0)))
    first = generate_latest(reg).decode()
    second = generate_latest(reg).decode()
    lv = {"namespace": "host", "port": "80", "event": "accepted"}
    assert value(first, "acceptrace_connections_total", **lv) == 5
    assert value(second, "acceptrace_connections_total", **lv) == 5  # held, not 3
    assert value(first, "acceptrace_regressions_held_total") == 0
    assert value(second, "acceptrace_regressions_held_total") == 2  # accepted and queued


def test_nothing_traced_yet_still_scrapes():
    text = scrape(None)
    assert value(text, "acceptrace_regressions_held_total") == 0


def test_namespace_fallback_labels():
    assert namespace_fallback(None) == "host"
    assert namespace_fallback({"inode": 1, "name": "acceptrace's own", "pid": None}) == "host"
    assert namespace_fallback({"inode": 1, "name": "ip netns blue", "pid": None}) == "netns:blue"
    assert namespace_fallback({"inode": 42, "name": "pid 7 (nginx)", "pid": 7}) == "inode:42"


def test_cost_is_exposed_per_program_and_passes_promtool():
    from acceptrace.model import Cost, ProgramCost

    run = Run.read(FIXTURE)
    run.cost = Cost(stats="BPF_ENABLE_STATS", seconds=10.0, user_cpu_s=0.25, peak_rss_kib=2048,
                    connections=100, timed_seconds=1.0, timed_connections=10, programs=[
                        ProgramCost("tracepoint:sock:sk_data_ready", 400, 2_000_000, 3,
                                    ["queued"]),
                        ProgramCost("tracepoint:syscalls:sys_exit_accept4", 100, 150_000, None,
                                    ["accepted"])])
    text = scrape(ExportView(run))
    p = "tracepoint:sock:sk_data_ready"
    assert value(text, "acceptrace_bpf_program_runs_total", program=p) == 400
    assert value(text, "acceptrace_bpf_program_run_seconds_total", program=p) == 0.002
    assert value(text, "acceptrace_bpf_program_missed_runs_total", program=p) == 3
    # not counted by this kernel for that attach type: no series rather than a false 0
    assert ("acceptrace_bpf_program_missed_runs_total",
            (("program", "tracepoint:syscalls:sys_exit_accept4"),)) not in samples(text)
    # the runs and seconds above were counted in 1 s of the 10 (--cost-every)
    assert value(text, "acceptrace_bpf_programs_timed_seconds_total") == 1.0
    assert value(text, "acceptrace_cpu_seconds_total") == 0.25
    assert value(text, "acceptrace_peak_resident_memory_bytes") == 2048 * 1024
    promtool = shutil.which("promtool")
    assert promtool
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
