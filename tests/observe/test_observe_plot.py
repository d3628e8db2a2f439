"""nbdcache.plot: series from a JSON-lines log, and the PNG (synthetic log here; the log of a
real run in test_observe_integration.py)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from nbdcache.plot import (  # noqa: E402
    PlotError, dirty_marks, interval_hit_ratio, load, plot, rates, read_samples,
)

MiB = 1024 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stats_event(i: int, t0: datetime, swap: bool = False) -> dict:
    ev = {
        "event": "stats", "level": "info", "component": "engine",
        "timestamp": (t0 + timedelta(seconds=0.5 * i)).isoformat().replace("+00:00", "Z"),
        "bufspace": min(i, 20) * MiB, "maxbufspace": 16 * MiB, "hibufspace": 15 * MiB,
        "lobufspace": 13 * MiB, "dirtykvaspace": (i % 7) * MiB, "runningbufspace": MiB // 2,
        "lodirtybufspace": 4 * MiB, "hidirtybufspace": 8 * MiB, "hirunningspace": MiB,
        "writeback_bytes": i * 3 * MiB, "reads": 10 * i, "writes": 20 * i,
        "hits": 9 * i, "misses": i, "uptime": 0.5 * i,
        "latency_write": {"count": i, "sum_seconds": 0.001 * i, "buckets": {}},
    }
    if swap:
        ev.update(swap_slots_total=1000, swap_slots_used=min(1000, 100 * i), swap_lowat=128,
                  swap_hiwat=512, swap_almost_full=int(100 * i > 872))
    return ev


def write_log(path: Path, n: int, swap: bool = False) -> Path:
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    lines = ['{"event": "engine.start", "timestamp": "2025-01-01T00:00:00Z"}',
             "garbage that is not JSON", "[1, 2, 3]", ""]
    for i in range(n):
        lines.append(json.dumps(stats_event(i, t0, swap)))
        lines.append('{"event": "tunable.set", "key": "cache.max_io"}')
    lines.append('{"event": "stats", "trunc')                  # a line cut by a crash
    path.write_text("\n".join(lines) + "\n")
    return path


def test_only_stats_lines_are_samples_timed_from_the_first(tmp_path):
    samples = load(write_log(tmp_path / "a.jsonl", 5))
    assert [t for t, _ in samples] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert all(ev["event"] == "stats" for _, ev in samples)


def test_series(tmp_path):
    samples = load(write_log(tmp_path / "a.jsonl", 4))
    wb = rates(samples, "writeback_bytes", MiB)
    assert math.isnan(wb[0]) and wb[1:] == [6.0, 6.0, 6.0]
    assert rates(samples, "writes")[1:] == [40.0, 40.0, 40.0]
    assert interval_hit_ratio(samples)[1:] == [0.9, 0.9, 0.9]
    marks = dirty_marks(samples)
    assert marks["lodirtybufspace"][0] == 4 and marks["hidirtybufspace"][0] == 8
    assert marks["mid1"][0] == 6 and marks["mid2"][0] == 7


def test_counter_reset_and_missing_timestamps():
    lines = [json.dumps({"event": "stats", "uptime": u, "writes": w})
             for u, w in ((1.0, 100), (2.0, 150), (0.5, 3))]
    samples = read_samples(lines)
    assert [t for t, _ in samples] == [0.0, 1.0, -0.5]
    r = rates(samples, "writes")
    assert r[1] == 50.0 and math.isnan(r[2])


def test_plot_writes_a_png(tmp_path):
    out = plot(write_log(tmp_path / "a.jsonl", 30), tmp_path / "a.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_plot_with_swap_fields(tmp_path):
    out = plot(write_log(tmp_path / "s.jsonl", 12, swap=True), tmp_path / "s.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_samples_is_a_clear_error(tmp_path, n):
    log = write_log(tmp_path / "short.jsonl", n)
    with pytest.raises(PlotError, match=rf"{n} `stats` sample\(s\), at least 2"):
        plot(log, tmp_path / "short.png")
    assert not (tmp_path / "short.png").exists()


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(PlotError, match="cannot read the log"):
        plot(tmp_path / "nope.jsonl", tmp_path / "nope.png")
