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
6.25 %, above the true percentile).  In the last bucket, which also holds the
clamped values, it is the maximum.  See docs/histograms.md.
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
        # The count is the buckets' sum: a program on another CPU may be between its
        # bucket increment and its count increment while userspace reads (per-CPU
        # values are read without a lock), and a histogram must add up.
        counts = [int(b) for b in buckets]
        count = sum(counts)
        h = cls(unit, counts, count, sum_raw / scale)
        if count:
            nz = [i for i, c in enumerate(counts) if c]
            h.min, h.max = min_raw / scale, max_raw / scale
            # ... and a new min or max may be in its bucket before it is in min/max:
            # then the bucket's bound is what is known (hi for max: percentiles are
            # upper bounds capped at max)
            if not bucket_bounds(nz[0])[0] <= h.min <= bucket_bounds(nz[0])[1]:
                h.min = float(bucket_bounds(nz[0])[0])
            if not bucket_bounds(nz[-1])[0] <= h.max <= _top(nz[-1]):
                h.max = float(bucket_bounds(nz[-1])[1])
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
            lo, hi = bucket_bounds(nz[0])[0], _top(nz[-1])
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
                if i == NBUCKETS - 1 and self.max is not None:
                    return self.max  # the last bucket also holds the clamped values
                return min(hi, self.max) if self.max is not None else hi
        return self.max

    def nonempty_buckets(self) -> list[tuple[int, int, int]]:
        return [(*bucket_bounds(i), c) for i, c in enumerate(self.counts) if c]

    def to_json(self) -> dict:
        # the mean of the sum as written: a histogram read back writes the same mean
        total = _num(self.sum)
        d: dict = {
            "unit": self.unit,
            "count": self.count,
            "min": _num(self.min),
            "max": _num(self.max),
            "mean": _num(total / self.count) if self.count and total is not None else None,
        }
        for name, q in PERCENTILES:
            d[name] = _num(self.percentile(q))
        d["sum"] = _num(self.sum)
        d["buckets"] = [{"lo": lo, "hi": hi, "count": c} for lo, hi, c in self.nonempty_buckets()]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Histogram:
        """A histogram as to_json wrote it; ValueError unless every bucket is one of ours
        (``lo``/``hi`` bounds of a bucket, listed once), the counts add up to ``count``,
        and ``min <= max`` are finite and inside the first and last non-empty buckets."""
        try:
            unit = d["unit"]
            if not isinstance(unit, str) or len(unit) > 64:
                raise ValueError("unit must be a short string")
            h = cls(unit)
            buckets = d["buckets"]
            if not isinstance(buckets, list) or len(buckets) > NBUCKETS:
                raise ValueError(f"buckets must be a list of at most {NBUCKETS}")
            for b in buckets:
                lo, hi = _whole(b["lo"], "lo"), _whole(b["hi"], "hi")
                n = _whole(b["count"], "count")
                i = bucket_index(lo)
                if lo > MAX_VALUE or bucket_bounds(i) != (lo, hi):
                    raise ValueError(f"[{lo}, {hi}) is not a bucket")
                if h.counts[i]:
                    raise ValueError(f"bucket [{lo}, {hi}) listed twice")
                if n == 0:
                    raise ValueError(f"bucket [{lo}, {hi}) listed with count 0")
                h.counts[i] = n
            h.count = _whole(d["count"], "count")
            h.min = None if d.get("min") is None else _finite(d["min"], "min")
            h.max = None if d.get("max") is None else _finite(d["max"], "max")
            if d.get("sum") is not None:
                h.sum = _finite(d["sum"], "sum")
            elif d.get("mean") is not None:
                h.sum = _finite(d["mean"], "mean") * h.count
        except KeyError as exc:
            raise ValueError(f"malformed histogram: no {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed histogram: {exc}") from None
        if sum(h.counts) != h.count:
            raise ValueError("malformed histogram: bucket counts do not add up to count")
        nz = [i for i, c in enumerate(h.counts) if c]
        if h.min is not None and h.max is not None and h.min > h.max:
            raise ValueError("malformed histogram: min is above max")
        # min and max lie in the first and last non-empty bucket ([lo, hi]: to_json rounds
        # them to 3 decimals, which may carry one up to its bucket's hi)
        for v, at, what in ((h.min, nz[0] if nz else None, "min"),
                            (h.max, nz[-1] if nz else None, "max")):
            if v is not None and at is not None and not bucket_bounds(at)[0] <= v <= _top(at):
                raise ValueError(f"malformed histogram: {what} is not in its bucket")
        return h


def _top(i: int) -> float:
    """The most a value in bucket ``i`` can be: its hi, but for the last bucket, which
    also holds every larger value (clamped)."""
    return math.inf if i == NBUCKETS - 1 else bucket_bounds(i)[1]


def _whole(v: object, what: str) -> int:
    """A JSON integer 0 <= v < 2**64."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
        raise ValueError(f"{what} must be a non-negative integer, not {str(v)[:40]}")
    return v


def _finite(v: object, what: str) -> float:
    """A finite number >= 0 (JSON: int or float)."""
    if (isinstance(v, bool) or not isinstance(v, (int, float))
            or not math.isfinite(v) or not 0 <= v <= 1e19):
        raise ValueError(f"{what} must be a finite non-negative number, not {str(v)[:40]}")
    return float(v)
