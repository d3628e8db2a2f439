"""Latency histograms cheap enough for the request path.

Theory of operation
-------------------
A :class:`Histogram` counts durations in nanoseconds into fixed log2 buckets::

    bucket 0         ns < 2**10            (under ~1 us)
    bucket i, 1..24  2**(9+i) <= ns < 2**(10+i)
    bucket 25        ns >= 2**34           (over ~17.2 s: overflow)

``record(ns)`` is the hot path: one ``int.bit_length()``, two comparisons, a
list increment and an integer add; it allocates nothing (beyond the integers
Python makes for large sums).  Everything else (percentiles, snapshots,
merging) is done when somebody asks, off the hot path.

A bucket is named by its upper bound in seconds (``2**(10+i) / 1e9``; ``inf``
for the overflow).  Prometheus buckets are ``le`` (less than or equal) where
ours are "less than"; with integer nanoseconds the two differ only for a
duration of exactly a power of two, which lands one bucket higher.

Percentiles are estimates: the bucket holding the wanted rank is found, and
the value interpolated linearly inside it, so the error is below the bucket's
width (a factor of two).  An estimate in the overflow bucket is its lower
bound.

Naming (``LatencySet``): one histogram per kind of guest request, reported by
``Engine.stats()`` as ``latency_<kind>``: ``latency_read_hit`` (every block
from the cache), ``latency_read_miss`` (at least one backend or swap read),
``latency_write``, ``latency_flush``, ``latency_trim``, ``latency_zero``.
Each is declared in ``nbdcache.statistics``.

Locking: none inside.  ``record`` is meant to be called with the engine lock
held; without a lock, concurrent ``record`` calls may lose an increment now
and then (a list item ``+=`` is not atomic), which a statistic can afford.
``snapshot`` and ``merge`` read or add whole lists and may run concurrently
with ``record`` at the same cost.  Nothing here blocks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

MIN_SHIFT = 10                          # bucket 0 ends at 2**10 ns, about 1 us
NBUCKETS = 26                           # 25 bounded buckets up to 2**34 ns, plus overflow
LAST = NBUCKETS - 1
UPPER_NS: tuple[int, ...] = tuple(1 << (MIN_SHIFT + i) for i in range(LAST))
UPPER_SECONDS: tuple[float, ...] = tuple(n / 1e9 for n in UPPER_NS) + (math.inf,)
_INDEX_BY_UPPER = {u: i for i, u in enumerate(UPPER_SECONDS)}


class HistogramError(ValueError):
    """A snapshot given to ``merge`` does not have this module's buckets."""


class Histogram:
    """Counts of durations in log2 buckets of nanoseconds."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.sum_ns = 0

    def record(self, ns: int) -> None:
        """Count one duration of ``ns`` >= 0 nanoseconds.  O(1), no allocation, never blocks."""
        i = ns.bit_length() - MIN_SHIFT
        if i < 0:
            i = 0
        elif i > LAST:
            i = LAST
        self.counts[i] += 1
        self.sum_ns += ns

    def check_invariants(self) -> None:
        """Raise HistogramError unless there are NBUCKETS counts, none negative, and the sum
        lies between what the recorded counts' bucket bounds allow."""
        c = self.counts
        if len(c) != NBUCKETS or any(not isinstance(n, int) or n < 0 for n in c):
            raise HistogramError(f"bucket counts corrupt: {c!r}")
        low = sum(n * (UPPER_NS[i - 1] if i else 0) for i, n in enumerate(c))
        high = sum(n * UPPER_NS[i] for i, n in enumerate(c[:LAST]))
        if self.sum_ns < low or (not c[LAST] and self.sum_ns > high):
            raise HistogramError(f"sum {self.sum_ns} ns outside [{low}, {high}] for {c!r}")

    @property
    def count(self) -> int:
        return sum(self.counts)

    def percentile(self, q: float, counts: list[int] | None = None) -> float:
        """Estimated ``q``-quantile (0 < q <= 1) in seconds; 0.0 when empty."""
        counts = self.counts if counts is None else counts
        total = sum(counts)
        if total == 0:
            return 0.0
        rank = q * total
        cum = 0
        for i, c in enumerate(counts):
            if c and cum + c >= rank:
                lower = UPPER_NS[i - 1] if i else 0
                if i == LAST:
                    return lower / 1e9
                frac = (rank - cum) / c
                return (lower + frac * (UPPER_NS[i] - lower)) / 1e9
            cum += c
        return UPPER_NS[-1] / 1e9       # not reached: the last non-empty bucket has rank

    def snapshot(self) -> dict[str, Any]:
        """``{count, sum_seconds, buckets: {upper_seconds: count} (non-empty only), p50, p90,
        p99}``: a JSON-able copy (float keys become strings; ``merge`` takes either)."""
        counts = list(self.counts)
        return {
            "count": sum(counts),
            "sum_seconds": self.sum_ns / 1e9,
            "buckets": {UPPER_SECONDS[i]: c for i, c in enumerate(counts) if c},
            "p50": self.percentile(0.50, counts),
            "p90": self.percentile(0.90, counts),
            "p99": self.percentile(0.99, counts),
        }

    def merge(self, other: "Histogram | Mapping[str, Any]") -> "Histogram":
        """Add ``other`` (a Histogram or a snapshot, even one read back from JSON) to this
        one; return self.  Raises HistogramError on buckets of another layout."""
        if isinstance(other, Histogram):
            for i, c in enumerate(other.counts):
                self.counts[i] += c
            self.sum_ns += other.sum_ns
            return self
        add = [0] * NBUCKETS
        for key, c in other.get("buckets", {}).items():
            i = _INDEX_BY_UPPER.get(float(key))
            if i is None:
                raise HistogramError(f"bucket {key!r}: not an upper bound of this histogram")
            add[i] += int(c)
        for i, c in enumerate(add):
            self.counts[i] += c
        self.sum_ns += round(float(other.get("sum_seconds", 0.0)) * 1e9)
        return self

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> "Histogram":
        return cls().merge(snap)

    def cumulative(self) -> list[tuple[float, int]]:
        """Prometheus-style ``[(upper_seconds, count <= it), ...]`` ending with ``(inf, n)``."""
        out, cum = [], 0
        for u, c in zip(UPPER_SECONDS, list(self.counts)):
            cum += c
            out.append((u, cum))
        return out


def is_snapshot(value: Any) -> bool:
    """True if ``value`` looks like ``Histogram.snapshot()`` (possibly via JSON)."""
    return isinstance(value, Mapping) and "buckets" in value and "count" in value


LATENCY_KINDS: tuple[str, ...] = ("read_hit", "read_miss", "write", "flush", "trim", "zero")


class LatencySet:
    """One Histogram per guest request kind: ``.read_hit.record(ns)`` and so on.

    ``snapshot()`` gives ``{"latency_<kind>": Histogram.snapshot()}`` for
    ``Engine.stats()``.  Same locking rule as Histogram.
    """

    __slots__ = LATENCY_KINDS

    def __init__(self) -> None:
        for k in LATENCY_KINDS:
            setattr(self, k, Histogram())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {f"latency_{k}": getattr(self, k).snapshot() for k in LATENCY_KINDS}


def delta(later: Mapping[str, Any], earlier: Mapping[str, Any] | None) -> dict[str, Any]:
    """The snapshot of what was recorded between two snapshots of one histogram (for rates
    and per-interval percentiles).  A bucket that went down (a restart) counts from zero."""
    h = Histogram.from_snapshot(later)
    if earlier:
        e = Histogram.from_snapshot(earlier)
        if all(a >= b for a, b in zip(h.counts, e.counts)):
            h.counts = [a - b for a, b in zip(h.counts, e.counts)]
            h.sum_ns = max(0, h.sum_ns - e.sum_ns)
    return h.snapshot()
