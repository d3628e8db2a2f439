"""nbdcache.statistics: the table against the engine, and docs/statistics.md against the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbdcache import config
from nbdcache.core.bufinit import bufinit, midpoints
from nbdcache.engine import Engine
from nbdcache.histogram import LATENCY_KINDS
from nbdcache.statistics import (
    lookup,
    BY_NAME, GROUPS, KINDS, STATISTICS, UNITS, check_table, format_value, grouped,
    statistics_markdown, swap_statistics,
)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

SWAP_NAMES = """swap_slots_total swap_slots_used swap_slots_free swap_clean_slots swap_dirty_slots
swap_bad_slots swap_pageouts swap_pageout_runs swap_pageout_blocks swap_pageins swap_pagein_runs
swap_pagein_blocks swap_hits swap_almost_full swap_full swap_almost_full_transitions
swap_full_transitions swap_write_errors swap_read_errors swap_lost_dirty""".split()


@pytest.fixture(scope="module")
def engine_stats():
    cfg = config.load(None, {"backend.type": "memory", "backend.size": "64M",
                             "cache.ram": "16M"})
    return Engine(cfg).stats()


def test_docs_statistics_are_generated_from_the_table():
    committed = (ROOT / "docs" / "statistics.md").read_text()
    assert committed == statistics_markdown() + "\n", \
        "docs/statistics.md is stale: run `python -m nbdcache.statistics > docs/statistics.md`"


def test_engine_reports_nothing_the_table_lacks(engine_stats):
    assert check_table(engine_stats) == []


def test_check_table_catches_both_directions(engine_stats):
    extra = dict(engine_stats, brand_new_counter=1)
    assert any("brand_new_counter" in p for p in check_table(extra))
    missing = {k: v for k, v in engine_stats.items() if k != "bufspace"}
    assert any(p.startswith("bufspace:") for p in check_table(missing))


def test_table_entries_are_well_formed():
    names = [s.name for s in STATISTICS]
    assert len(names) == len(set(names))
    for s in STATISTICS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", s.name), s.name     # a Prometheus name too
        assert s.group in GROUPS and s.kind in KINDS and s.unit in UNITS
        assert s.help.endswith("."), s.name
        if s.kind == "counter":             # Prometheus adds _total to counters itself
            assert not s.name.endswith("_total"), s.name


def test_swap_and_latency_names_are_declared():
    for n in SWAP_NAMES:
        assert BY_NAME[n].group == "swap"
    for k in LATENCY_KINDS:
        assert BY_NAME[f"latency_{k}"].kind == "histogram"
    assert {s.name for s in STATISTICS if s.kind == "histogram"} == \
        {f"latency_{k}" for k in LATENCY_KINDS}


def test_kernel_ancestors_of_the_kernel_counters():
    for name in ("bufspace", "hibufspace", "lobufspace", "dirtykvaspace", "runningbufspace",
                 "getnewbufcalls", "hidirtybufspace", "lodirtybufspace", "hirunningspace"):
        assert BY_NAME[name].ancestor == name
    assert BY_NAME["swap_full"].ancestor == "swap_pager_full"
    assert BY_NAME["bd_wait_blocks"].ancestor == "bd_wait"


def test_worked_example_is_computed_from_bufinit():
    text = statistics_markdown()
    p = bufinit({"cache.ram": 1024 * MiB, "cache.block_size": 64 * 1024})
    mid1, mid2 = midpoints(p)
    for v in (p["hibufspace"], p["lobufspace"], p["hidirtybufspace"], mid1, mid2,
              p["lodirtybufspace"] // 2, p["hirunningspace"] * 4 // 6):
        assert f"{v / MiB:.1f}M" in text
    assert f"{100 * p['hibufspace'] / (1024 * MiB):.1f}% of 1G" in text


def test_docs_group_every_statistic_once():
    text = statistics_markdown()
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    for s in STATISTICS:
        assert sum(ln.startswith(f"| `{s.name}` |") for ln in rows) == 1, s.name
    assert len(rows) == len(STATISTICS)
    for g in GROUPS:
        assert f"## {g[0].upper()}{g[1:]}" in text


def test_grouping_and_formatting(engine_stats):
    groups = grouped(list(engine_stats) + ["mystery"])
    assert [g for g, _ in groups][:4] == ["buffer cache", "throttle", "daemons", "backend"]
    assert groups[-1] == ("other", ["mystery"])
    assert format_value("bufspace", 16 * MiB) == "16.0M"
    assert format_value("hit_ratio", 0.5) == "50.0%"
    assert format_value("bd_wait_seconds", 0.0025) == "2.5ms"
    assert format_value("hits", 12) == "12"
    assert format_value("mystery", "x") == "x"


def test_swap_pager_statistics_map_onto_the_table():
    pager = pytest.importorskip("nbdcache.swap.pager")
    device = pytest.importorskip("nbdcache.swap.device")
    p = pager.SwapPager([device.MemorySwapDevice(256, 64 * 1024)], 64 * 1024)
    st = swap_statistics(p.stats())
    assert [k for k in st if lookup(k) is None] == []
    declared = {s.name for s in STATISTICS if s.group == "swap"}
    by_cache = {"swap_hits", "swap_hit_ratio", "swap_pagein_neighbours", "swap_read_fallbacks",
                "swap_spill_dirty", "swap_spill_sync", "swap_spill_clean", "swap_drained",
                "swap_recycled_uncopied"}               # counted by the cache, not the pager
    per_device = {"swap_dev_slots_used", "swap_dev_slots_free"}     # as swap_dev0_...
    assert declared - set(st) == by_cache | per_device
    assert st["swap_dev0_slots_used"] == 0 and st["swap_dev0_slots_free"] == 256
    assert st["swap_slots_total"] == 256 and st["swap_slots_free"] == 256
    assert st["swap_almost_full"] == 0 and st["swap_lowat"] < st["swap_hiwat"]


def test_swap_statistics_renames_and_flags():
    st = swap_statistics({"nswap": 10, "swap_pager_full": True,
                          "devices": [{"slots": 10, "used": 4, "free": 6}], "brand_new": 3})
    assert st == {"swap_slots_total": 10, "swap_full": 1, "swap_brand_new": 3,
                  "swap_dev0_slots_used": 4, "swap_dev0_slots_free": 6}
    assert any(p.startswith("swap_brand_new:") for p in check_table(st))
