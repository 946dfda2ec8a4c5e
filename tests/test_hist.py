"""Histogram buckets and percentiles (docs/histograms.md), and C/Python agreement."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from acceptrace.hist import MAX_VALUE, NBUCKETS, Histogram, bucket_bounds, bucket_index

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"


def test_every_small_value_is_inside_its_bucket():
    for v in range(1 << 18):
        lo, hi = bucket_bounds(bucket_index(v))
        assert lo <= v < hi


def test_buckets_are_contiguous_and_cover_the_range():
    assert NBUCKETS == 464
    assert bucket_bounds(0) == (0, 1)
    for i in range(1, NBUCKETS):
        assert bucket_bounds(i)[0] == bucket_bounds(i - 1)[1]
    assert bucket_bounds(NBUCKETS - 1)[1] == MAX_VALUE + 1


def test_relative_width_at_most_one_sixteenth():
    for i in range(16, NBUCKETS):
        lo, hi = bucket_bounds(i)
        assert (hi - lo) / lo <= 1 / 16


@pytest.mark.parametrize("v, lo, hi", [
    (0, 0, 1), (15, 15, 16), (16, 16, 17), (31, 31, 32), (32, 32, 34), (33, 32, 34),
    (1000, 992, 1024), (1024, 1024, 1088), (100_000, 98_304, 102_400),
    (1_000_000, 983_040, 1_015_808), (100_000_000, 96_468_992, 100_663_296),
])
def test_known_bounds(v, lo, hi):
    assert bucket_bounds(bucket_index(v)) == (lo, hi)


def test_clamp_above_range():
    last = NBUCKETS - 1
    for v in (MAX_VALUE, MAX_VALUE + 1, 1 << 40, 1 << 63):
        assert bucket_index(v) == last
    assert bucket_index(-5) == 0


def test_percentiles_upper_bound_semantics():
    h = Histogram.empty("us")
    for v in (10, 20, 30, 40, 1000):
        h.add(v)
    # rank ceil(0.5*5)=3 -> value 30 lies in [30, 31) -> 31
    assert h.percentile(0.5) == 31
    assert h.percentile(0.2) == 11      # rank 1 exactly: 10 in [10, 11)
    assert h.percentile(0.8) == 42      # rank 4: 40 is in [40, 42)
    assert h.percentile(0.99) == 1000   # bucket [992, 1024) clamped to the max 1000
    assert h.min == 10 and h.max == 1000 and h.mean == 220


def test_percentile_single_value_and_empty():
    h = Histogram.empty("us")
    assert h.percentile(0.5) is None and h.mean is None
    h.add(5000.7)
    assert h.percentile(0.5) == 5000.7  # bucket hi 5120 clamped to the exact max
    assert h.percentile(0.999) == 5000.7


def test_merge_and_delta():
    a, b = Histogram.empty("us"), Histogram.empty("us")
    for v in (1, 2, 3):
        a.add(v)
    b.add(500)
    m = a.merge(b)
    assert m.count == 4 and m.min == 1 and m.max == 500 and m.sum == 506
    assert a.merge(Histogram.empty("us")).min == 1  # an empty side has no min
    d = m.delta(a)
    assert d.count == 1 and d.percentile(0.5) == 500
    assert d.min == 496 and d.max == 500  # bucket [496, 512) clamped into [min, max]


def test_from_kernel_scales_ns_to_us():
    buckets = [0] * NBUCKETS
    buckets[bucket_index(1500)] = 2
    h = Histogram.from_kernel("us", 2, 3_000_400, 1_500_100, 1_500_300, buckets, 1000)
    assert h.count == 2 and h.min == 1500.1 and h.max == 1500.3 and h.sum == 3000.4
    assert h.percentile(0.5) == 1500.3


def test_json_round_trip():
    h = Histogram.empty("us")
    rng = random.Random(7)
    for _ in range(1000):
        h.add(rng.expovariate(1 / 2000))
    d = h.to_json()
    assert list(d) == ["unit", "count", "min", "max", "mean", "p50", "p90", "p99", "p999",
                       "sum", "buckets"]
    assert [b["lo"] for b in d["buckets"]] == sorted(b["lo"] for b in d["buckets"])
    assert all(b["count"] > 0 for b in d["buckets"])
    assert Histogram.from_json(d).to_json() == d
    empty = Histogram.empty("connections").to_json()
    assert empty["count"] == 0 and empty["p50"] is None and empty["buckets"] == []
    with pytest.raises(ValueError, match="add up"):
        Histogram.from_json({**d, "count": d["count"] + 1})


def test_c_and_python_bucketing_agree(tmp_path):
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to compile bpf/acceptrace.h (make setup installs it)")
    rng = random.Random(42)
    values = list(range(0, 5000)) + [rng.getrandbits(rng.randint(1, 40)) for _ in range(100_000)]
    values += [(1 << e) + d for e in range(64) for d in (-1, 0, 1) if (1 << e) + d >= 0]
    values = [v for v in values if v < 1 << 64]
    src = tmp_path / "b.c"
    src.write_text('#include <stdio.h>\n#include "acceptrace.h"\n'
                   'int main(void){unsigned long long v;'
                   'while(scanf("%llu",&v)==1)printf("%u\\n",at_hist_bucket(v));return 0;}\n')
    exe = tmp_path / "b"
    subprocess.run(["gcc", "-O2", "-DAT_USERSPACE", f"-I{BPF_DIR}", "-o", str(exe), str(src)],
                   check=True)
    out = subprocess.run([str(exe)], input="\n".join(map(str, values)), capture_output=True,
                         text=True, check=True).stdout.split()
    assert [int(x) for x in out] == [bucket_index(v) for v in values]
