"""Property-based tests (hypothesis): the histogram's buckets, percentiles, merge and
delta (tracer/hist.py, docs/histograms.md), and the run's JSON (tracer/model.py):
round trip, and that no JSON whatever makes the reader raise anything but ValueError.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from acceptrace.hist import MAX_VALUE, NBUCKETS, SUB, Histogram, bucket_bounds, bucket_index
from acceptrace.html import render_html
from acceptrace.model import (
    DROP_KEYS,
    STAGES,
    Cost,
    Interval,
    Listener,
    Meta,
    ProcessCount,
    ProgramCost,
    Queues,
    Run,
    Sample,
)
from acceptrace.render import render_compare, render_report, render_summary, to_text
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
FIXTURE = Path(__file__).parent / "fixtures" / "run-demo-overflow.json"

# Values a histogram holds: whole microseconds or connections, up to the clamp.
values = st.integers(min_value=0, max_value=MAX_VALUE)
small_lists = st.lists(st.integers(min_value=0, max_value=1 << 34), min_size=1, max_size=200)


def documented_bucket(v: int) -> int:
    """The bucket as hist.py's docstring writes it (independently of bucket_index)."""
    v = min(v, MAX_VALUE)
    if v < 16:
        return v
    e = math.floor(math.log2(v))
    while 1 << (e + 1) <= v:  # math.log2 rounds: make 2**e <= v < 2**(e+1) exact
        e += 1
    while 1 << e > v:
        e -= 1
    return 16 * (e - 3) + (v >> (e - 4)) - 16


@given(st.integers(min_value=0, max_value=1 << 70))
def test_bucket_index_is_the_documented_arithmetic(v):
    assert bucket_index(v) == documented_bucket(v)


@given(values, values)
def test_bucket_index_is_monotone(a, b):
    a, b = min(a, b), max(a, b)
    assert bucket_index(a) <= bucket_index(b)


@given(values)
def test_value_lies_in_its_bucket_and_the_bucket_is_narrow(v):
    i = bucket_index(v)
    lo, hi = bucket_bounds(i)
    assert lo <= v < hi
    assert 0 <= i < NBUCKETS
    if v >= SUB:
        assert (hi - lo) * 16 <= lo  # no wider than 1/16 of its lower bound
    else:
        assert (lo, hi) == (v, v + 1)  # exact below 16
    assert bucket_index(lo) == bucket_index(hi - 1) == i
    if i + 1 < NBUCKETS:
        assert bucket_bounds(i + 1)[0] == hi  # contiguous


@pytest.fixture(scope="module")
def c_bucket(tmp_path_factory):
    """at_hist_bucket() from bpf/acceptrace.h, compiled for userspace."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to compile bpf/acceptrace.h (make setup installs it)")
    d = tmp_path_factory.mktemp("cbucket")
    src = d / "b.c"
    src.write_text('#include <stdio.h>\n#include "acceptrace.h"\n'
                   'int main(void){unsigned long long v;'
                   'while(scanf("%llu",&v)==1)printf("%u\\n",at_hist_bucket(v));return 0;}\n')
    exe = d / "b"
    subprocess.run(["gcc", "-O2", "-DAT_USERSPACE", f"-I{BPF_DIR}", "-o", str(exe), str(src)],
                   check=True)
    return exe


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), min_size=1, max_size=300))
def test_python_and_c_bucketing_agree(c_bucket, vs):
    out = subprocess.run([str(c_bucket)], input="\n".join(map(str, vs)), capture_output=True,
                         text=True, check=True).stdout.split()
    assert [int(x) for x in out] == [bucket_index(v) for v in vs]


def hist_of(vs: list[float], unit: str = "us") -> Histogram:
    h = Histogram.empty(unit)
    for v in vs:
        h.add(v)
    return h


@given(small_lists, st.sampled_from([0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0]))
def test_percentile_is_an_upper_bound_within_one_sixteenth(vs, q):
    """The q percentile is the hi of the bucket of the ceil(q*n)-th smallest value,
    capped at the max: >= the true value, and at most 1/16 above it (at most 1 above
    it below 16, where buckets are exact).  (It equals 17/16 of the true value when
    that is a power of two 2**e >= 16 and not the max: the bucket [2**e, 17*2**(e-4)).)"""
    h = hist_of(vs)
    true = sorted(vs)[max(1, math.ceil(q * len(vs))) - 1]
    p = h.percentile(q)
    assert p is not None and true <= p <= max(vs)
    if bucket_index(true) == NBUCKETS - 1:
        assert p == max(vs)  # the last bucket holds every value clamped into it
    elif true >= SUB:
        assert p <= true * (1 + 1 / 16)
        if true & (true - 1):  # not a power of two: strictly less
            assert p < true * (1 + 1 / 16)
    else:
        assert p <= true + 1


@given(st.lists(st.floats(min_value=0, max_value=float(MAX_VALUE), allow_nan=False),
                min_size=1, max_size=100), st.floats(min_value=0.001, max_value=1.0))
def test_percentile_of_fractional_values(vs, q):
    """Durations are bucketed by their whole microseconds: the bound still holds (below
    the clamp; above it, the previous test)."""
    h = hist_of(vs)
    true = sorted(vs)[max(1, math.ceil(q * len(vs))) - 1]
    p = h.percentile(q)
    assert p is not None and true <= p <= max(vs)
    assert p <= max(true * (1 + 1 / 16), math.floor(true) + 1)


@given(small_lists, small_lists)
def test_merge_then_delta_gives_back_the_other(a_vs, b_vs):
    a, b = hist_of(a_vs), hist_of(b_vs)
    m = a.merge(b)
    assert m.count == a.count + b.count and m.sum == a.sum + b.sum
    assert m.min == min(a_vs + b_vs) and m.max == max(a_vs + b_vs)
    for got, want in ((m.delta(a), b), (m.delta(b), a)):
        assert got.counts == want.counts and got.count == want.count
        assert got.sum == want.sum  # integers: exact
        # a delta's min/max are its buckets' bounds, clamped into the whole's [min, max]
        assert got.min is not None and want.min is not None
        assert got.max is not None and want.max is not None
        assert bucket_bounds(bucket_index(int(want.min)))[0] <= got.min <= want.min
        last = bucket_index(int(want.max)) == NBUCKETS - 1  # holds the clamped values too
        assert want.max <= got.max <= (m.max if last else
                                       bucket_bounds(bucket_index(int(want.max)))[1])
        # and its percentiles are as high as the true ones, within a bucket
        for q in (0.5, 0.99):
            pg, pw = got.percentile(q), want.percentile(q)
            assert pg is not None and pw is not None
            assert pw <= pg <= (m.max if last else bucket_bounds(bucket_index(int(pw)))[1])
    assert m.delta(m).count == 0 and m.delta(m).counts == [0] * NBUCKETS


@given(small_lists, small_lists, small_lists)
def test_merge_is_commutative_and_associative(a_vs, b_vs, c_vs):
    a, b, c = hist_of(a_vs), hist_of(b_vs), hist_of(c_vs)
    ab_c, a_bc = a.merge(b).merge(c), a.merge(b.merge(c))
    assert a.merge(b).counts == b.merge(a).counts
    assert ab_c.counts == a_bc.counts and ab_c.count == a_bc.count
    assert (ab_c.min, ab_c.max) == (a_bc.min, a_bc.max)
    e = Histogram.empty("us")
    assert a.merge(e).to_json() == a.to_json() == e.merge(a).to_json()


@given(st.lists(st.floats(min_value=0, max_value=1e15, allow_nan=False), max_size=100))
def test_histogram_json_round_trip(vs):
    d = hist_of(vs).to_json()
    text = json.dumps(d)
    assert Histogram.from_json(json.loads(text)).to_json() == d


@settings(max_examples=30)
@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=NBUCKETS,
                max_size=NBUCKETS), st.integers(min_value=0, max_value=1 << 40),
       st.integers(min_value=0, max_value=1 << 40), st.integers(min_value=0, max_value=1 << 40))
def test_a_torn_kernel_read_still_adds_up(buckets, count, lo, hi):
    """A read of the kernel's histogram racing a program (count, min, max not yet
    updated) still gives a histogram that adds up and that the reader accepts."""
    h = Histogram.from_kernel("us", count, 0, lo, hi, buckets, 1000)
    assert h.count == sum(buckets)
    back = Histogram.from_json(json.loads(json.dumps(h.to_json())))
    assert back.count == h.count


# -- the run's JSON -------------------------------------------------------------------

def _opt(s: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | s


counts = st.integers(min_value=0, max_value=(1 << 64) - 1)
small = st.integers(min_value=0, max_value=1 << 31)
secs = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
text = st.text(max_size=30)
hists = st.builds(hist_of, st.lists(st.integers(min_value=0, max_value=1 << 33), max_size=30),
                  st.sampled_from(["us", "connections"]))
iv_stages = st.dictionaries(st.sampled_from(STAGES), st.fixed_dictionaries(
    {"count": small, "p50": _opt(secs), "p99": _opt(secs)}), max_size=4)
intervals = st.builds(
    Interval, t_s=secs, duration_s=secs, queued=small, accepted=small, read=small,
    listen_overflow=_opt(small), synack_retransmits=small, accept_queue_depth_max=_opt(small),
    stages=iv_stages, syn=_opt(small), syn_dropped=_opt(small), syncookies=small,
    syn_queue_depth_max=_opt(small), accept_queue_depth_now=_opt(small),
    dispatched=_opt(small), synq_dropped=_opt(small), responded=_opt(small))
samples = st.builds(
    Sample, family=st.sampled_from(["ipv4", "ipv6"]), saddr=text,
    sport=st.integers(0, 65535), daddr=text, dport=st.integers(0, 65535), pid=_opt(small),
    comm=_opt(text), syncookie=st.booleans(), synack_retransmits=small,
    handshake_us=_opt(secs), accept_queue_us=_opt(secs), syn_to_accept_us=_opt(secs),
    accept_to_read_us=_opt(secs), total_us=_opt(secs), accept_to_dispatch_us=_opt(secs),
    read_to_dispatch_us=_opt(secs), syn_to_dispatch_us=_opt(secs),
    dispatch_to_response_us=_opt(secs), requests=_opt(small), syn_retransmits=_opt(small),
    syn_retry_us=_opt(secs))
metas = st.builds(
    Meta, port=st.integers(0, 65535), backend=st.sampled_from(["fentry", "kprobe", "tracepoint"]),
    kernel=text, started=text, duration_s=secs, version=text, hostname=text, interval_s=secs,
    hooks=st.lists(text, max_size=3), notes=st.lists(text, max_size=3), somaxconn=_opt(small),
    netns=_opt(st.fixed_dictionaries({"inode": small, "name": text, "pid": _opt(small)})),
    ports=st.lists(st.integers(1, 65535), max_size=3), all_listeners=st.booleans(),
    all_namespaces=st.booleans(),
    namespaces=st.lists(st.fixed_dictionaries({"inode": small, "name": text,
                                               "pid": _opt(small)}), max_size=2))
queues = st.builds(
    Queues, backlog=_opt(small), accept_queue_depth=_opt(hists), syn_queue_depth=_opt(hists),
    listeners=st.lists(st.builds(Listener, family=st.sampled_from(["ipv4", "ipv6"]),
                                 address=text, port=st.integers(0, 65535), backlog=_opt(small),
                                 max_depth=_opt(small), inode=_opt(small),
                                 depth_now=_opt(small)), max_size=2))
costs = st.builds(
    Cost, stats=_opt(text), seconds=secs,
    programs=st.lists(st.builds(ProgramCost, hook=text, runs=counts, run_time_ns=counts,
                                missed=_opt(counts), feeds=st.lists(text, max_size=2)),
                      max_size=3),
    user_cpu_s=secs, peak_rss_kib=small, connections=small, virtual_machine=st.booleans(),
    why=_opt(text))
extras = st.fixed_dictionaries(
    {"accept_untracked": small, "queue_missed": small, "listener_sk_drops": small},
    optional={"syns": _opt(small), "softirqs_busy": _opt(small), "packets_unseen": _opt(small),
              "listeners_untraced": small, "future_key": st.lists(small, max_size=2)})


@st.composite
def sections(draw: st.DrawFn) -> Run:
    run = Run(meta=draw(metas))
    run.connections = draw(st.dictionaries(st.sampled_from(
        ["syn", "queued", "accepted", "read", "dispatched", "requests", "syn_retried"]),
        _opt(counts), min_size=4))
    run.drops = draw(st.fixed_dictionaries({k: _opt(counts) for k in DROP_KEYS}))
    run.kernel_counters = draw(st.dictionaries(st.sampled_from(
        ["TcpExtListenOverflows", "TcpExtListenDrops", "TcpPassiveOpens"]), counts))
    run.stages = draw(st.fixed_dictionaries({k: _opt(hists) for k in STAGES}))
    run.queues = draw(queues)
    run.processes = draw(st.lists(st.builds(ProcessCount, pid=small, comm=text, accepted=small),
                                  max_size=3))
    run.slowest = draw(st.lists(samples, max_size=3))
    run.extra = draw(extras)
    run.recent = draw(_opt(intervals))
    return run


@st.composite
def runs(draw: st.DrawFn) -> Run:
    run = draw(sections())
    run.intervals = draw(st.lists(intervals, max_size=3))
    run.targets = draw(st.lists(sections(), max_size=2))
    run.cost = draw(_opt(costs))
    return run


@settings(max_examples=60, deadline=None)
@given(runs())
def test_run_json_round_trip(run):
    """to_json -> JSON text -> from_json -> to_json is the identity."""
    d = run.to_json()
    back = Run.loads(json.dumps(d))
    assert back.to_json() == d
    assert Run.loads(back.dumps()).to_json() == d


# Any JSON value: the reader may refuse it, but only with a ValueError.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids,
                                                              max_size=4),
    max_leaves=30)


def only_value_errors(d: object) -> Run | None:
    try:
        return Run.from_json(d)
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_is_a_run_or_a_value_error(d):
    only_value_errors(d)
    only_value_errors({"schema": "acceptrace/v1", **d} if isinstance(d, dict) else d)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_a_run_or_a_value_error(data):
    try:
        Run.loads(data)
    except ValueError:
        pass


FIXTURE_JSON = json.loads(FIXTURE.read_text())


def _paths(d: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in d (dict keys and list indexes)."""
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d[:3]):
            out += _paths(v, (*prefix, i))
    return out


FIXTURE_PATHS = _paths(FIXTURE_JSON)[1:]


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIXTURE_PATHS), json_values | st.just("DELETE")),
                min_size=1, max_size=3))
def test_a_real_report_with_values_replaced_reads_or_is_refused(changes):
    """A real report with any of its values replaced by any JSON (or removed): either
    a ValueError, or a Run that every view renders without an exception."""
    d = copy.deepcopy(FIXTURE_JSON)
    for path, value in changes:
        parent = d
        try:
            for k in path[:-1]:
                parent = parent[k]
            if value == "DELETE":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            assume(False)
    run = only_value_errors(d)
    if run is None:
        return
    to_text(render_report(run), 120)
    to_text(render_summary(run), 120)
    to_text(render_compare(run, run), 120)
    render_html(run)
    assert Run.loads(run.dumps()).to_json() == run.to_json()


@settings(max_examples=100, deadline=None)
@given(st.lists(intervals, min_size=1, max_size=40))
def test_halving_intervals_keeps_every_count(ivs):
    """A long run's intervals merged pairwise (MAX_INTERVALS): the counts and the time
    covered are the same, maxima too, and each merged p50/p99 bounds both halves'."""
    from acceptrace.model import halve_intervals

    half = halve_intervals(ivs)
    assert len(half) == (len(ivs) + 1) // 2
    for key in ("queued", "accepted", "read", "synack_retransmits", "syncookies"):
        assert sum(getattr(i, key) for i in half) == sum(getattr(i, key) for i in ivs)
    for key in ("listen_overflow", "syn", "syn_dropped", "dispatched", "synq_dropped", "responded"):
        assert (sum(getattr(i, key) or 0 for i in half)
                == sum(getattr(i, key) or 0 for i in ivs))
    assert math.isclose(sum(i.duration_s for i in half), sum(i.duration_s for i in ivs),
                        abs_tol=0.001 * len(ivs))
    assert [i.t_s for i in half] == [b.t_s for b in ivs[1::2]] + (
        [ivs[-1].t_s] if len(ivs) % 2 else [])
    depth = [i.accept_queue_depth_max for i in ivs if i.accept_queue_depth_max is not None]
    assert max((i.accept_queue_depth_max or 0 for i in half), default=0) == max(depth,
                                                                                  default=0)
    for n, merged in enumerate(half):
        for part in ivs[2 * n:2 * n + 2]:
            for name, st_ in part.stages.items():
                for q in ("p50", "p99"):
                    if st_[q] is not None:
                        assert merged.stages[name][q] >= st_[q]
    # and it reads back: a halved run is a valid report
    run = Run.new(8000, "tracepoint")
    run.intervals = half
    assert Run.loads(run.dumps()).to_json() == run.to_json()
