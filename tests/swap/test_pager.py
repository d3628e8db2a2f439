"""nbdcache.swap.pager: putpages/getpages policy, credits, watermarks and errors, driven
phase by phase on in-memory devices, plus a stateful test against a dict model.

Every test reads counters and device logs, never the clock; ``check_invariants``
runs after each step that changes state.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
)

from nbdcache.swap.device import MemorySwapDevice, SwapDevice
from nbdcache.swap.pager import (
    SwapNoCredit, SwapPager, SwapPagerError, SwapPagerInvariantError, swap_watermarks,
)

BS = 4096


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def info(self, event: str, **kw) -> None:
        self.events.append(event)

    warning = info


def payload(blkno: int, ver: int = 0, bs: int = BS) -> bytes:
    unit = blkno.to_bytes(4, "little") + ver.to_bytes(4, "little")
    return (unit * (bs // 8 + 1))[:bs]


def mk(sizes=(256,), dmmax=32, **kw):
    devs = [MemorySwapDevice(n, BS, f"m{i}") for i, n in enumerate(sizes)]
    kw.setdefault("log", Log())
    return SwapPager(devs, BS, dmmax=dmmax, **kw), devs


def clean(b: int) -> tuple[int, int, int]:
    return (b, 0x1, 0x0)


def dirty(b: int) -> tuple[int, int, int]:
    return (b, 0x3, 0x1)


def fill(run, ver: int = 0) -> None:
    for i, b in enumerate(run.blknos):
        run.block(i)[:] = payload(b, ver)


def pageout(p, victims, sync=True, ver=0):
    """Page out and complete every run; return (runs, failed, results)."""
    runs, failed = p.putpages_begin(victims, sync)
    p.check_invariants()
    results = []
    for run in runs:
        fill(run, ver)
        p.pageout_io(run)
        results += p.putpages_done(run)
        p.check_invariants()
    return runs, failed, results


def pagein(p, blkno, wanted=lambda b: True):
    run = p.getpages_begin(blkno, wanted)
    if run is None:
        return None, None
    p.check_invariants()
    p.pagein_io(run)
    res = p.getpages_done(run)
    p.check_invariants()
    return run, res


def singles(p, blknos, sync=True):
    """One page-out per block, so each gets its own slot in allocation order."""
    for b in blknos:
        _, failed, res = pageout(p, [clean(b)], sync)
        assert not failed and res == [(b, True)]


# ---------------------------------------------------------------- clustering

def test_pager_cluster_adjacent_one_run():
    p, devs = mk()
    runs, failed, res = pageout(p, [dirty(b) for b in range(10, 15)])
    assert failed == [] and len(runs) == 1
    assert runs[0].blknos == (10, 11, 12, 13, 14)
    assert res == [(b, True) for b in range(10, 15)]
    assert devs[0].log == [("write", runs[0].local_slot, 5)]
    slots = [p.lookup(b).slot for b in range(10, 15)]
    assert slots == list(range(slots[0], slots[0] + 5))
    e = p.lookup(12)
    assert (e.valid, e.dirty_mask, e.dirty, e.unreadable) == (0x3, 0x1, True, False)
    assert p.stats()["pageout_mean_cluster"] == 5.0


def test_pager_cluster_max_size():
    p, _ = mk()
    runs, failed, _ = pageout(p, [clean(b) for b in range(40)])
    assert [len(r.blknos) for r in runs] == [16, 16, 8] and not failed
    p, _ = mk(dmmax=64, nsw_cluster_max=32)
    runs, _, _ = pageout(p, [clean(b) for b in range(40)])
    assert [len(r.blknos) for r in runs] == [32, 8]     # BLIST_MAX_ALLOC caps the cluster


def test_pager_cluster_nonadjacent_split():
    p, devs = mk()
    runs, _, _ = pageout(p, [clean(b) for b in (1, 2, 3, 10, 11, 20)])
    assert [r.blknos for r in runs] == [(1, 2, 3), (10, 11), (20,)]
    assert len(devs[0].log) == 3
    st = p.stats()
    assert (st["pageout_calls"], st["swapout"], st["swappgsout"]) == (1, 3, 6)


def test_pager_victims_validated():
    p, _ = mk()
    with pytest.raises(SwapPagerError, match="sorted"):
        p.putpages_begin([clean(3), clean(2)], True)
    with pytest.raises(SwapPagerError, match="masks"):
        p.putpages_begin([(1, 0x1, 0x2)], True)
    with pytest.raises(SwapPagerError, match="masks"):
        p.putpages_begin([(1, 0, 0)], True)
    runs, _ = p.putpages_begin([clean(5)], True)
    with pytest.raises(SwapPagerError, match="already being paged out"):
        p.putpages_begin([clean(5)], True)
    p.check_invariants()
    assert p.stats()["swap_pageout_inflight"] == 1


# ---------------------------------------------------------------- halving fallback

def fragment(p, nslots, free_runs):
    """Fill every slot with one block each (block 1000+slot), then free ``free_runs``."""
    singles(p, [1000 + 2 * s for s in range(nslots)])   # non-adjacent: one slot each
    for start, n in free_runs:
        for s in range(start, start + n):
            b = 1000 + 2 * s
            assert p.lookup(b).slot == s
            assert p.unswapped(b) is not None
    p.check_invariants()


def test_pager_halving_fallback():
    p, _ = mk(sizes=(64,), dmmax=64)
    fragment(p, 64, [(8, 8), (40, 4)])          # only an 8-run and a 4-run are free
    assert p.nswap_free == 12
    runs, failed, res = pageout(p, [dirty(b) for b in range(16)])
    assert [(r.slot, len(r.blknos)) for r in runs] == [(8, 8), (40, 4)]
    assert failed == [12, 13, 14, 15]           # n = 4 failed too: no halving below 4
    assert res == [(b, True) for b in range(12)]
    assert p.full and p.almost_full
    st = p.stats()
    assert st["pageout_failed"] == 4 and st["full_transitions"] == 1


def test_pager_halving_gives_up_below_four():
    p, _ = mk(sizes=(64,), dmmax=64)
    fragment(p, 64, [(10, 2), (20, 2), (30, 2)])
    runs, failed, _ = pageout(p, [clean(b) for b in range(3)])
    assert runs == [] and failed == [0, 1, 2]   # 3 fails and 3 > 4 is false
    runs, failed, _ = pageout(p, [clean(b) for b in range(5, 7)])
    assert [len(r.blknos) for r in runs] == [2] and failed == []


# ---------------------------------------------------------------- striping

def test_pager_device_mapping():
    p, _ = mk(sizes=(32, 32), dmmax=8)
    assert p.device_of(0) == (0, 0)
    assert p.device_of(8) == (1, 0)
    assert p.device_of(16) == (0, 8)
    assert p.device_of(27) == (1, 11)
    assert p.blist.nblocks == 64 and p.nslots == 64 and p.nholes == 0


def test_pager_stripe_clip_two_devices():
    p, devs = mk(sizes=(32, 32), dmmax=8)
    singles(p, [100])                           # cursor at slot 1: the next run crosses 8
    runs, failed, res = pageout(p, [dirty(b) for b in range(16)])
    assert not failed and all(ok for _, ok in res)
    assert runs[0].slot == 1 and len(runs[0].blknos) == 7       # clipped at the boundary
    covered = []
    for r in runs:
        assert r.slot // 8 == (r.slot + len(r.blknos) - 1) // 8  # never crosses a stripe
        assert (r.dev, r.local_slot) == p.device_of(r.slot)
        for k, b in enumerate(r.blknos):
            dev, local = p.device_of(r.slot + k)
            assert devs[dev].slot_bytes(local) == payload(b)    # landed where mapped
        covered += r.blknos
    assert covered == list(range(16))
    assert {r.dev for r in runs} == {0, 1}
    for dev in devs:
        for op, slot, n in dev.log:
            assert slot // 8 == (slot + n - 1) // 8
    st = p.stats()
    assert sum(d["used"] for d in st["devices"]) == 17


def test_pager_unequal_devices_fill_holes():
    p, _ = mk(sizes=(32, 12), dmmax=8)
    assert p.blist.nblocks == 64 and p.nslots == 44 and p.nholes == 20
    assert p.nswap_free == 44
    singles(p, [2 * i for i in range(44)])
    assert p.nswap_free == 0
    for b in range(0, 88, 2):
        dev, local = p.device_of(p.lookup(b).slot)
        assert local < (32, 12)[dev]            # holes are never handed out
    st = p.stats()
    assert [(d["slots"], d["used"], d["free"]) for d in st["devices"]] == [(32, 32, 0),
                                                                          (12, 12, 0)]
    _, failed, _ = pageout(p, [clean(1)])
    assert failed == [1]


# ---------------------------------------------------------------- haspage / getpages

def test_pager_haspage_bounds():
    p, _ = mk()
    pageout(p, [clean(b) for b in range(20)])   # slots 0..19, contiguous
    assert p.haspage(10) == (7, 7)
    assert p.haspage(2) == (2, 7)
    assert p.haspage(19) == (7, 0)
    assert p.haspage(50) is None
    run, res = pagein(p, 10)
    assert run.blknos == tuple(range(3, 18))
    assert [bytes(d) for _, d, _ in res] == [payload(b) for b in range(3, 18)]
    assert all(err is None for _, _, err in res)
    assert p.lookup(10) is not None             # a page-in frees nothing
    st = p.stats()
    assert (st["swapin"], st["swappgsin"], st["pagein_mean_cluster"]) == (1, 15, 15.0)


def test_pager_getpages_stops_at_stripe():
    p, devs = mk(dmmax=8)
    pageout(p, [clean(b) for b in range(16)])   # slots 0..7 and 8..15: two stripes
    assert p.haspage(6) == (6, 1)
    assert p.haspage(8) == (0, 7)
    run, _ = pagein(p, 6)
    assert run.blknos == tuple(range(8))
    assert devs[0].log[-1] == ("read", 0, 8)


def test_pager_getpages_stops_at_unwanted():
    p, _ = mk()
    pageout(p, [clean(b) for b in range(20)])
    run, _ = pagein(p, 10, wanted=lambda b: b not in (8, 12))
    assert run.blknos == (9, 10, 11)
    run, _ = pagein(p, 10, wanted=lambda b: False)
    assert run.blknos == (10,)


def test_pager_getpages_needs_contiguous_slots():
    p, _ = mk()
    pageout(p, [clean(b) for b in range(4)])
    singles(p, [100])
    pageout(p, [clean(b) for b in range(4, 8)])  # slots 5..8: not slot(3)+1
    assert p.haspage(3) == (3, 0)
    assert p.haspage(4) == (0, 3)
    assert p.getpages_begin(99, lambda b: True) is None


# ---------------------------------------------------------------- credits

def test_pager_async_credits_exhausted_defer():
    p, _ = mk(swap_async_max=2)
    runs, failed = p.putpages_begin([clean(b) for b in (1, 3, 5, 7)], sync=False)
    assert [r.blknos for r in runs] == [(1,), (3,)] and failed == [5, 7]
    assert p.stats()["pageout_deferred"] == 2
    p.check_invariants()
    sruns, sfailed = p.putpages_begin([clean(9)], sync=True)     # separate sync pool
    assert len(sruns) == 1 and not sfailed
    for r in runs[:1] + sruns:
        fill(r)
        p.pageout_io(r)
        p.putpages_done(r)
    more, failed = p.putpages_begin([clean(5), clean(7)], sync=False)
    assert [r.blknos for r in more] == [(5,)] and failed == [7]
    p.check_invariants()


def test_pager_sync_credits_exhausted_defer():
    p, _ = mk(nsw_wcount_sync=1)
    runs, failed = p.putpages_begin([clean(1), clean(3)], sync=True)
    assert len(runs) == 1 and failed == [3]
    assert p.stats()["swap_sync_inuse"] == 1


def test_pager_async_resize_deferred_while_in_use():
    p, _ = mk(swap_async_max=4)
    runs, _ = p.putpages_begin([clean(b) for b in (0, 2, 4, 6)], sync=False)
    assert len(runs) == 4
    assert p.set_swap_async_max(2) == 2
    assert (p.swap_async_max, p.nsw_wcount_async_max) == (2, 4)   # deferred: 0 free
    p.check_invariants()

    def complete(r):
        fill(r)
        p.pageout_io(r)
        p.putpages_done(r)
        p.check_invariants()

    complete(runs[0])
    assert p.nsw_wcount_async_max == 4                  # 1 free, needs 2
    complete(runs[1])
    assert p.nsw_wcount_async_max == 2                  # applied; credits never negative
    assert p.stats()["swap_async_inuse"] == 2
    more, failed = p.putpages_begin([clean(8)], sync=False)
    assert more == [] and failed == [8]
    complete(runs[2])
    more, failed = p.putpages_begin([clean(8), clean(10)], sync=False)
    assert len(more) == 1 and failed == [10]
    assert p.set_swap_async_max(6) == 6                 # growth applies at once
    assert p.nsw_wcount_async_max == 6
    assert p.set_swap_async_max(1000) == 64 and p.set_swap_async_max(0) == 1
    complete(runs[3])
    complete(more[0])
    assert p.nsw_wcount_async_max == 1
    p.check_invariants()


def test_pager_read_credits():
    p, _ = mk(nsw_rcount=1)
    pageout(p, [clean(1), clean(5)])
    run = p.getpages_begin(1, lambda b: True)
    assert p.read_credits == 0
    with pytest.raises(SwapNoCredit):
        p.getpages_begin(5, lambda b: True)
    assert p.getpages_begin(3, lambda b: True) is None      # unmapped needs no credit
    p.pagein_io(run)
    p.getpages_done(run)
    assert p.read_credits == 1
    with pytest.raises(SwapPagerError, match="already completed"):
        p.getpages_done(run)
    p.check_invariants()


# ---------------------------------------------------------------- watermarks

def test_pager_default_watermarks():
    assert swap_watermarks(16384) == (163, 652)
    assert swap_watermarks(256) == (32, 128)
    assert swap_watermarks(64) == (8, 32)
    lo, hi = swap_watermarks(2)
    assert 0 <= lo < hi < 2
    p, _ = mk(sizes=(64,))
    assert (p.nswap_lowat, p.nswap_hiwat) == (8, 32)
    with pytest.raises(ValueError, match="less than nswap_hiwat"):
        mk(sizes=(64,), nswap_lowat=10, nswap_hiwat=10)
    with pytest.raises(ValueError, match="less than the 64"):
        mk(sizes=(64,), nswap_lowat=10, nswap_hiwat=64)
    with pytest.raises(ValueError, match="nsw_cluster_max"):
        mk(nsw_cluster_max=33)
    p, _ = mk(sizes=(64,), nswap_lowat=20)
    assert p.nswap_hiwat == 63
    with pytest.raises(ValueError, match="block size"):
        SwapPager([MemorySwapDevice(8, BS), MemorySwapDevice(8, 2 * BS)], BS)


def test_pager_sizecheck_hysteresis():
    log = Log()
    p, _ = mk(sizes=(64,), dmmax=64, nswap_lowat=8, nswap_hiwat=16, log=log)
    blocks = [2 * i for i in range(64)]
    singles(p, blocks[:56])
    assert p.nswap_free == 8 and not p.almost_full      # 8 is not < lowat
    singles(p, blocks[56:57])
    assert p.nswap_free == 7 and p.almost_full and not p.full
    assert log.events == ["swap.almost_full"]
    assert not p.may_spill_clean()
    for b in blocks[:9]:                                # back to 16 free
        p.unswapped(b)
    assert p.nswap_free == 16 and p.almost_full         # 16 is not > hiwat
    p.unswapped(blocks[9])
    assert p.nswap_free == 17 and not p.almost_full
    assert log.events == ["swap.almost_full", "swap.almost_full_cleared"]
    singles(p, [1001 + 2 * i for i in range(17)])
    assert p.nswap_free == 0 and p.almost_full and not p.full   # emptied without failing
    _, failed, _ = pageout(p, [clean(5000)])
    assert failed == [5000] and p.full
    p.unswapped(1001)
    assert p.nswap_free == 1 and p.full                 # cleared only at lowat
    for i in range(1, 7):
        p.unswapped(1001 + 2 * i)
    assert p.nswap_free == 7 and p.full
    p.unswapped(1001 + 14)
    assert p.nswap_free == 8 and not p.full and p.almost_full
    st = p.stats()
    assert (st["almost_full_transitions"], st["full_transitions"]) == (2, 1)
    assert log.events[-2:] == ["swap.full", "swap.full_cleared"]
    with pytest.raises(ValueError):
        p.set_watermarks(16, 8)
    p.set_watermarks(2, 4)                              # live change re-runs sizecheck
    assert not p.almost_full
    p.check_invariants()


def test_pager_may_spill_dirty_reclaims_clean():
    p, _ = mk(sizes=(64,), dmmax=64, nswap_lowat=8, nswap_hiwat=16)
    singles(p, [2 * i for i in range(60)])              # 60 clean copies, 4 free
    assert p.almost_full and not p.may_spill_clean()
    assert p.may_spill_dirty()                          # gave up the oldest clean copies
    assert p.nswap_free == 17 and not p.almost_full
    assert p.stats()["reclaimed_clean"] == 13
    assert p.lookup(0) is None and p.lookup(2 * 13) is not None
    p.check_invariants()


def test_pager_may_spill_dirty_false_when_all_dirty():
    p, _ = mk(sizes=(64,), dmmax=64, nswap_lowat=8, nswap_hiwat=16)
    for i in range(60):
        pageout(p, [dirty(2 * i)])
    assert not p.may_spill_dirty() and p.nswap_free == 4


# ---------------------------------------------------------------- errors

def test_pager_write_error_quarantines():
    p, devs = mk()
    pageout(p, [clean(7)])
    old = p.lookup(7).slot
    devs[0].fail_all_writes = True
    runs, failed, res = pageout(p, [dirty(b) for b in range(5, 9)])
    assert res == [(b, False) for b in range(5, 9)] and not failed
    assert p.lookup(7).slot == old                      # the old copy is still mapped
    assert p.lookup(5) is None
    bad = set(range(runs[0].slot, runs[0].slot + 4))
    st = p.stats()
    assert st["write_errors"] == 1 and st["swap_bad"] == 4
    assert st["devices"][0]["bad"] == 4
    pageout(p, [dirty(20)])                             # one event per failure episode
    assert p.log.events == ["swap.write_error"]
    devs[0].fail_all_writes = False
    free = p.nswap_free
    for i in range(free):
        singles(p, [10000 + 2 * i])
        assert p.lookup(10000 + 2 * i).slot not in bad  # never reused
    assert [e for e in p.log.events if "write" in e] == ["swap.write_error",
                                                          "swap.write_recovered"]
    assert p.nswap_free == 0
    p.check_invariants()


def test_pager_read_error_clean_falls_back():
    p, devs = mk()
    pageout(p, [clean(b) for b in range(3)])
    slot = p.lookup(1).slot
    free = p.nswap_free
    devs[0].fail_read_slots = {slot}
    run, res = pagein(p, 1)
    assert run.blknos == (0, 1, 2)
    for entry, data, err in res:
        assert data is None and err is not None and not entry.dirty
        assert p.lookup(entry.blkno) is None            # dropped: read the backend
    assert p.nswap_free == free                         # quarantined, not freed
    assert p.stats()["swap_bad"] == 3 and p.stats()["read_errors"] == 1
    assert p.stats()["lost_dirty"] == 0


def test_pager_read_error_dirty_eio_and_lost_dirty():
    p, devs = mk()
    pageout(p, [dirty(4)])
    slot = p.lookup(4).slot
    devs[0].fail_read_slots = {slot}
    _, res = pagein(p, 4)
    (entry, data, err), = res
    assert data is None and err is not None and entry.dirty and entry.unreadable
    assert p.lookup(4).unreadable
    assert p.stats()["lost_dirty"] == 1 and p.stats()["swap_unreadable"] == 1
    assert p.dirty_blocks(10) == [] and p.dirty_blocks(10, include_unreadable=True) == [4]
    pagein(p, 4)                                        # still failing: counted once
    assert p.stats()["lost_dirty"] == 1
    devs[0].fail_read_slots = set()
    _, res = pagein(p, 4)                               # a transient error recovers
    assert bytes(res[0][1]) == payload(4) and not p.lookup(4).unreadable
    devs[0].fail_read_slots = {slot}
    pagein(p, 4)
    free = p.nswap_free
    assert p.unswapped(4).unreadable
    assert p.nswap_free == free and slot in p._bad      # its slot is quarantined
    p.check_invariants()


def test_pager_unreadable_dropped_by_trim_and_set_clean():
    p, devs = mk()
    pageout(p, [dirty(1)])
    pageout(p, [dirty(3)])
    devs[0].fail_all_reads = True
    pagein(p, 1)
    pagein(p, 3)
    assert p.freespace(0, 2) == 1
    assert p.set_clean(3)                               # an unreadable clean copy is useless
    assert p.lookup(1) is None and p.lookup(3) is None
    assert p.stats()["swap_bad"] == 2
    p.check_invariants()


# ---------------------------------------------------------------- unswapped / trim / clean

def test_pager_unswapped_returns_dirty_entry():
    p, _ = mk()
    pageout(p, [(9, 0xF, 0x6)])
    free = p.nswap_free
    with pytest.raises(SwapPagerError, match="page it in first"):
        p.unswapped(9, ram_valid=0x3)                   # sector 2 is only in swap
    assert p.lookup(9) is not None
    e = p.unswapped(9, ram_valid=0xF)
    assert e.dirty and e.dirty_mask == 0x6 and e.valid == 0xF
    assert p.lookup(9) is None and p.nswap_free == free + 1
    assert p.unswapped(9) is None
    pageout(p, [clean(10)])
    assert not p.unswapped(10).dirty
    p.check_invariants()


def test_pager_freespace_range():
    p, _ = mk()
    pageout(p, [dirty(b) for b in range(10)] + [clean(b) for b in range(10, 20)])
    assert p.freespace(5, 10) == 10
    assert [b for b in range(20) if p.lookup(b)] == [*range(5), *range(15, 20)]
    assert p.freespace(0, 1 << 40) == 10                # a whole-disk trim
    assert p.stats()["trimmed_dirty"] == 10
    assert p.freespace(0, 0) == 0
    p.check_invariants()


def test_pager_set_clean_and_dirty_blocks():
    p, _ = mk()
    pageout(p, [dirty(1), dirty(3), dirty(8)])
    pageout(p, [clean(5)])
    assert p.dirty_blocks(10) == [1, 3, 8]
    assert p.dirty_blocks(2) == [1, 3] and p.dirty_blocks(10, start=2) == [3, 8]
    e = p.lookup(3)
    assert p.set_clean(3, e.gen)
    assert not p.lookup(3).dirty and p.lookup(3).dirty_mask == 0
    assert p.dirty_blocks(10) == [1, 8]
    e8 = p.lookup(8)
    p.unswapped(8)
    pageout(p, [dirty(8)], ver=1)                       # rewritten and paged out again
    assert not p.set_clean(8, e8.gen)                   # newer dirty data stays dirty
    assert p.lookup(8).dirty
    assert not p.set_clean(77)
    p.check_invariants()


# ---------------------------------------------------------------- in-flight races

def test_pager_cancel_during_pageout():
    p, devs = mk()
    pageout(p, [clean(2)])
    old = p.lookup(2).slot
    runs, _ = p.putpages_begin([dirty(b) for b in range(1, 4)], sync=False)
    run, = runs
    fill(run)
    assert p.cancel(1)                                  # rewritten by the guest meanwhile
    assert not p.cancel(1)
    e = p.unswapped(2)                                  # unswapped cancels too
    assert e.slot == old
    p.check_invariants()
    p.pageout_io(run)
    assert p.putpages_done(run) == [(1, False), (2, False), (3, True)]
    assert p.lookup(1) is None and p.lookup(2) is None
    assert p.lookup(3).slot == run.slot + 2
    assert p.stats()["pageout_cancelled"] == 2
    p.check_invariants()
    with pytest.raises(SwapPagerError):
        p.putpages_done(run)


def test_pager_trim_cancels_pageout():
    p, _ = mk()
    runs, _ = p.putpages_begin([dirty(b) for b in range(4)], sync=True)
    p.freespace(2, 10)
    fill(runs[0])
    p.pageout_io(runs[0])
    assert p.putpages_done(runs[0]) == [(0, True), (1, True), (2, False), (3, False)]
    p.check_invariants()


def test_pager_cancelled_block_may_be_paged_out_again():
    p, _ = mk()
    first, _ = p.putpages_begin([dirty(4)], sync=False)
    p.unswapped(4)
    second, _ = p.putpages_begin([dirty(4)], sync=False)
    for r, ver in ((second[0], 2), (first[0], 1)):
        fill(r, ver)
        p.pageout_io(r)
    assert p.putpages_done(second[0]) == [(4, True)]
    assert p.putpages_done(first[0]) == [(4, False)]
    _, res = pagein(p, 4)
    assert bytes(res[0][1]) == payload(4, 2)


def test_pager_deferred_free_during_pagein():
    p, _ = mk()
    pageout(p, [clean(b) for b in range(3)])
    old = p.lookup(1).slot
    run = p.getpages_begin(1, lambda b: True)
    free = p.nswap_free
    _, _, res = pageout(p, [dirty(1)], ver=1)           # replaces slot `old` under the read
    assert res == [(1, True)]
    assert p.nswap_free == free - 1                     # new slot taken, old one not freed
    assert p.stats()["swap_pending_free"] == 1 and p.blist.is_free(old) is False
    p.unswapped(2)                                      # another slot under the read
    assert p.stats()["swap_pending_free"] == 2
    p.check_invariants()
    p.pagein_io(run)
    out = p.getpages_done(run)
    assert [(e.blkno, d is None, err) for e, d, err in out] == [
        (0, False, None), (1, True, None), (2, True, None)]   # 1 and 2 changed: stale
    assert bytes(out[0][1]) == payload(0)
    assert p.nswap_free == free + 1 and p.blist.is_free(old)
    st = p.stats()
    assert st["swap_pending_free"] == 0 and st["deferred_frees"] == 2
    assert st["pagein_stale"] == 2
    p.check_invariants()


def test_pager_reclaim_skips_blocks_under_read():
    p, _ = mk()
    pageout(p, [clean(1)])
    pageout(p, [clean(3)])
    run = p.getpages_begin(1, lambda b: True)
    assert p.reclaim_clean(5) == 1
    assert p.lookup(1) is not None and p.lookup(3) is None
    p.pagein_io(run)
    p.getpages_done(run)
    p.check_invariants()


# ---------------------------------------------------------------- files and lifetime

def test_pager_fresh_pager_maps_nothing(tmp_path):
    paths = [str(tmp_path / f"swap{i}") for i in range(2)]
    devs = [SwapDevice(path, 64 * BS, True, BS) for path in paths]
    p = SwapPager(devs, BS, dmmax=8)
    _, _, res = pageout(p, [dirty(b) for b in range(20)])
    assert all(ok for _, ok in res)
    _, got = pagein(p, 10)
    assert all(bytes(d) == payload(e.blkno) for e, d, _ in got)
    p.close()
    p.close()
    devs = [SwapDevice(path, None, False, BS) for path in paths]
    p = SwapPager(devs, BS, dmmax=8)
    assert all(p.lookup(b) is None for b in range(20))
    assert p.getpages_begin(10, lambda b: True) is None
    assert p.nswap_free == 128
    p.check_invariants()
    p.close()


def test_pager_invariant_checker_catches_corruption():
    p, _ = mk()
    pageout(p, [clean(1)])
    p._recs[1].dirty_mask = 1
    with pytest.raises(SwapPagerInvariantError, match="dirty"):
        p.check_invariants()
    p, _ = mk()
    pageout(p, [clean(1)])
    p._bad.add(p.lookup(1).slot)
    with pytest.raises(SwapPagerInvariantError, match="both"):
        p.check_invariants()


# ---------------------------------------------------------------- stateful model

SBS = 512                                               # small blocks keep the model fast
BLOCKS = st.integers(0, 47)


def spayload(blkno: int, ver: int) -> bytes:
    return payload(blkno, ver, SBS)


class SwapPagerModel(RuleBasedStateMachine):
    """The model maps blkno -> (bytes, valid, dirty_mask): what swap must give back."""

    def __init__(self) -> None:
        super().__init__()
        # 28 slots for 48 blocks: allocation fails and the watermarks are crossed
        self.devs = [MemorySwapDevice(20, SBS, "a"), MemorySwapDevice(8, SBS, "b")]
        self.p = SwapPager(self.devs, SBS, dmmax=8, nsw_cluster_max=8, swap_async_max=3,
                           nsw_wcount_sync=3, nsw_rcount=3, nswap_lowat=6, nswap_hiwat=12,
                           log=Log())
        self.model: dict[int, tuple[bytes, int, int]] = {}
        self.outs: list[tuple[object, dict[int, tuple[bytes, int, int]], bool]] = []
        self.ins: list[tuple[object, bool]] = []
        self.ver = 0

    # -- page-out

    @initialize(blocks=st.lists(BLOCKS, max_size=30, unique=True), masks=st.data())
    def prefill(self, blocks, masks):
        if blocks:
            self.putpages_at_once(blocks, True, masks)

    @rule(blocks=st.lists(BLOCKS, min_size=1, max_size=12, unique=True),
          sync=st.booleans(), masks=st.data())
    def putpages_begin(self, blocks, sync, masks):
        self._begin(blocks, sync, masks)

    @rule(blocks=st.lists(BLOCKS, min_size=1, max_size=12, unique=True),
          sync=st.booleans(), masks=st.data())
    def putpages_at_once(self, blocks, sync, masks):
        """Page out and complete, retrying victims deferred for want of a credit."""
        while blocks:
            first = len(self.outs)
            failed = self._begin(blocks, sync, masks)
            if len(self.outs) == first:
                break
            while len(self.outs) > first:
                r, snap, _ = self.outs[-1]
                self.p.pageout_io(r)
                self.outs[-1] = (r, snap, True)
                self.putpages_done(len(self.outs) - 1, pick_last=True)
            blocks = failed

    def _begin(self, blocks, sync, masks):
        busy = {b for _, snap, _ in self.outs for b in snap}    # the model's own record
        assert busy == set(self.p._out)
        victims = []
        for b in sorted(set(blocks) - busy):
            valid = masks.draw(st.integers(1, 15))
            victims.append((b, valid, valid & masks.draw(st.integers(0, 15))))
        if not victims:
            return []
        runs, failed = self.p.putpages_begin(victims, sync)
        got = [b for r in runs for b in r.blknos]
        assert sorted(got + failed) == [v[0] for v in victims]
        masks_of = {v[0]: v for v in victims}
        for r in runs:
            assert r.slot // 8 == (r.slot + len(r.blknos) - 1) // 8
            self.ver += 1
            snap = {}
            for i, b in enumerate(r.blknos):
                data = spayload(b, self.ver)
                r.block(i)[:] = data
                snap[b] = (data, masks_of[b][1], masks_of[b][2])
            self.outs.append((r, snap, False))
        return failed

    @precondition(lambda self: any(not io for _, _, io in self.outs))
    @rule(pick=st.integers(0, 100), fail=st.booleans())
    def pageout_io(self, pick, fail):
        todo = [i for i, (_, _, io) in enumerate(self.outs) if not io]
        i = todo[pick % len(todo)]
        r, snap, _ = self.outs[i]
        fail = fail and pick % 4 == 0
        self.devs[r.dev].fail_all_writes = fail
        self.p.pageout_io(r)
        self.devs[r.dev].fail_all_writes = False
        assert (r.error is not None) == fail
        self.outs[i] = (r, snap, True)

    @precondition(lambda self: any(io for _, _, io in self.outs))
    @rule(pick=st.integers(0, 100))
    def putpages_done(self, pick, pick_last=False):
        done = [i for i, (_, _, io) in enumerate(self.outs) if io]
        r, snap, _ = self.outs.pop(pick if pick_last else done[pick % len(done)])
        for b, ok in self.p.putpages_done(r):
            assert ok == (r.error is None and b in snap)    # snap lost cancelled blocks
            if ok:
                self.model[b] = snap[b]

    def _cancel(self, blknos):
        """The caller modified or trimmed these blocks: in-flight page-outs must not map."""
        for _, snap, _ in self.outs:
            for b in blknos:
                snap.pop(b, None)

    # -- page-in

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 1000), unwanted=st.sets(BLOCKS, max_size=10))
    def getpages_begin(self, pick, unwanted):
        blkno = sorted(self.model)[pick % len(self.model)]
        if self.p.read_credits == 0:
            with pytest.raises(SwapNoCredit):
                self.p.getpages_begin(blkno, lambda b: True)
            return
        self._pagein_begin(blkno, unwanted)

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 1000), unwanted=st.sets(BLOCKS, max_size=10),
          fail=st.booleans())
    def getpages_at_once(self, pick, unwanted, fail):
        blkno = sorted(self.model)[pick % len(self.model)]
        if self.p.read_credits and self._pagein_begin(blkno, unwanted):
            self.pagein_io(len(self.ins) - 1, fail, pick_last=True)
            self.getpages_done(len(self.ins) - 1, pick_last=True)

    def _pagein_begin(self, blkno, unwanted):
        run = self.p.getpages_begin(blkno, lambda b: b not in unwanted)
        assert run is not None and blkno in run.blknos
        lo, hi = run.blknos[0], run.blknos[-1]
        assert blkno - lo <= 7 and hi - blkno <= 7
        assert not unwanted & set(run.blknos) - {blkno}
        assert run.slot // 8 == (run.slot + len(run.blknos) - 1) // 8
        self.ins.append((run, False))
        return run

    @precondition(lambda self: any(not io for _, io in self.ins))
    @rule(pick=st.integers(0, 100), fail=st.booleans())
    def pagein_io(self, pick, fail, pick_last=False):
        todo = [i for i, (_, io) in enumerate(self.ins) if not io]
        i = pick if pick_last else todo[pick % len(todo)]
        run = self.ins[i][0]
        fail = fail and pick % 4 == 0
        self.devs[run.dev].fail_all_reads = fail
        self.p.pagein_io(run)
        self.devs[run.dev].fail_all_reads = False
        self.ins[i] = (run, True)

    @precondition(lambda self: any(io for _, io in self.ins))
    @rule(pick=st.integers(0, 100))
    def getpages_done(self, pick, pick_last=False):
        done = [i for i, (_, io) in enumerate(self.ins) if io]
        run, _ = self.ins.pop(pick if pick_last else done[pick % len(done)])
        for entry, data, err in self.p.getpages_done(run):
            b = entry.blkno
            if data is None and err is None:            # changed while in flight
                cur = self.p.lookup(b)
                assert cur is None or cur.gen != entry.gen
                continue
            want, valid, dmask = self.model[b]
            assert (entry.valid, entry.dirty_mask, entry.dirty) == (valid, dmask, bool(dmask))
            if err is None:
                assert bytes(data) == want and not entry.unreadable
            elif dmask:
                assert entry.unreadable and self.p.lookup(b).unreadable
            else:
                assert self.p.lookup(b) is None
                del self.model[b]

    # -- the caller's other calls

    @rule(blkno=BLOCKS)
    def unswapped(self, blkno):
        self._cancel([blkno])
        e = self.p.unswapped(blkno)
        m = self.model.pop(blkno, None)
        if m is None:
            assert e is None
        else:
            assert (e.valid, e.dirty_mask) == (m[1], m[2])

    @rule(blkno=BLOCKS, count=st.integers(1, 12))
    def freespace(self, blkno, count):
        self._cancel(range(blkno, blkno + count))
        gone = [b for b in self.model if blkno <= b < blkno + count]
        assert self.p.freespace(blkno, count) == len(gone)
        for b in gone:
            del self.model[b]

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 1000), stale=st.booleans())
    def set_clean(self, pick, stale):
        b = sorted(self.model)[pick % len(self.model)]
        e = self.p.lookup(b)
        ok = self.p.set_clean(b, e.gen + 1 if stale else e.gen)
        assert ok == (not stale)
        if ok:
            if e.unreadable:
                del self.model[b]
            else:
                data, valid, _ = self.model[b]
                self.model[b] = (data, valid, 0)

    @rule()
    def may_spill_dirty(self):
        before = dict(self.model)
        self.p.may_spill_dirty()
        for b, (_, _, dmask) in before.items():
            if self.p.lookup(b) is None:
                assert not dmask                        # only clean copies are reclaimed
                del self.model[b]

    @rule(n=st.integers(0, 5))
    def set_swap_async_max(self, n):
        self.p.set_swap_async_max(n)

    # -- checks after every step

    @invariant()
    def consistent(self):
        p = self.p
        p.check_invariants()
        st_ = p.stats()
        assert st_["swap_clean"] + st_["swap_dirty"] == len(self.model)
        assert sorted(p.dirty_blocks(100, include_unreadable=True)) == sorted(
            b for b, (_, _, d) in self.model.items() if d)
        for b, (data, valid, dmask) in self.model.items():
            e = p.lookup(b)
            assert e is not None and (e.valid, e.dirty_mask, e.dirty) == (valid, dmask,
                                                                          bool(dmask))
            dev, local = p.device_of(e.slot)
            assert self.devs[dev].slot_bytes(local) == data

    def teardown(self):
        for r, _, io in self.outs:
            if not io:
                self.p.pageout_io(r)
            self.p.putpages_done(r)
        for run, io in self.ins:
            if not io:
                self.p.pagein_io(run)
            self.p.getpages_done(run)
        self.p.check_invariants()
        assert self.p.stats()["swap_pending_free"] == 0


SwapPagerModel.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_pager_stateful_model = SwapPagerModel.TestCase
