"""nbdcache.histogram: bucket boundaries, percentile estimates, snapshots and merging."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcache.histogram import (
    LAST, LATENCY_KINDS, NBUCKETS, UPPER_NS, UPPER_SECONDS, Histogram, HistogramError,
    LatencySet, delta, is_snapshot,
)

durations = st.integers(min_value=0, max_value=1 << 40)


def bucket_of(ns: int) -> int:
    h = Histogram()
    h.record(ns)
    return h.counts.index(1)


def test_bucket_edges():
    assert bucket_of(0) == 0
    assert bucket_of(1023) == 0                       # under 2**10 ns
    assert bucket_of(1024) == 1
    assert bucket_of(2047) == 1
    assert bucket_of(2048) == 2
    assert bucket_of((1 << 34) - 1) == LAST - 1        # the last bounded bucket
    assert bucket_of(1 << 34) == LAST                  # overflow
    assert bucket_of(10**15) == LAST
    assert len(UPPER_SECONDS) == NBUCKETS and math.isinf(UPPER_SECONDS[-1])
    assert UPPER_SECONDS[0] == pytest.approx(1.024e-6)
    assert UPPER_SECONDS[-2] == pytest.approx(17.18, rel=1e-3)


@given(durations)
def test_every_duration_lands_below_its_bucket_bound(ns):
    i = bucket_of(ns)
    if i < LAST:
        assert ns < UPPER_NS[i]
    if i > 0:
        assert ns >= UPPER_NS[i - 1]


@given(st.lists(durations, min_size=1, max_size=200))
def test_snapshot_counts_sum_and_ordered_percentiles(values):
    h = Histogram()
    for v in values:
        h.record(v)
    h.check_invariants()
    s = h.snapshot()
    assert s["count"] == len(values) == sum(s["buckets"].values())
    assert s["sum_seconds"] == pytest.approx(sum(values) / 1e9)
    assert 0 <= s["p50"] <= s["p90"] <= s["p99"]
    # Each estimate lies within the bucket that holds that rank (a factor of two).
    ordered = sorted(values)
    true_p50 = ordered[math.ceil(0.5 * len(ordered)) - 1] / 1e9
    i = bucket_of(round(true_p50 * 1e9))
    lower = UPPER_NS[i - 1] / 1e9 if i else 0.0
    upper = UPPER_SECONDS[i]
    assert lower <= s["p50"] <= upper


@settings(max_examples=50)
@given(st.lists(durations, max_size=100), st.lists(durations, max_size=100))
def test_merge_of_a_json_snapshot_equals_merging_the_histogram(a, b):
    ha, hb = Histogram(), Histogram()
    for v in a:
        ha.record(v)
    for v in b:
        hb.record(v)
    via_json = Histogram().merge(json.loads(json.dumps(ha.snapshot()))).merge(hb.snapshot())
    direct = Histogram().merge(ha).merge(hb)
    direct.check_invariants()
    assert via_json.counts == direct.counts
    assert abs(via_json.sum_ns - direct.sum_ns) <= 2


def test_empty_histogram():
    s = Histogram().snapshot()
    assert s == {"count": 0, "sum_seconds": 0.0, "buckets": {}, "p50": 0.0, "p90": 0.0,
                 "p99": 0.0}


def test_percentiles_of_a_known_distribution():
    h = Histogram()
    for _ in range(90):
        h.record(5_000)                 # 5 us: bucket (4096, 8192]
    for _ in range(10):
        h.record(2_000_000_000)         # 2 s
    s = h.snapshot()
    assert 4.096e-6 <= s["p50"] <= 8.192e-6
    assert 4.096e-6 <= s["p90"] <= 8.192e-6
    assert 1.073 <= s["p99"] <= 2.148


def test_overflow_percentile_is_the_lower_bound():
    h = Histogram()
    h.record(100 * 10**9)
    assert h.snapshot()["p99"] == pytest.approx(UPPER_NS[-1] / 1e9)


def test_invariant_checker_catches_corruption():
    h = Histogram()
    h.record(5000)
    h.check_invariants()
    h.sum_ns = 10
    with pytest.raises(HistogramError, match="outside"):
        h.check_invariants()
    h.counts[3] = -1
    with pytest.raises(HistogramError, match="corrupt"):
        h.check_invariants()


def test_merge_refuses_foreign_buckets():
    with pytest.raises(HistogramError, match="not an upper bound"):
        Histogram().merge({"count": 1, "sum_seconds": 0.1, "buckets": {"0.3": 1}})


def test_cumulative_buckets_end_with_inf_and_the_count():
    h = Histogram()
    for v in (10, 5000, 5000, 10**10):
        h.record(v)
    cum = h.cumulative()
    assert cum[-1] == (math.inf, 4)
    assert all(a[1] <= b[1] for a, b in zip(cum, cum[1:]))


def test_delta_is_what_was_recorded_in_between():
    h = Histogram()
    h.record(5000)
    before = h.snapshot()
    h.record(3_000_000)
    h.record(3_000_000)
    d = delta(h.snapshot(), before)
    assert d["count"] == 2 and d["sum_seconds"] == pytest.approx(0.006)
    assert delta(before, h.snapshot())["count"] == 1       # went down: a restart


def test_latency_set_names_and_snapshot():
    ls = LatencySet()
    ls.read_hit.record(1500)
    ls.write.record(2_000_000)
    snap = ls.snapshot()
    assert set(snap) == {f"latency_{k}" for k in LATENCY_KINDS}
    assert snap["latency_read_hit"]["count"] == 1 and snap["latency_read_miss"]["count"] == 0
    assert all(is_snapshot(v) for v in snap.values())


def test_record_is_cheap():
    h = Histogram()
    record = h.record
    n = 200_000
    t0 = time.perf_counter()
    for i in range(n):
        record(i * 997)
    elapsed = time.perf_counter() - t0
    assert h.count == n
    assert elapsed < 2.0, f"{n} records took {elapsed:.2f}s"
