"""Each buffer-cache mechanism, driven step by step through its counters."""

from __future__ import annotations

import errno
import threading

import pytest

from cachekit import KiB, MiB, Deferred, FaultyBackend, make_cache
from nbdcache.core.buf import (
    B_AGE, B_DELWRI, B_ERROR, B_HEAVY, QUEUE_CLEAN, QUEUE_DIRTY, QUEUE_DIRTY_HW, QUEUE_EMPTY,
)

BS = 64 * KiB


def read(cache, off, n=4096):
    buf = bytearray(n)
    cache.pread(memoryview(buf), off)
    return bytes(buf)


def test_getnewbuf_takes_empty_until_hibufspace_then_recycles_to_lobufspace():
    c = make_cache(ram=1 * MiB)                 # 16 buffers; hi = 12, lo = 10.5 buffers
    assert (c.hibufspace, c.lobufspace) == (12 * BS, 672 * KiB)
    for k in range(12):
        read(c, k * BS)
    assert c.bufspace == 12 * BS and len(c.queues[QUEUE_EMPTY]) == 4
    assert not c.flushing
    read(c, 12 * BS)        # bufspace >= hibufspace: recycle clean buffers down below lo
    # destroyed one at a time until bufspace < lobufspace (672K): 12 -> 10 buffers, then
    # the last candidate is handed out: 11 buffers in use.
    assert c.bufspace == 11 * BS
    assert c.stats.recycled == 2
    read(c, 13 * BS)        # below lobufspace again: EMPTY is used, no recycling
    assert c.bufspace == 12 * BS and c.stats.recycled == 2 and not c.flushing
    c.check_invariants()


def test_second_chance_spares_an_unaged_buffer_at_the_head():
    c = make_cache(ram=1 * MiB)
    for k in range(3):
        read(c, k * BS)
    a, b, d = (c.hash[k] for k in range(3))
    assert list(c.queues[QUEUE_CLEAN].values()) == [a, b, d]
    b.flags |= B_AGE
    d.flags |= B_AGE
    c.queues[QUEUE_EMPTY].clear()               # force the CLEAN scan
    for x in c.bufs[3:]:
        x.qindex = -1
    with c.lock:
        got = c.getnewbuf(wait=False)
    assert got is b                             # a (unaged) got its second chance
    assert a.flags & B_AGE and list(c.queues[QUEUE_CLEAN].values()) == [d, a]


def test_hit_clears_age_and_moves_to_tail():
    c = make_cache(ram=1 * MiB)
    read(c, 0)
    read(c, BS)
    first = c.hash[0]
    first.flags |= B_AGE
    read(c, 0)
    assert not first.flags & B_AGE
    assert list(c.queues[QUEUE_CLEAN].values())[-1] is first


def test_dirty_buffers_are_never_recycled_getnewbuf_waits_instead():
    c = make_cache(ram=1 * MiB, hidirtybufspace=1 << 40, lodirtybufspace=1 << 39)
    kicks = []
    c.throttle._kick = kicks.append
    for k in range(12):
        c.pwrite(b"d" * BS, k * BS)
    with c.lock:
        assert c.getnewbuf(wait=False) is None  # nothing clean, nothing empty under hi
    with c.lock:
        assert c.getnewbuf(wait=True) is None   # kicks the daemons, waits (bounded), None
    assert kicks == [False]
    assert c.stats.getnewbuf_waits == 1
    assert all(c.hash[k].flags & B_DELWRI for k in range(12))


def test_write_marks_sectors_and_accounts_dirty_space():
    c = make_cache()
    c.pwrite(b"x" * 5000, 100)                  # sectors 0-1 of block 0; partial: read-fill
    b = c.hash[0]
    assert b.dirty == 0b11 and b.valid == 0b11 and b.flags & B_DELWRI
    t = c.throttle
    assert (t.dirtybufcount, t.dirtykvaspace, t.dirtybufspace) == (1, BS, 8192)
    # head and tail sectors (adjacent) filled in one read, nothing else
    assert (c.stats.backend_reads, c.stats.backend_read_bytes) == (1, 8192)
    c.pwrite(b"y" * 4096, 8192)                  # aligned: no fill
    assert c.stats.backend_reads == 1 and t.dirtybufspace == 3 * 4096
    c.flush()
    assert (t.dirtybufcount, t.dirtykvaspace, t.dirtybufspace) == (0, 0, 0)
    assert c.backend.data[100:5100] == b"x" * 5000 and c.backend.data[8192:12288] == b"y" * 4096


def test_fill_never_overwrites_valid_or_dirty_sectors():
    be = FaultyBackend(4 * MiB)
    be.data[:BS] = b"o" * BS
    c = make_cache(backend=be)
    c.pwrite(b"n" * 4096, 4096)                 # sector 1 dirty, others invalid
    assert read(c, 0, BS) == b"o" * 4096 + b"n" * 4096 + b"o" * (BS - 8192)


def test_clustering_adjacent_dirty_blocks_into_max_io_writes():
    d = Deferred()
    c = make_cache(ram=2 * MiB, max_io=4 * BS, submit=d)
    for k in list(range(10)) + [20, 22]:
        c.pwrite(bytes([k]) * BS, k * BS)
    assert c.flushbufqueues(QUEUE_DIRTY) == 12
    d.run_all()
    sizes = sorted(n for _, n in c.backend.writes)
    assert sizes == [BS, BS, 2 * BS, 4 * BS, 4 * BS]
    assert c.stats.writeback_clusters == 5 and c.stats.writeback_bufs == 12
    assert c.counters()["writeback_mean_cluster_bufs"] == 2.4
    c.check_invariants()


def test_segments_skip_clean_edges_and_invalid_holes():
    d = Deferred()
    c = make_cache(submit=d)
    c.pwrite(b"a" * 4096, 3 * 4096)             # block 0 sector 3
    c.pwrite(b"b" * 4096, 9 * 4096)             # block 0 sector 9: invalid hole between
    c.pwrite(b"c" * 4096, BS - 4096)            # block 0 last sector, adjacent to block 1
    c.pwrite(b"e" * 4096, BS)                   # block 1 sector 0
    c.flushbufqueues(QUEUE_DIRTY)
    d.run_all()
    assert sorted(c.backend.writes) == [(3 * 4096, 4096), (9 * 4096, 4096),
                                        (BS - 4096, 8192)]


def test_written_back_buffers_come_back_aged_on_clean():
    c = make_cache()
    c.pwrite(b"z" * BS, 0)
    c.flushbufqueues(QUEUE_DIRTY)
    b = c.hash[0]
    assert b.qindex == QUEUE_CLEAN and b.flags & B_AGE and not b.flags & B_DELWRI


def test_rewrite_during_writeback_stays_dirty():
    d = Deferred()
    c = make_cache(submit=d)
    c.pwrite(b"1" * BS, 0)
    c.flushbufqueues(QUEUE_DIRTY)
    b = c.hash[0]
    assert b.writing and c.throttle.runningbufspace == BS
    c.pwrite(b"2" * 4096, 0)                     # while the snapshot is in flight
    d.run_all()
    assert b.flags & B_DELWRI and b.qindex == QUEUE_DIRTY
    assert c.backend.data[:4096] == b"1" * 4096  # the old snapshot landed ...
    c.submit = lambda fn, *a: _now(fn, *a)
    c.flush()
    assert c.backend.data[:4096] == b"2" * 4096  # ... and the flush wrote the new data
    c.check_invariants()


def test_two_writes_of_one_block_are_never_in_flight_together():
    d = Deferred()
    c = make_cache(submit=d)
    c.pwrite(b"1" * BS, 0)
    c.flushbufqueues(QUEUE_DIRTY)
    c.pwrite(b"2" * BS, 0)
    assert c.flushbufqueues(QUEUE_DIRTY) == 0    # in flight: off the dirty queue
    assert len(d.pending) == 1


def test_failed_writeback_keeps_dirty_fails_flush_then_recovers():
    be = FaultyBackend(4 * MiB)
    c = make_cache(backend=be)
    c.pwrite(b"w" * 3 * BS, 0)
    be.fail_writes = True
    with pytest.raises(OSError) as e:
        c.flush()
    assert e.value.errno == errno.EIO
    assert all(c.hash[k].flags & (B_DELWRI | B_ERROR) == B_DELWRI | B_ERROR for k in range(3))
    assert c.stats.flush_errors == 1 and c.throttle.dirtybufcount == 3
    # the daemon backs off: no retry before retry_at
    assert c.flushbufqueues(QUEUE_DIRTY) == 0
    c.clock.advance(5)
    assert c.flushbufqueues(QUEUE_DIRTY) == 3 and c.stats.writeback_errors == 2
    be.fail_writes = False
    c.flush()                                     # the flush retries and now succeeds
    assert bytes(be.data[:3 * BS]) == b"w" * 3 * BS and c.throttle.dirtybufcount == 0
    c.check_invariants()


def test_backend_flush_failure_fails_the_flush():
    be = FaultyBackend(4 * MiB)
    c = make_cache(backend=be)
    be.fail_flush = True
    with pytest.raises(OSError):
        c.flush()
    be.fail_flush = False
    c.flush()


def test_fua_write_is_on_the_backend_when_it_returns():
    be = FaultyBackend(4 * MiB)
    c = make_cache(backend=be)
    c.pwrite(b"f" * 1000, 5000, fua=True)
    assert be.data[5000:6000] == b"f" * 1000 and be.flushes == 1
    assert c.throttle.dirtybufcount == 0


def test_trim_and_zero_discard_dirty_data_and_fence():
    be = FaultyBackend(4 * MiB)
    be.data[:] = b"o" * len(be.data)
    c = make_cache(backend=be)
    c.pwrite(b"d" * 3 * BS, 0)
    c.discard(100, 3 * BS, zero=True)
    assert read(c, 0, 3 * BS + 200) == b"d" * 100 + bytes(3 * BS) + b"o" * 100
    assert c.stats.discarded_dirty == 2         # blocks 1 and 2 dropped whole
    c.flush()
    assert be.data[:3 * BS + 200] == b"d" * 100 + bytes(3 * BS) + b"o" * 100
    c.check_invariants()


def test_heavy_buffers_go_to_dirty_hw_with_their_own_counters():
    c = make_cache()
    c.pwrite(b"h" * BS, 0)
    with c.lock:
        c.bheavy(c.hash[0])
    b = c.hash[0]
    assert b.qindex == QUEUE_DIRTY_HW and b.flags & B_HEAVY
    assert c.throttle.dirtybufcounthw == 1 and c.throttle.dirtybufspacehw == BS
    assert c.flushbufqueues(QUEUE_DIRTY) == 0
    assert c.flushbufqueues(QUEUE_DIRTY_HW) == 1
    assert c.throttle.dirtybufcounthw == 0 and c.backend.data[:BS] == b"h" * BS
    c.check_invariants()


def test_readahead_on_sequential_reads_and_its_hits():
    c = make_cache(ram=2 * MiB, readahead=3)
    read(c, 0, BS)
    assert c.stats.readahead_issued == 0
    read(c, BS, BS)                              # sequential: read ahead blocks 2, 3, 4
    assert c.stats.readahead_issued == 3
    assert all(c.hash[k].flags & B_AGE for k in (2, 3, 4))   # they enter cold
    read(c, 2 * BS, BS)
    assert c.stats.readahead_hits == 1 and c.stats.misses == 2
    c.check_invariants()


def test_read_error_on_a_miss_returns_eio_and_caches_nothing():
    be = FaultyBackend(4 * MiB)
    c = make_cache(backend=be)
    be.fail_reads = True
    with pytest.raises(OSError):
        read(c, 0)
    assert 0 not in c.hash and c.stats.read_errors == 1
    c.check_invariants()
    be.fail_reads = False
    assert read(c, 0) == bytes(4096)


def test_many_threads_small_cache_slow_backend_no_deadlock():
    """Every buffer dirty, a slow backend, writers from 8 threads: all finish, data intact."""
    import time
    from nbdcache.core.daemon import BufDaemons

    class Slow(FaultyBackend):
        def pwrite(self, buf, offset):
            time.sleep(0.002)
            super().pwrite(buf, offset)

    be = Slow(8 * MiB)
    c = make_cache(ram=1 * MiB, backend=be, clock=time.monotonic)
    daemons = BufDaemons(c, interval=0.05, io_threads=2)
    c.throttle._kick = daemons.kick
    daemons.start()
    try:
        def writer(i):
            for k in range(32):
                c.pwrite(bytes([i]) * 16 * KiB, (i * 32 + k) * 16 * KiB)
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        c.flush()
    finally:
        daemons.stop()
    for i in range(8):
        assert be.data[i * 512 * KiB:(i + 1) * 512 * KiB] == bytes([i]) * 512 * KiB
    assert c.throttle.bd_wait_blocks > 0        # writers were held back, not failed
    assert daemons.failed is None
    c.check_invariants()


def _now(fn, *args):
    from concurrent.futures import Future
    f = Future()
    f.set_result(fn(*args))
    return f


def test_flush_keeps_a_window_of_writes_in_flight_not_batches():
    """FLUSH keeps up to hirunningspace of clusters in flight and submits the next one as
    soon as the oldest completes: the backend is not left idle waiting for the slowest
    write of a batch (the sequential-flush benchmark paid that barrier)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    gates: dict[int, threading.Event] = {}
    started: list[int] = []

    class Gated(FaultyBackend):
        def pwrite(self, buf, offset):
            started.append(offset)
            assert gates.setdefault(offset, threading.Event()).wait(10)
            super().pwrite(buf, offset)

    for k in range(8):
        gates[k * BS] = threading.Event()
    be = Gated(8 * MiB)
    pool = ThreadPoolExecutor(16)
    c = make_cache(ram=4 * MiB, backend=be, submit=pool.submit, max_io=BS,
                   hirunningspace=4 * BS, clock=time.monotonic)
    for k in range(8):
        c.pwrite(bytes([k + 1]) * BS, k * BS)
    flusher = threading.Thread(target=c.flush)
    flusher.start()

    def until(cond):
        end = time.monotonic() + 5
        while not cond() and time.monotonic() < end:
            time.sleep(0.005)
        return cond()

    try:
        assert until(lambda: len(started) == 4)
        time.sleep(0.1)
        assert len(started) == 4, "more than hirunningspace in flight"
        gates[started[0]].set()
        assert until(lambda: len(started) == 5), \
            "the fifth cluster waited for the whole first batch, not for one slot"
        assert not any(gates[o].is_set() for o in started[1:4])   # the rest still in flight
    finally:
        for g in gates.values():
            g.set()
        flusher.join(10)
        pool.shutdown()
    assert not flusher.is_alive()
    for k in range(8):
        assert be.data[k * BS:(k + 1) * BS] == bytes([k + 1]) * BS
    c.check_invariants()
