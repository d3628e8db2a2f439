"""Throttle primitives: bd_heatup midpoints, bd_wait tickets, the 4/6 running gate, and
where the daemons stop."""

from __future__ import annotations

import asyncio
import threading
import time

from cachekit import KiB, MiB, FaultyBackend, make_cache
from nbdcache.core.bufinit import midpoints
from nbdcache.core.buf import QUEUE_DIRTY

BS = 64 * KiB


def throttle_of(**kw):
    return make_cache(ram=4 * MiB, **kw).throttle


def test_heatup_kicks_at_mid1_and_reports_excess_past_mid2():
    kicks = []
    t = throttle_of(hidirtybufspace=16 * BS, lodirtybufspace=8 * BS)
    t._kick = kicks.append
    mid1, mid2 = midpoints({"lodirtybufspace": 8 * BS, "hidirtybufspace": 16 * BS})
    assert (mid1, mid2) == (12 * BS, 14 * BS)
    t.dirtykvaspace, t.dirtybufcount = 11 * BS, 11
    assert t.bd_heatup() == 0 and kicks == []
    t.dirtykvaspace, t.dirtybufcount = 12 * BS, 12
    assert t.bd_heatup() == 0 and kicks == [False]          # kicked once ...
    assert t.bd_heatup() == 0 and kicks == [False]          # ... until the daemon takes it
    t.runningbufspace = 3 * BS                               # running counts too
    assert t.bd_heatup() == 1 * BS


def test_speedup_needs_lodirty():
    kicks = []
    t = throttle_of(hidirtybufspace=16 * BS, lodirtybufspace=8 * BS)
    t._kick = kicks.append
    t.dirtykvaspace, t.dirtybufcount = 7 * BS, 7
    t.bd_speedup()
    assert kicks == []
    t.dirtykvaspace, t.dirtybufcount = 8 * BS, 8
    t.bd_speedup()
    assert kicks == [False]


def test_bd_wait_sleeps_until_progress_and_below_hidirty():
    c = make_cache(ram=4 * MiB, hidirtybufspace=16 * BS, lodirtybufspace=8 * BS,
                   clock=time.monotonic)
    t = c.throttle
    t.dirtykvaspace, t.dirtybufcount = 18 * BS, 18            # 2 blocks over hidirty
    done = threading.Event()

    def writer():
        with c.lock:
            t.bd_wait(4 * BS)
        done.set()

    th = threading.Thread(target=writer)
    th.start()
    time.sleep(0.1)
    assert not done.is_set() and t.bd_wait_blocks == 1
    with c.lock:                    # progress of 5 blocks, still above hidirty
        t.dirtykvaspace, t.dirtybufcount = 17 * BS, 17
        t.bd_signal(5 * BS)
    time.sleep(0.1)
    assert not done.is_set()        # ticket passed, but total > hidirtybufspace: wait on
    with c.lock:
        t.dirtykvaspace, t.dirtybufcount = 15 * BS, 15
        t.bd_signal(2 * BS)
    assert done.wait(3)
    th.join()
    assert t.bd_wait_seconds > 0.1


def test_bd_signal_counts_blocks_rounding_up():
    t = throttle_of()
    t.bd_signal(1)
    t.bd_signal(BS + 1)
    assert t.bd_wake_index == 3


def test_waitrunningbufspace_gate_at_four_sixths_with_fairness():
    t = throttle_of(hirunningspace=6 * BS)

    async def scenario():
        t.bsetrunningbufspace(4 * BS)                   # exactly 4/6: passes
        await asyncio.wait_for(t.waitrunningbufspace(), 1)
        t.bsetrunningbufspace(BS)                       # 5/6: blocks
        first = asyncio.create_task(t.waitrunningbufspace())
        await asyncio.sleep(0.05)
        assert not first.done() and t.runningbufreq == 1
        with t.lock:
            t.runningbufwakeup(2 * BS)                  # 3/6: wake everybody
        await asyncio.wait_for(first, 1)
        assert t.runningbufreq == 0
        # fairness: below the limit, a newcomer still waits while someone is queued
        t.runningbufreq = 1
        late = asyncio.create_task(t.waitrunningbufspace())
        await asyncio.sleep(0.05)
        assert not late.done()
        with t.lock:
            t.runningbufwakeup(BS)
        await asyncio.wait_for(late, 1)
        assert t.waitrunningbufspace_blocks == 2

    asyncio.run(scenario())


def test_daemon_stops_at_half_lodirty_and_wakes_when_kicked():
    from nbdcache.core.daemon import BufDaemons
    be = FaultyBackend(16 * MiB)
    c = make_cache(ram=8 * MiB, disk=16 * MiB, backend=be, clock=time.monotonic,
                   hidirtybufspace=64 * BS, lodirtybufspace=32 * BS, hirunningspace=4 * BS,
                   max_io=BS)
    d = BufDaemons(c, interval=30.0, io_threads=1)        # no polling: only kicks wake it
    c.throttle._kick = d.kick
    d.start()
    try:
        t = c.throttle
        for k in range(15):                          # below lodirty: no kick, no write-back
            c.pwrite(b"a" * BS, k * BS)
        time.sleep(0.3)
        assert t.dirtybufcount == 15 and c.stats.writeback_clusters == 0
        for k in range(15, 50):                      # past mid1 (48 blocks): kicked
            c.pwrite(b"a" * BS, k * BS)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (t.runningbufspace or
                                               t.dirtykvaspace > t.lodirtybufspace // 2):
            time.sleep(0.02)
        time.sleep(0.2)
        with c.lock:
            total = t.dirtykvaspace + t.runningbufspace
        # stops at lodirty/2 (16 blocks); it may overshoot by what was in flight
        assert 16 * BS - t.hirunningspace - BS <= total <= 16 * BS
        assert c.stats.writeback_clusters >= 34 - 4
    finally:
        d.stop()
    c.check_invariants()


def test_daemon_hw_flushes_heavy_buffers():
    from nbdcache.core.daemon import BufDaemons
    c = make_cache(ram=4 * MiB, clock=time.monotonic, hidirtybufspace=16 * BS,
                   lodirtybufspace=2 * BS)
    d = BufDaemons(c, interval=0.05, io_threads=1)
    c.throttle._kick = d.kick
    for k in range(6):
        c.pwrite(b"h" * BS, k * BS)
    with c.lock:
        for k in range(6):
            c.bheavy(c.hash[k])
    assert c.throttle.dirtybufcounthw == 6
    d.start()
    try:
        deadline = time.monotonic() + 5
        while c.throttle.dirtybufcounthw > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        d.stop()
    assert c.throttle.dirtybufcounthw <= 1 and d.passes[1] >= 1
    assert c.queues[QUEUE_DIRTY].__len__() == 0
