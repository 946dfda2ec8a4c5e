"""Log-linear histograms, mirroring the kernel-side bucketing of bpf/acceptrace.h.

Buckets (values are non-negative integers: microseconds for durations,
connections for queue depths):

* ``v < 16``: bucket ``v``, bounds ``[v, v+1)`` (exact);
* ``2**e <= v < 2**(e+1)``, ``e >= 4``: 16 equal sub-buckets per power of two,
  bucket ``16*(e-3) + (v >> (e-4)) - 16``, bounds
  ``[(16+s) << (e-4), (17+s) << (e-4))`` with ``s`` the sub-bucket;

so no bucket is wider than 1/16 (6.25 %) of its lower bound.  Values of
``2**32`` and above are clamped to ``2**32 - 1`` (71.6 minutes in us); there
are 464 buckets.  A duration is bucketed by its whole microseconds (the kernel
divides nanoseconds by 1000), so a bucket ``[lo, hi)`` holds true values in
``[lo, hi)`` us.

Percentiles use **upper-bound semantics**: the ``q`` percentile is the upper
bound ``hi`` of the bucket holding the ``ceil(q * count)``-th smallest value,
but never more than the exact maximum.  "p99 = 840 us" thus means: at least
99 % of the values were below 840 us (and the bound is at most one bucket,
6.25 %, above the true percentile).  See docs/histograms.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

SUB_BITS = 4
SUB = 1 << SUB_BITS
MAX_EXP = 32
MAX_VALUE = (1 << MAX_EXP) - 1
NBUCKETS = SUB * (MAX_EXP - SUB_BITS + 1)  # 464
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))


def bucket_index(v: int) -> int:
    """The bucket of integer value ``v`` (same arithmetic as at_hist_bucket in C)."""
    v = max(0, min(int(v), MAX_VALUE))
    if v < SUB:
        return v
    e = v.bit_length() - 1
    return SUB * (e - SUB_BITS + 1) + (v >> (e - SUB_BITS)) - SUB


def bucket_bounds(i: int) -> tuple[int, int]:
    """``[lo, hi)`` of bucket ``i``."""
    if not 0 <= i < NBUCKETS:
        raise IndexError(f"bucket {i} out of range 0..{NBUCKETS - 1}")
    if i < SUB:
        return i, i + 1
    e, sub = i // SUB + SUB_BITS - 1, i % SUB
    shift = e - SUB_BITS
    return (SUB + sub) << shift, (SUB + sub + 1) << shift


def _num(x: float | None, digits: int = 3) -> float | int | None:
    if x is None:
        return None
    r = round(float(x), digits)
    return int(r) if r == int(r) else r


@dataclass
class Histogram:
    unit: str
    counts: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    count: int = 0
    sum: float = 0.0
    min: float | None = None
    max: float | None = None

    @classmethod
    def empty(cls, unit: str) -> Histogram:
        return cls(unit)

    @classmethod
    def from_kernel(
        cls,
        unit: str,
        count: int,
        sum_raw: int,
        min_raw: int,
        max_raw: int,
        buckets: Sequence[int],
        scale: int,
    ) -> Histogram:
        """From the kernel's struct at_hist (already summed over CPUs).

        ``sum/min/max`` are in the kernel's raw unit (ns for durations) and are
        divided by ``scale``; the buckets are already of the scaled value.
        """
        if len(buckets) != NBUCKETS:
            raise ValueError(f"expected {NBUCKETS} buckets, got {len(buckets)}")
        h = cls(unit, [int(b) for b in buckets], int(count), sum_raw / scale)
        if count:
            h.min, h.max = min_raw / scale, max_raw / scale
        return h

    def add(self, value: float) -> None:
        self.counts[bucket_index(int(value))] += 1
        self.count += 1
        self.sum += value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    def merge(self, other: Histogram) -> Histogram:
        """The sum of two histograms (e.g. of two CPUs); an empty side is ignored."""
        if not other.count or not self.count:  # the other one, copied (idle listeners)
            src = self if not other.count else other
            return Histogram(self.unit, list(src.counts), src.count, src.sum, src.min, src.max)
        out = Histogram(self.unit, [a + b for a, b in zip(self.counts, other.counts)],
                        self.count + other.count, self.sum + other.sum)
        mins = [m for m in (self.min, other.min) if m is not None]
        maxs = [m for m in (self.max, other.max) if m is not None]
        out.min = min(mins) if mins else None
        out.max = max(maxs) if maxs else None
        return out

    def delta(self, prev: Histogram) -> Histogram:
        """What was added since the cumulative snapshot ``prev``.

        min and max of a delta are not known exactly: they are the lo of the
        lowest and the hi of the highest non-empty bucket, clamped into this
        histogram's overall [min, max].
        """
        if self.count == prev.count:  # nothing added (cumulative: the buckets agree)
            return Histogram(self.unit)
        counts = [a - b for a, b in zip(self.counts, prev.counts)]
        out = Histogram(self.unit, counts, self.count - prev.count, self.sum - prev.sum)
        nz = [i for i, c in enumerate(counts) if c > 0]
        if nz and out.count > 0:
            lo, hi = bucket_bounds(nz[0])[0], bucket_bounds(nz[-1])[1]
            out.min = max(lo, self.min) if self.min is not None else lo
            out.max = min(hi, self.max) if self.max is not None else hi
        return out

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def percentile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                hi = float(bucket_bounds(i)[1])
                return min(hi, self.max) if self.max is not None else hi
        return self.max

    def nonempty_buckets(self) -> list[tuple[int, int, int]]:
        return [(*bucket_bounds(i), c) for i, c in enumerate(self.counts) if c]

    def to_json(self) -> dict:
        d: dict = {
            "unit": self.unit,
            "count": self.count,
            "min": _num(self.min),
            "max": _num(self.max),
            "mean": _num(self.mean),
        }
        for name, q in PERCENTILES:
            d[name] = _num(self.percentile(q))
        d["sum"] = _num(self.sum)
        d["buckets"] = [{"lo": lo, "hi": hi, "count": c} for lo, hi, c in self.nonempty_buckets()]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Histogram:
        try:
            h = cls(str(d["unit"]))
            for b in d["buckets"]:
                h.counts[bucket_index(int(b["lo"]))] += int(b["count"])
            h.count = int(d["count"])
            h.min = None if d.get("min") is None else float(d["min"])
            h.max = None if d.get("max") is None else float(d["max"])
            if "sum" in d and d["sum"] is not None:
                h.sum = float(d["sum"])
            elif d.get("mean") is not None:
                h.sum = float(d["mean"]) * h.count
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed histogram: {exc}") from exc
        if sum(h.counts) != h.count:
            raise ValueError("malformed histogram: bucket counts do not add up to count")
        return h
