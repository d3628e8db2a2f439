"""Model-based test of the cache with swap: a tiny RAM cache whose blocks mostly live in
swap, against a plain bytearray disk (hypothesis stateful).

The base machine's rules (writes, FUA, reads, discards, daemon passes, flushes) run
with a pager of two interleaved in-memory swap devices attached, plus rules that
spill dirty buffers, copy clean ones (the swapcache), drain dirty swap copies and
make swap I/O fail.  After every step the cache's and the pager's invariant
checkers pass; every read matches the model; after every successful flush the
backend alone matches the model (dirty data that lived only in swap included).
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import initialize, precondition, rule

from cachekit import KiB, Deferred, FaultyBackend, make_cache
from test_cache_model import DISK, CacheModel, _done

from nbdcache.swap.device import MemorySwapDevice
from nbdcache.swap.pager import SwapPager


class CacheSwapModel(CacheModel):
    @initialize(bs=st.sampled_from([4 * KiB, 16 * KiB]), nbufs=st.integers(16, 20),
                readahead=st.integers(0, 2), slots=st.integers(24, 200),
                dmmax=st.sampled_from([4, 8, 32]),
                spill=st.sampled_from(["both", "dirty", "clean"]))
    def setup(self, bs: int, nbufs: int, readahead: int, slots: int, dmmax: int,
              spill: str) -> None:
        self.backend = FaultyBackend(DISK)
        self.deferred = Deferred()
        self.devs = [MemorySwapDevice(slots, bs, "a"), MemorySwapDevice(slots // 2 + 1, bs, "b")]
        self.pager = SwapPager(self.devs, bs, dmmax=dmmax, nsw_cluster_max=8)
        self.cache = make_cache(ram=nbufs * bs, block_size=bs, backend=self.backend,
                                readahead=readahead, max_io=4 * bs, submit=self.deferred,
                                hidirtybufspace=1 << 40, lodirtybufspace=1 << 39,
                                pager=self.pager, spill=spill)
        self.cache._wait = self._daemon_runs_while_waiting
        self.model = bytearray(DISK)
        self.counter = 0
        self.swap_read_failing = False

    # While swap reads fail, a write or WRITE_ZEROES into part of a block whose only
    # copy is unreadable fails with EIO (correctly); the model then cannot say which
    # blocks of the request were written, so those rules wait for recovery.
    @precondition(lambda self: not self.swap_read_failing)
    @rule(off=CacheModel.offsets, n=CacheModel.lengths, fua=st.booleans())
    def write(self, off: int, n: int, fua: bool) -> None:
        CacheModel.write(self, off, n, fua)

    @precondition(lambda self: not self.swap_read_failing)
    @rule(off=st.integers(0, DISK - 1).map(lambda x: x & ~4095),
          n=st.integers(1, 64).map(lambda k: k * 4096))
    def aligned_write(self, off: int, n: int) -> None:
        CacheModel.write(self, off, n, False)

    @precondition(lambda self: not self.swap_read_failing)
    @rule(off=CacheModel.offsets, n=CacheModel.lengths, zero=st.booleans())
    def discard(self, off: int, n: int, zero: bool) -> None:
        CacheModel.discard(self, off, n, zero)

    @rule(n=st.integers(1, 12))
    def spill_dirty(self, n: int) -> None:
        with self.cache.lock:
            self.cache.spill_dirty(n, sync=True)

    @rule(n=st.integers(1, 12))
    def swapcache(self, n: int) -> None:
        with self.cache.lock:
            self.cache.swapcache_pass(n)

    @rule(n=st.integers(1, 8))
    def drain(self, n: int) -> None:
        self.cache.swap_drain(n)

    @rule(on=st.booleans())
    def swap_writes_fail(self, on: bool) -> None:
        for d in self.devs:
            d.fail_all_writes = on

    @rule(off=CacheModel.offsets, n=CacheModel.lengths)
    def read(self, off: int, n: int) -> None:
        n = min(n, DISK - off)
        buf = bytearray(n)
        try:
            self.cache.pread(memoryview(buf), off)
        except OSError:
            assert self.swap_read_failing, "a read failed with swap reads working"
            return
        assert buf == self.model[off:off + n], f"read mismatch at {off}+{n}"

    @rule()
    def flush(self) -> None:
        self.cache.submit = lambda fn, *a: _done(fn(*a))
        self.deferred.run_all()
        try:
            self.cache.flush()
        except OSError:
            assert self.swap_read_failing, "a flush failed with swap reads working"
            return
        finally:
            self.cache.submit = self.deferred
        assert self.backend.data == self.model, "backend differs from model after flush"
        assert not self.pager.ndirty, "dirty swap copies left after a flush"

    @precondition(lambda self: not self.swap_read_failing)
    @rule()
    def swap_reads_fail(self) -> None:
        """Swap reads fail for a while: clean copies fall back to the backend; a dirty
        copy's read fails with EIO (and so does a flush), and nothing else."""
        for d in self.devs:
            d.fail_all_reads = True
        self.swap_read_failing = True

    @rule(pick=st.integers(0, 1 << 16))
    def read_a_swapped_block(self, pick: int) -> None:
        """Aim a read at a block that only swap holds (a swap hit, or a read error while
        swap reads fail)."""
        c = self.cache
        only_swap = sorted(b for b in self.pager._recs if b not in c.hash)
        if only_swap:
            blk = only_swap[pick % len(only_swap)]
            self.read(blk * c.block_size, min(c.block_size, DISK - blk * c.block_size))

    @precondition(lambda self: self.swap_read_failing)
    @rule()
    def swap_reads_recover(self) -> None:
        for d in self.devs:
            d.fail_all_reads = False
        self.swap_read_failing = False


TestCacheSwapModel = CacheSwapModel.TestCase
TestCacheSwapModel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)



def test_every_swap_path_is_exercised() -> None:
    """A fixed run through each swap path the machine above claims to test (its random
    runs need not hit them all every time; a test that cannot fail is a defect), with
    the invariants checked and every read compared with the model after each step."""
    bs = 4 * KiB
    backend = FaultyBackend(DISK)
    devs = [MemorySwapDevice(120, bs, "a"), MemorySwapDevice(80, bs, "b")]
    pager = SwapPager(devs, bs, dmmax=8, nsw_cluster_max=8)
    c = make_cache(ram=16 * bs, block_size=bs, backend=backend, max_io=4 * bs,
                   pager=pager, spill="both", hidirtybufspace=1 << 40,
                   lodirtybufspace=1 << 39)
    model = bytearray(DISK)

    def daemons_run_while_waiting(timeout: float = 1.0) -> None:
        from nbdcache.core.buf import QUEUE_DIRTY, QUEUE_DIRTY_HW
        c.lock.release()
        try:
            c.flushbufqueues(QUEUE_DIRTY)
            c.flushbufqueues(QUEUE_DIRTY_HW)
        finally:
            c.lock.acquire()

    c._wait = daemons_run_while_waiting

    def write(k: int, v: int) -> None:
        data = bytes([v]) * bs
        c.pwrite(data, k * bs)
        model[k * bs:(k + 1) * bs] = data
        c.check_invariants()

    def read(k: int) -> bool:
        try:
            got = bytearray(bs)
            c.pread(memoryview(got), k * bs)
        except OSError:
            return False
        assert got == model[k * bs:(k + 1) * bs], f"block {k}"
        c.check_invariants()
        return True

    def spill(n: int) -> None:
        with c.lock:
            c.spill_dirty(n, sync=True)
        c.check_invariants()

    for k in range(64):                                  # 4x the RAM cache, all dirty
        write(k, 1)
        if k % 8 == 7:
            spill(12)
    assert all(read(k) for k in range(64))              # most of it comes from swap
    c.swap_drain(8)
    c.flush()
    assert backend.data == model
    with c.lock:
        c.swapcache_pass(12)
    c.check_invariants()
    for d in devs:
        d.fail_all_writes = True
    for k in range(8):
        write(k, 2)
    spill(12)
    for d in devs:
        d.fail_all_writes = False
    for k in range(64):
        write(k, 3)
        if k % 8 == 7:
            spill(12)
    for d in devs:
        d.fail_all_reads = True
    failed = [k for k in range(64) if k not in c.hash and not read(k)]
    for d in devs:
        d.fail_all_reads = False
    assert failed, "no read met an unreadable dirty swap copy"
    assert all(read(k) for k in range(64))
    c.flush()
    assert backend.data == model
    st = c.counters()
    for k in ("swap_hits", "swap_spill_dirty", "swap_spill_clean", "swap_drained",
              "swap_unswapped", "swap_write_errors", "swap_read_errors", "swap_lost_dirty"):
        assert st[k] > 0, f"{k} never happened: {st}"
