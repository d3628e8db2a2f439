"""Model-based test: the cache against a plain bytearray disk (hypothesis stateful).

After every step the cache's invariant checker passes and reads match the
model; after every flush the backend alone matches the model.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachekit import KiB, Deferred, FaultyBackend, make_cache

DISK = 1024 * KiB + 3 * 4096          # not a multiple of the block size: a short last block


class CacheModel(RuleBasedStateMachine):
    @initialize(bs=st.sampled_from([4 * KiB, 16 * KiB, 64 * KiB]),
                nbufs=st.integers(16, 24), readahead=st.integers(0, 3))
    def setup(self, bs: int, nbufs: int, readahead: int) -> None:
        self.backend = FaultyBackend(DISK)
        self.deferred = Deferred()
        # hidirtybufspace far above the arena: guest writes never wait in bd_wait here
        # (tests/core/test_throttle.py covers it); getnewbuf starvation runs a daemon pass.
        self.cache = make_cache(ram=nbufs * bs, block_size=bs, backend=self.backend,
                                readahead=readahead, max_io=4 * bs, submit=self.deferred,
                                hidirtybufspace=1 << 40, lodirtybufspace=1 << 39)
        self.cache._wait = self._daemon_runs_while_waiting
        self.model = bytearray(DISK)
        self.durable = bytearray(DISK)   # what the backend must hold after a flush
        self.counter = 0

    def _daemon_runs_while_waiting(self, timeout: float = 1.0) -> None:
        """Stands in for the sleep of a starved thread: the daemons run meanwhile."""
        from nbdcache.core.buf import QUEUE_DIRTY, QUEUE_DIRTY_HW
        cache = self.cache
        saved = cache.submit
        cache.lock.release()
        try:
            self.deferred.run_all()
            cache.submit = lambda fn, *a: _done(fn(*a))
            cache.flushbufqueues(QUEUE_DIRTY)
            cache.flushbufqueues(QUEUE_DIRTY_HW)
        finally:
            cache.submit = saved
            cache.lock.acquire()

    def _data(self, n: int) -> bytes:
        self.counter += 1
        tag = self.counter.to_bytes(4, "little")
        return (tag * (n // 4 + 1))[:n]

    offsets = st.integers(0, DISK - 1)
    lengths = st.integers(1, 200 * KiB)

    @rule(off=offsets, n=lengths, fua=st.booleans())
    def write(self, off: int, n: int, fua: bool) -> None:
        n = min(n, DISK - off)
        data = self._data(n)
        if fua:
            # FUA waits for write-back it submits itself; run it inline for this call.
            self.cache.submit = lambda fn, *a: _done(fn(*a))
        self.cache.pwrite(data, off, fua=fua)
        self.cache.submit = self.deferred
        self.model[off:off + n] = data
        if fua:
            assert self.backend.data[off:off + n] == data, "FUA write not on the backend"

    @rule(off=st.integers(0, DISK - 1).map(lambda x: x & ~4095), n=st.integers(1, 64).map(
        lambda k: k * 4096))
    def aligned_write(self, off: int, n: int) -> None:
        self.write(off, n, False)

    @rule(off=offsets, n=lengths)
    def read(self, off: int, n: int) -> None:
        n = min(n, DISK - off)
        buf = bytearray(n)
        self.cache.pread(memoryview(buf), off)
        assert buf == self.model[off:off + n], f"read mismatch at {off}+{n}"

    @rule()
    def daemon_pass(self) -> None:
        from nbdcache.core.buf import QUEUE_DIRTY
        self.cache.flushbufqueues(QUEUE_DIRTY)

    @rule()
    def complete_io(self) -> None:
        self.deferred.run_all()

    @rule()
    def flush(self) -> None:
        self.cache.submit = lambda fn, *a: _done(fn(*a))
        self.deferred.run_all()
        self.cache.flush()
        self.cache.submit = self.deferred
        assert self.backend.data == self.model, "backend differs from model after flush"

    @rule(off=offsets, n=lengths, zero=st.booleans())
    def discard(self, off: int, n: int, zero: bool) -> None:
        n = min(n, DISK - off)
        self.deferred.run_all()          # discard waits for in-flight writes of its blocks
        self.cache.discard(off, n, zero=zero)
        if zero:
            self.model[off:off + n] = bytes(n)
        else:
            # TRIM may read back anything: re-sync the model from what the cache returns
            buf = bytearray(n)
            self.cache.pread(memoryview(buf), off)
            self.model[off:off + n] = buf

    @invariant()
    def invariants(self) -> None:
        if hasattr(self, "cache") and not self.deferred.pending:
            self.cache.check_invariants()


def _done(value: object):
    from concurrent.futures import Future
    f: Future = Future()
    f.set_result(value)
    return f


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
