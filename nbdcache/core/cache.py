"""The buffer cache: every guest request goes through here.

Theory of operation
-------------------
The cache holds ``nbuf`` buffers of ``block_size`` bytes, carved once from an
anonymous mmap (the arena).  ``hash`` maps a block number to the one buffer
that caches it (never two: ``getblk`` creates under the lock and rechecks).
Each buffer is on one queue, or on none while it is busy or being written:

    EMPTY     no identity, no memory counted in bufspace; taken first by getnewbuf
    CLEAN     valid data, not dirty; LRU with a second chance (B_AGE)
    DIRTY     B_DELWRI buffers, flushed by buf_daemon, oldest first
    DIRTY_HW  B_DELWRI|B_HEAVY buffers, flushed by buf_daemon_hw

Reads copy out of valid sectors; a miss takes the buffer busy, reads only the
missing sectors from the backend outside the lock, and merges them into
sectors that are still invalid.  Writes copy in and mark sectors valid and
dirty (``bdwrite``): the guest is acknowledged at once, a partial sector being
read-modify-written first.  Write-back (``flushbufqueues`` from the daemons,
``flush`` and FUA from the guest) snapshots clusters of logically adjacent
dirty buffers into one backend write each (``cluster_awrite``), accounts them
in ``runningbufspace``, and clears ``B_DELWRI`` on completion only if the
buffer was not modified meanwhile.  A failed write leaves the buffer dirty
with ``B_ERROR``; it is retried after a back-off, and any FLUSH that needs it
fails with the error until a write succeeds.

``getnewbuf`` recycles EMPTY then CLEAN buffers, keeps ``bufspace`` between
``lobufspace`` and ``hibufspace`` with the kernel's hysteresis, never touches
a dirty buffer and never writes: when it finds nothing it kicks the daemons
and waits.  TRIM and WRITE_ZEROES are the only operations that discard dirty
data; while one runs, its range is fenced so no buffer can be created in it
before the backend has carried it out.

Swap (``nbdcache.swap.pager``, optional)
----------------------------------------
With a pager, RAM *clean* means "equal to the newest copy, on the backend or
in swap", and one rule keeps the two consistent: a cached block holds at least
the sectors of its swap copy, and a block dirty in RAM has no swap copy.  So:
``getblk`` pages a block in (``_swapin``: the block, and its contiguous swap
neighbours in the same read when they evict nothing, the stream is sequential
or it is the drain; neighbours enter cold) before handing out a new buffer for
it; every modification calls ``_unswap`` (``swap_pager_unswapped``), which
frees the slot and, if the slot was dirty, marks its sectors dirty in RAM;
``discard`` frees the range's slots (``swap_pager_freespace``).  Page-outs
(``_pageout``) snapshot idle buffers under the lock, write without it, and only
then let RAM go: a block paged out dirty becomes clean in RAM with a dirty
swap copy.  The swap daemon (``swap_pass``) spills the oldest dirty buffers
when guests are about to wait for a saturated backend and copies clean buffers
about to be recycled (the swapcache); a guest write past mid2 spills
synchronously first (``spill_dirty(sync=True)``).  ``buf_daemon_hw``
(``swap_drain``) pages dirty swap copies into B_HEAVY buffers, taken from the
reserve above hibufspace, and writes them back while pressure is low; FLUSH and
FUA (``_sync_blocks``) drain every block they cover, whether its dirty data is
in RAM, in swap, or moves between them meanwhile.

Locking
-------
One engine lock (``self.lock``) guards every buffer header, queue, counter and
the hash.  Data is copied under it for hits (a copy of a few KiB is cheaper
than a second lock round-trip); backend I/O is never done under it.  A busy
buffer belongs to the thread that made it busy; ``writing`` buffers belong to
their write-back job.  Waits use ``self.cv`` (on the engine lock) and are
bounded by one second, after which the waiter re-examines the state.
Methods whose names start with ``_`` or are kernel primitives (``getblk``,
``getnewbuf``, ``brelse``, ``bqrelse``, ``bdirty``, ``bundirty``) require the
lock; the public data-path methods (``pread``, ``pwrite``, ``flush``,
``discard``, ``prefetch``, ``flushbufqueues``) take it themselves.
"""

from __future__ import annotations

import errno
import mmap
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from nbdcache.core.buf import (
    B_AGE, B_CACHE, B_DELWRI, B_ERROR, B_HEAVY, B_INVAL, B_NOCACHE, B_RAM, QUEUE_CLEAN,
    QUEUE_DIRTY, QUEUE_DIRTY_HW, QUEUE_EMPTY, QUEUE_NAMES, QUEUE_NONE, SECTOR, SECTOR_SHIFT,
    Buf, runs, sector_cover, sector_span,
)
from nbdcache.core.throttle import Throttle
from nbdcache.swap.pager import SwapNoCredit, SwapPagerError

SECTOR_MASK = SECTOR - 1

_ZEROES = bytes(1024 * 1024)


class BufCacheInvariantError(AssertionError):
    """The cache's state contradicts one of its invariants (the KASSERT habit)."""


@dataclass
class WriteJob:
    """One write-back I/O: a cluster of adjacent dirty buffers and their snapshot."""

    bufs: list[Buf]
    gens: list[int]
    segments: list[tuple[int, bytes]]       # (disk offset, data) written in order
    running: int                            # bytes accounted in runningbufspace
    heavy: bool
    error: OSError | None = None
    done: threading.Event = field(default_factory=threading.Event)


class CacheStats:
    """Counters that are not the kernel's accounting (that lives on Throttle and BufCache)."""

    FIELDS = ("hits", "misses", "readahead_issued", "readahead_hits", "backend_reads",
              "backend_read_bytes", "writeback_clusters", "writeback_bufs",
              "writeback_bytes", "writeback_errors", "writeback_segments", "flushes",
              "flush_errors", "fua_writes", "discards", "discarded_dirty", "read_errors",
              "getnewbuf_waits", "recycled", "writes", "reads", "swap_hits",
              "swap_pagein_neighbours", "swap_spill_dirty", "swap_spill_clean",
              "swap_spill_sync", "swap_drained", "swap_recycled_uncopied",
              "swap_read_fallbacks")
    __slots__ = FIELDS

    def __init__(self) -> None:
        for f in self.FIELDS:
            setattr(self, f, 0)

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}


def _inline_submit(fn: Callable[..., Any], *args: Any) -> Future:
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - delivered to the waiter like an executor would
        fut.set_exception(e)
    return fut


class BufCache:
    def __init__(self, params: Mapping[str, int], backend: Any, *,
                 clock: Callable[[], float] = time.monotonic,
                 submit: Callable[..., Future] = _inline_submit,
                 kick: Callable[[bool], None] | None = None,
                 max_io: int = 1 << 20, flushperqueue: int = 1024, readahead: int = 4,
                 log: Any = None, pager: Any = None, spill: str = "both",
                 kick_swap: Callable[[], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.backend = backend
        self.clock = clock
        self.submit = submit
        self.log = log
        bs = self.block_size = params["block_size"]
        self.shift = bs.bit_length() - 1
        self.size = backend.size
        self.nblocks = -(-self.size // bs)
        self._lastblk = self.size // bs         # blocks below it are whole
        self._fullmask = (1 << (bs >> SECTOR_SHIFT)) - 1
        self.nbuf = params["nbuf"]
        self.maxbufspace = params["maxbufspace"]
        self.hibufspace = params["hibufspace"]
        self.lobufspace = params["lobufspace"]
        self.max_io = max_io
        self.flushperqueue = flushperqueue
        self.readahead = readahead
        self.throttle = Throttle(self.lock, params, kick or (lambda hw: None), clock)
        self.stats = CacheStats()
        self.bufspace = 0
        self.getnewbufcalls = 0
        self.flushing = False
        self._waiters = 0
        self._ra_last = -2
        self._discarding: list[tuple[int, int]] = []
        self._writeback_failing = False
        self.pager = pager
        self.spill = spill
        self._swapin_served = 0             # page-ins that filled the requested buffer
        self._sequential = False            # the current read continues the last one
        self.kick_swap = kick_swap or (lambda: None)
        self.arena = mmap.mmap(-1, self.nbuf * bs)
        mv = memoryview(self.arena)
        self.bufs = [Buf(i, mv[i * bs:(i + 1) * bs]) for i in range(self.nbuf)]
        self.hash: dict[int, Buf] = {}
        self.queues: list[OrderedDict[int, Buf]] = [OrderedDict() for _ in QUEUE_NAMES]
        for b in self.bufs:
            self._enqueue(b, QUEUE_EMPTY)

    # ================================================================== geometry helpers

    def blocklen(self, blkno: int) -> int:
        """Bytes of block ``blkno`` that lie on the disk (the last block may be short)."""
        return min(self.block_size, self.size - (blkno << self.shift))

    def fullmask(self, blkno: int) -> int:
        if blkno < self._lastblk:
            return self._fullmask
        return (1 << ((self.blocklen(blkno) + SECTOR - 1) >> SECTOR_SHIFT)) - 1

    # ================================================================== queues

    def _enqueue(self, b: Buf, qindex: int, head: bool = False) -> None:
        q = self.queues[qindex]
        q[b.index] = b
        if head:
            q.move_to_end(b.index, last=False)
        b.qindex = qindex

    def bremfree(self, b: Buf) -> None:
        """Take ``b`` off its queue (no-op when it is on none)."""
        if b.qindex != QUEUE_NONE:
            del self.queues[b.qindex][b.index]
            b.qindex = QUEUE_NONE

    def _requeue(self, b: Buf) -> None:
        """Put an idle buffer (not busy, not writing) on the queue its state selects."""
        if b.busy or b.writing:
            return
        if b.blkno < 0:
            self._enqueue(b, QUEUE_EMPTY, head=True)
        elif b.flags & B_DELWRI:
            self._enqueue(b, QUEUE_DIRTY_HW if b.flags & B_HEAVY else QUEUE_DIRTY)
        else:
            self._enqueue(b, QUEUE_CLEAN)
        self._wakeup()

    def _wakeup(self) -> None:
        if self._waiters:
            self.cv.notify_all()

    def _wait(self, timeout: float = 1.0) -> None:
        """Sleep until a buffer changes state (bounded); the engine lock is released meanwhile."""
        self._waiters += 1
        try:
            self.cv.wait(timeout)
        finally:
            self._waiters -= 1

    # ================================================================== dirty accounting

    def bdirty(self, b: Buf, mask: int) -> None:
        """Mark sectors ``mask`` of ``b`` dirty; on the clean→dirty transition account
        it and heat up the daemons (L1163–1192).  Caller owns ``b`` or it is idle."""
        t = self.throttle
        new = mask & ~b.dirty
        b.dirty |= mask
        b.gen += 1
        b.flags &= ~B_NOCACHE
        if new:
            nbytes = new.bit_count() << SECTOR_SHIFT
            t.dirtybufspace += nbytes
            if b.flags & B_HEAVY:
                t.dirtybufspacehw += nbytes
        if not b.flags & B_DELWRI:
            b.flags |= B_DELWRI
            t.dirtybufcount += 1
            t.dirtykvaspace += self.block_size
            if b.flags & B_HEAVY:
                t.dirtybufcounthw += 1
            t.bd_heatup()

    def bundirty(self, b: Buf) -> None:
        """Clear ``B_DELWRI`` and every dirty sector, undo the accounting, signal progress."""
        if not b.flags & B_DELWRI:
            return
        t = self.throttle
        nbytes = b.dirty.bit_count() << SECTOR_SHIFT
        b.flags &= ~B_DELWRI
        b.dirty = 0
        t.dirtybufcount -= 1
        t.dirtykvaspace -= self.block_size
        t.dirtybufspace -= nbytes
        if b.flags & B_HEAVY:
            t.dirtybufcounthw -= 1
            t.dirtybufspacehw -= nbytes
        t.bd_signal(self.block_size)

    def bheavy(self, b: Buf) -> None:
        """Make ``b`` heavy-weight: its write-back belongs to buf_daemon_hw (L1199–1209)."""
        if b.flags & B_HEAVY:
            return
        b.flags |= B_HEAVY
        if b.flags & B_DELWRI:
            t = self.throttle
            t.dirtybufcounthw += 1
            t.dirtybufspacehw += b.dirty.bit_count() << SECTOR_SHIFT
            if b.qindex == QUEUE_DIRTY:
                self.bremfree(b)
                self._enqueue(b, QUEUE_DIRTY_HW)

    # ================================================================== getblk / getnewbuf / release

    def getblk(self, blkno: int, wait: bool = True, swapin: bool = True,
               heavy: bool = False) -> Buf | None:
        """Return the buffer for ``blkno`` busy and off its queue, creating it if needed.

        May block (releasing the lock) while the buffer is busy, while a
        discard fences the block, or while getnewbuf finds no buffer.  With
        ``wait=False`` returns None instead of blocking.  The caller must check
        which sectors are valid (the kernel's B_CACHE contract).  A buffer
        created for a block that has a swap copy is paged in first (with
        ``swapin``; a caller about to overwrite the whole block may skip it),
        so a cached block always holds at least the sectors its swap copy
        holds; a dirty copy that cannot be read raises EIO.  ``heavy`` (the swap
        drain) may take a new buffer from the reserve above hibufspace.
        """
        while True:
            b = self.hash.get(blkno)
            if b is not None:
                if b.busy:
                    if not wait:
                        return None
                    self._wait()
                    continue
                self.bremfree(b)
                b.busy = True
                b.flags &= ~B_AGE
                return b
            if self._discarding and self._fenced(blkno):
                if not wait:
                    return None
                self._wait()
                continue
            b = self._claim(blkno, 0, heavy=heavy, wait=wait)
            if b is None:
                if not wait:
                    return None
                continue
            if swapin and self.pager is not None and self.pager.has(blkno):
                self._swapin(b, heavy)
            return b

    def _claim(self, blkno: int, flags: int, heavy: bool = False,
               wait: bool = False) -> Buf | None:
        """A new buffer (getnewbuf) given the identity ``blkno`` and ``flags``, busy and
        hashed; or None if getnewbuf found none (having waited, with ``wait``)."""
        b = self.getnewbuf(heavy=heavy, wait=wait)
        if b is None:
            return None
        if blkno in self.hash:              # created by another thread while we slept
            self._destroy(b)
            return None
        b.blkno = blkno
        b.flags = flags
        b.busy = True
        self.hash[blkno] = b
        return b

    def getnewbuf(self, heavy: bool = False, wait: bool = True) -> Buf | None:
        """Find a buffer to reuse: EMPTY first, then CLEAN with a second chance (L1884–2199).

        Keeps ``bufspace`` within [lobufspace, hibufspace]: once it reaches
        hibufspace every clean buffer found is destroyed until bufspace is
        below lobufspace, and only then is one handed out.  Dirty buffers are
        never reused.  ``heavy`` (buf_daemon_hw's page-ins) may dip into the
        reserve above hibufspace.  Returns a buffer with memory and no
        identity, off every queue; or None after kicking the daemons and
        waiting (up to one second) for space, in which case the caller retries.
        """
        self.getnewbufcalls += 1
        bs = self.block_size
        empty, clean = self.queues[QUEUE_EMPTY], self.queues[QUEUE_CLEAN]
        while True:
            if self.bufspace < self.lobufspace:
                self.flushing = False
            b = None
            if empty and (heavy or not self.flushing):
                b = next(iter(empty.values()))
            else:
                while clean:
                    b = next(iter(clean.values()))
                    if not b.flags & B_AGE and len(clean) > 1:
                        b.flags |= B_AGE                    # second chance (L1955–1963)
                        clean.move_to_end(b.index)
                        b = None
                        continue
                    break
            if b is None:
                if not wait:
                    return None
                self.throttle.bd_speedup()                  # heeeelp
                self.stats.getnewbuf_waits += 1
                self._wait()
                return None
            self.bremfree(b)
            if b.blkno >= 0:
                if self.pager is not None and not self.pager.has(b.blkno):
                    self._recycled_uncopied()
                self._release_identity(b)                   # vfs_vmio_release + brelvp
                self.bufspace -= bs
                self.stats.recycled += 1
            b.flags = 0
            if not heavy:
                if self.bufspace >= self.hibufspace:
                    self.flushing = True
                if self.bufspace < self.lobufspace:
                    self.flushing = False
                if self.flushing:
                    self._enqueue(b, QUEUE_EMPTY, head=True)  # destroy it and look again
                    b.flags = B_INVAL
                    continue
            else:
                b.flags = B_HEAVY
            self.bufspace += bs                             # allocbuf
            return b

    def _release_identity(self, b: Buf) -> None:
        if self.hash.get(b.blkno) is b:
            del self.hash[b.blkno]
        b.blkno = -1
        b.valid = 0
        b.dirty = 0
        b.errors = 0

    def _destroy(self, b: Buf) -> None:
        """Discard ``b``'s contents, dirty or not, and put it on EMPTY (brelse's B_INVAL path)."""
        if b.flags & B_DELWRI:
            self.bundirty(b)
        b.busy = False
        self.bremfree(b)
        if b.blkno >= 0 or b.flags & ~B_INVAL:
            self._release_identity(b)
        self.bufspace -= self.block_size
        b.flags = B_INVAL
        self._enqueue(b, QUEUE_EMPTY, head=True)
        self._wakeup()

    def brelse(self, b: Buf) -> None:
        """Release ``b``, destroying it if B_INVAL/B_NOCACHE/B_ERROR asks and it is not
        dirty data worth keeping (L1267–1633).  B_NOCACHE on a dirty buffer discards
        the dirty data: only TRIM and WRITE_ZEROES set it."""
        if b.flags & B_NOCACHE and b.flags & B_DELWRI:
            self.bundirty(b)
        if b.flags & B_DELWRI and not b.flags & B_INVAL:
            pass                            # a dirty buffer is only destroyed by B_INVAL
        elif b.flags & (B_NOCACHE | B_INVAL | B_ERROR) or b.valid == 0:
            if b.writing:
                raise BufCacheInvariantError(f"destroying {b!r} while it is being written")
            self._destroy(b)
            return
        b.flags &= ~B_NOCACHE
        b.busy = False
        self._requeue(b)

    def bqrelse(self, b: Buf) -> None:
        """Release ``b`` keeping its contents: DIRTY or DIRTY_HW if dirty, else CLEAN tail."""
        if b.valid == 0 and not b.flags & B_DELWRI:
            self.brelse(b)
            return
        b.busy = False
        self._requeue(b)

    # ================================================================== reads

    def pread(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset``.  May block on misses."""
        end = offset + len(buf)
        pos = offset
        shift = self.shift
        bmask = self.block_size - 1
        hashget = self.hash.get
        clean = self.queues[QUEUE_CLEAN]
        st = self.stats
        ra: list[tuple[Buf, int]] | None = None
        self.lock.acquire()
        try:
            st.reads += 1
            # one sequential-stream test serves read-ahead (breadn) and swap page-in clustering
            seq = self._sequential = (offset >> shift) in (self._ra_last, self._ra_last + 1)
            while pos < end:
                blkno = pos >> shift
                boff = pos & bmask
                n = min(bmask + 1 - boff, end - pos)
                b = hashget(blkno)
                if b is not None and not b.busy:
                    first = boff >> SECTOR_SHIFT
                    need = ((2 << (((boff + n - 1) >> SECTOR_SHIFT) - first)) - 1) << first
                    if b.valid & need == need:
                        dst = pos - offset
                        buf[dst:dst + n] = b.data[boff:boff + n]
                        st.hits += 1
                        if b.flags & (B_AGE | B_RAM):
                            if b.flags & B_RAM:
                                st.readahead_hits += 1
                            b.flags &= ~(B_AGE | B_RAM)
                        if b.qindex == QUEUE_CLEAN:
                            clean.move_to_end(b.index)
                        pos += n
                        continue
                self._bread_miss(blkno, boff, n, buf, pos - offset)
                pos += n
            if self.readahead:
                last_blk = (end - 1) >> shift
                if seq:
                    ra = self._breadn(last_blk + 1, self.readahead)
                self._ra_last = last_blk
        finally:
            self.lock.release()
        if ra:
            for b, blkno in ra:
                self.submit(self._readahead_done, b, blkno)

    def prefetch(self, offset: int, count: int) -> None:
        """NBD_CMD_CACHE: bring [offset, offset+count) into the cache without copying out."""
        end = offset + count
        with self.lock:
            pos = offset
            while pos < end:
                blkno = pos >> self.shift
                boff = pos & (self.block_size - 1)
                n = min(self.block_size - boff, end - pos)
                self._bread_miss(blkno, boff, n, None, 0)
                pos += n

    def _bread_miss(self, blkno: int, boff: int, n: int, out: memoryview | None,
                    dst: int) -> None:
        """Slow path of a read of one block: getblk, fill the missing sectors, copy out."""
        served = self._swapin_served
        b = self.getblk(blkno)
        assert b is not None
        need = sector_span(boff, boff + n)
        missing = need & ~b.valid
        if self._swapin_served != served:
            self.stats.swap_hits += 1
        if missing or self._swapin_served != served:
            self.stats.misses += 1          # a RAM miss, whether swap or the backend serves it
            if missing:
                self._fill(b, missing)
        else:
            self.stats.hits += 1
        if out is not None:
            out[dst:dst + n] = b.data[boff:boff + n]
        b.flags &= ~B_RAM
        self.bqrelse(b)

    def _fill(self, b: Buf, missing: int) -> None:
        """Read the sectors spanning ``missing`` into invalid sectors of busy ``b``.

        Releases the engine lock during the backend read.  Sectors that are
        valid (possibly dirty) are never overwritten.  On error the buffer is
        released (destroyed if it holds nothing) and the OSError propagates.
        """
        limit = self.blocklen(b.blkno)
        lo = (missing & -missing).bit_length() - 1
        hi = missing.bit_length()
        start, stop = lo << SECTOR_SHIFT, min(hi << SECTOR_SHIFT, limit)
        span = ((1 << (hi - lo)) - 1) << lo
        direct = not (b.valid & span)
        base = b.blkno << self.shift
        tmp = None if direct else bytearray(stop - start)
        self.lock.release()
        try:
            target = b.data[start:stop] if direct else memoryview(tmp)
            self.backend.pread(target, base + start)
            err = None
        except OSError as e:
            err = e
        finally:
            self.lock.acquire()
        self.stats.backend_reads += 1
        self.stats.backend_read_bytes += stop - start
        if err is not None:
            self.stats.read_errors += 1
            self.brelse(b)
            raise err
        if not direct:
            for s, cnt in runs(span & ~b.valid):
                a, z = (s - lo) << SECTOR_SHIFT, min((s - lo + cnt) << SECTOR_SHIFT, stop - start)
                b.data[start + a:start + z] = tmp[a:z]
        self._set_valid(b, span)

    def _set_valid(self, b: Buf, mask: int) -> None:
        b.valid |= mask
        if b.valid == self.fullmask(b.blkno):
            b.flags |= B_CACHE

    def _breadn(self, start: int, count: int) -> list[tuple[Buf, int]]:
        """Claim buffers for up to ``count`` uncached blocks from ``start`` (read-ahead).
        Never waits: stops at the first block for which no buffer is free."""
        out = []
        for blkno in range(start, min(start + count, self.nblocks)):
            if blkno in self.hash or (self._discarding and self._fenced(blkno)):
                continue
            if self.pager is not None and self.pager.has(blkno):
                continue                    # paged in (with its neighbours) when read
            b = self._claim(blkno, B_RAM | B_AGE)
            if b is None:
                break
            out.append((b, blkno))
            self.stats.readahead_issued += 1
        return out

    def _readahead_done(self, b: Buf, blkno: int) -> None:
        limit = self.blocklen(blkno)
        try:
            self.backend.pread(b.data[:limit], blkno << self.shift)
            err = None
        except OSError as e:
            err = e
        with self.lock:
            self.stats.backend_reads += 1
            self.stats.backend_read_bytes += limit
            if err is not None:
                self.stats.read_errors += 1
                self.brelse(b)
                return
            self._set_valid(b, self.fullmask(blkno))
            self.bqrelse(b)

    # ================================================================== writes

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        """Write ``buf`` at ``offset`` into the cache (bdwrite); with ``fua`` also write it
        back and flush the backend before returning.  May block in bd_wait when
        dirty+running space is past mid2: back-pressure, never an error."""
        end = offset + len(buf)
        pos = offset
        shift = self.shift
        bmask = self.block_size - 1
        hashget = self.hash.get
        st = self.stats
        self.lock.acquire()
        try:
            st.writes += 1
            while pos < end:
                blkno = pos >> shift
                boff = pos & bmask
                n = min(bmask + 1 - boff, end - pos)
                src = pos - offset
                b = hashget(blkno)
                need = sector_span(boff, boff + n)
                if not (boff | n) & SECTOR_MASK:
                    partial = 0                 # whole sectors: nothing to read first
                else:
                    partial = need & ~sector_cover(boff, boff + n, self.blocklen(blkno))
                if b is not None and not b.busy and not partial & ~b.valid:
                    b.data[boff:boff + n] = buf[src:src + n]
                    if need & ~b.valid:
                        self._set_valid(b, need)
                    if self.pager is not None and self.pager.has(blkno):
                        self._unswap(b)
                    self.bdirty(b, need)
                    if b.qindex == QUEUE_CLEAN:
                        self.bremfree(b)
                        self._enqueue(b, QUEUE_DIRTY_HW if b.flags & B_HEAVY else QUEUE_DIRTY)
                else:
                    # A write of the whole block needs nothing from swap.
                    whole = not partial and need == self.fullmask(blkno)
                    b = self.getblk(blkno, swapin=not whole)
                    assert b is not None
                    # Read-modify-write: fill the (at most two) partial sectors that are not
                    # valid yet; on error _fill has released the buffer.
                    for s, cnt in runs(partial & ~b.valid):
                        self._fill(b, ((1 << cnt) - 1) << s)
                    b.data[boff:boff + n] = buf[src:src + n]
                    self._set_valid(b, need)
                    if self.pager is not None and self.pager.has(blkno):
                        self._unswap(b)
                    self.bdirty(b, need)
                    self.bqrelse(b)
                pos += n
            excess = self.throttle.bd_heatup()
            if excess > 0 and self.pager is not None and self.spill in ("dirty", "both"):
                # Synchronous page-out from the foreground: swap takes the excess instead
                # of the guest waiting for a slow backend.
                self.spill_dirty((excess >> shift) + 1, sync=True)
                excess = self.throttle.bd_heatup()
            if excess > 0:
                self.throttle.bd_wait(excess)
        finally:
            self.lock.release()
        if fua:
            st.fua_writes += 1
            self.sync_range(offset, len(buf))
            self.backend.flush()

    # ================================================================== write-back

    def _segments(self, bufs: list[Buf]) -> list[tuple[int, int]]:
        """Byte ranges (disk offset, length) to write for a cluster: runs of valid sectors,
        trimmed to their first and last dirty sector, merged across block boundaries."""
        out: list[list[int]] = []
        for b in bufs:
            base = b.blkno << self.shift
            limit = self.blocklen(b.blkno)
            for s, cnt in runs(b.valid):
                d = b.dirty & (((1 << cnt) - 1) << s)
                if not d:
                    continue
                lo = (d & -d).bit_length() - 1
                hi = d.bit_length()
                start = base + (lo << SECTOR_SHIFT)
                stop = base + min(hi << SECTOR_SHIFT, limit)
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1][1] += stop - start
                else:
                    out.append([start, stop - start])
        return [(o, n) for o, n in out]

    def _issue(self, bufs: list[Buf]) -> WriteJob:
        """Snapshot a cluster and mark it in flight (bawrite).  Buffers are off-queue,
        dirty, not busy and not writing."""
        bs = self.block_size
        segs = []
        for off, n in self._segments(bufs):
            data = bytearray(n)
            pos = 0
            while pos < n:
                blkno = (off + pos) >> self.shift
                boff = (off + pos) & (bs - 1)
                k = min(bs - boff, n - pos)
                data[pos:pos + k] = self.hash[blkno].data[boff:boff + k]
                pos += k
            segs.append((off, bytes(data) if n <= 4096 else data))
        for b in bufs:
            b.writing = True
            b.wgen = b.gen
        running = len(bufs) * bs
        self.throttle.bsetrunningbufspace(running)
        return WriteJob(bufs, [b.gen for b in bufs], segs, running,
                        bool(bufs[0].flags & B_HEAVY))

    def _cluster(self, b: Buf) -> WriteJob:
        """cluster_awrite: gather idle dirty neighbours of ``b`` (same queue class) up to
        max_io into one job.  ``b`` is already off its queue."""
        heavy = b.flags & B_HEAVY
        maxbufs = max(1, self.max_io >> self.shift)
        qidx = QUEUE_DIRTY_HW if heavy else QUEUE_DIRTY

        def eligible(n: Buf | None) -> bool:
            return (n is not None and n.qindex == qidx and n.flags & B_DELWRI
                    and not (n.flags & B_ERROR and n.retry_at > now))

        now = self.clock()
        lo = hi = b.blkno
        while hi - lo + 1 < maxbufs and eligible(self.hash.get(hi + 1)):
            hi += 1
        while hi - lo + 1 < maxbufs and eligible(self.hash.get(lo - 1)):
            lo -= 1
        bufs = []
        for k in range(lo, hi + 1):
            n = self.hash[k]
            self.bremfree(n)
            bufs.append(n)
        return self._issue(bufs)

    def _do_write(self, job: WriteJob) -> WriteJob:
        """Carry out a write-back job (no lock), then complete it under the lock."""
        try:
            for off, data in job.segments:
                self.backend.pwrite(data, off)
        except OSError as e:
            job.error = e
        with self.lock:
            self._biodone(job)
        job.done.set()
        return job

    def _biodone(self, job: WriteJob) -> None:
        """Write-back completion (bpdone): undirty buffers not modified meanwhile; on
        error keep them dirty with B_ERROR and a retry back-off (L3541–3565)."""
        st = self.stats
        self.throttle.runningbufwakeup(job.running)
        now = self.clock()
        for b, gen in zip(job.bufs, job.gens):
            b.writing = False
            if job.error is not None:
                b.flags = (b.flags | B_ERROR) & ~B_AGE
                b.errors += 1
                b.retry_at = now + min(0.01 * (1 << min(b.errors, 7)), 1.0)
            else:
                b.flags &= ~B_ERROR
                b.errors = 0
                if b.gen == gen:
                    self.bundirty(b)
                    b.flags |= B_AGE
            self._requeue(b)
        if job.error is not None:
            st.writeback_errors += 1
            if not self._writeback_failing and self.log:
                self.log.warning("writeback.error", error=str(job.error),
                                 offset=job.segments[0][0] if job.segments else None)
            self._writeback_failing = True
        else:
            st.writeback_clusters += 1
            st.writeback_bufs += len(job.bufs)
            st.writeback_segments += len(job.segments)
            st.writeback_bytes += sum(len(d) for _, d in job.segments)
            if self._writeback_failing and self.log:
                self.log.info("writeback.recovered")
            self._writeback_failing = False
        self._wakeup()

    def flushbufqueues(self, qindex: int) -> int:
        """Issue write-back for up to flushperqueue buffers of a dirty queue (L2334–2475).

        The walk starts at the head each time (buffers leave the queue when
        chosen, so the head is where the kernel's marker would stand); buffers
        in error back-off are passed over to the tail.  Stops early once
        runningbufspace reaches hirunningspace, so in-flight write-back stays
        bounded (the kernel bounds it further down, in the I/O layer).
        Returns the number of buffers handled.  Takes the lock; submits I/O.
        """
        jobs = []
        r = 0
        with self.lock:
            q = self.queues[qindex]
            t = self.throttle
            loops = self.flushperqueue
            seen = len(q)
            now = self.clock()
            while q and seen > 0 and loops > 0:
                seen -= 1
                b = next(iter(q.values()))
                if b.flags & B_ERROR and b.retry_at > now:
                    q.move_to_end(b.index)
                    continue
                self.bremfree(b)
                job = self._cluster(b)
                jobs.append(job)
                loops -= len(job.bufs)
                r += len(job.bufs)
                if t.runningbufspace >= t.hirunningspace:
                    break
        for job in jobs:
            self.submit(self._do_write, job)
        return r

    def sync_range(self, offset: int, count: int) -> None:
        """Write back, and wait for, every dirty block in [offset, offset+count) (bwrite),
        whether its dirty data is in RAM or in swap."""
        b0, b1 = offset >> self.shift, (offset + count - 1 >> self.shift) + 1
        pager = self.pager
        with self.lock:
            blocks = [k for k in range(b0, b1)
                      if ((b := self.hash.get(k)) is not None and b.flags & B_DELWRI)
                      or (pager is not None and pager.is_dirty(k))]
            self._sync_blocks(blocks)

    def flush(self) -> None:
        """NBD FLUSH: write back every block dirty now, in RAM or in swap, wait for
        in-flight writes, then flush the backend.  Raises the first write-back, swap
        or backend error."""
        with self.lock:
            self.stats.flushes += 1
            if self.pager is None:
                blocks = [b.blkno for b in self.bufs if b.flags & B_DELWRI]
            else:
                dirty = {b.blkno for b in self.bufs if b.flags & B_DELWRI}
                dirty.update(self.pager.dirty_blocks(self.pager.ndirty,
                                                     include_unreadable=True))
                blocks = sorted(dirty)
            try:
                self._sync_blocks(blocks)
            except OSError:
                self.stats.flush_errors += 1
                raise
        try:
            self.backend.flush()
        except OSError:
            with self.lock:
                self.stats.flush_errors += 1
            raise

    def _sync_blocks(self, blocks: list[int]) -> None:
        """Make every block of ``blocks`` that is dirty now clean on the backend.  Lock held.

        Without swap this is one ``_sync_writeback``.  With swap, dirty data may
        live in swap (spilled) or move there while we wait: blocks dirty in swap
        are paged into RAM as dirty buffers a batch at a time (as many as the
        write-back bound allows), written back, and the check is repeated until
        none of ``blocks`` is dirty anywhere.  A dirty swap copy that cannot be
        read fails the call with EIO after the other blocks have been written.
        """
        if self.pager is None:
            self._sync_writeback([(b, k) for k in blocks
                                  if (b := self.hash.get(k)) is not None])
            return
        pager = self.pager
        batch = max(1, self.max_io >> self.shift)
        error: OSError | None = None
        for _ in range(64):
            swapped = [k for k in blocks if pager.is_dirty(k)]
            targets = [(b, k) for k in blocks
                       if (b := self.hash.get(k)) is not None and b.flags & B_DELWRI]
            self._sync_writeback(targets)
            for i in range(0, len(swapped), batch):
                moved = []
                for k in swapped[i:i + batch]:
                    if not pager.is_dirty(k):
                        # rewritten meanwhile: its dirty data is back in RAM
                        b = self.hash.get(k)
                        if b is not None and b.flags & B_DELWRI:
                            moved.append((b, k))
                        continue
                    try:
                        b = self._swap_to_dirty(k, heavy=True, wait=True)
                    except OSError as e:
                        error = error or e
                        continue
                    if b is not None:
                        moved.append((b, k))
                self._sync_writeback(moved)
            if not any(self._drainable(k) for k in blocks):
                break
        if error is not None:
            raise OSError(errno.EIO, f"dirty data in swap could not be read: {error}")
        unreadable = [k for k in blocks if pager.is_dirty(k)]
        if unreadable:
            raise OSError(errno.EIO, f"{len(unreadable)} dirty blocks are only in swap and "
                          f"unreadable (first: block {unreadable[0]})")

    def _sync_writeback(self, targets: Iterable[tuple[Buf, int]]) -> None:
        """Write back the given (buffer, block) pairs that are still dirty, in clusters,
        in parallel through ``submit``; wait for all.  Lock held; released while waiting.

        Each cluster is submitted as soon as it is formed, so this thread never
        waits (for a buffer another writer holds, or for room) while holding a job
        nobody can run: two flushes waiting like that would wait for each other
        forever.  At most about ``hirunningspace`` of our snapshots is in flight: at
        the limit we wait for the oldest job only, so the backend always has work
        while the next clusters are copied (a window, not batches).
        """
        jobs: list[WriteJob] = []
        window: deque[tuple[WriteJob, Future]] = deque()
        mine: set[int] = set()          # buffers in our own jobs
        limit = max(self.throttle.hirunningspace, self.max_io)
        outstanding = 0
        for b, blk in targets:
            while outstanding >= limit:
                job, fut = window.popleft()
                self._wait_future(fut)
                outstanding -= job.running
            if b.index in mine:
                continue
            while (b.busy or b.writing) and b.blkno == blk:
                self._wait()
            if b.blkno != blk or not b.flags & B_DELWRI or b.index in mine:
                continue
            self.bremfree(b)
            job = self._cluster(b)
            jobs.append(job)
            mine.update(x.index for x in job.bufs)
            window.append((job, self._submit_unlocked(job)))
            outstanding += job.running
        while window:
            self._wait_future(window.popleft()[1])
        for j in jobs:
            if j.error is not None:
                raise OSError(j.error.errno or errno.EIO,
                              f"write-back failed: {j.error.strerror or j.error}")

    def _wait_future(self, fut: Future) -> None:
        """Wait for a write-back job; the lock is released meanwhile."""
        self.lock.release()
        try:
            fut.result()
        finally:
            self.lock.acquire()

    def _submit_unlocked(self, job: WriteJob) -> Future:
        self.lock.release()
        try:
            return self.submit(self._do_write, job)
        finally:
            self.lock.acquire()

    # ================================================================== swap

    def _drainable(self, blkno: int) -> bool:
        """Whether swap holds readable dirty data of ``blkno``."""
        if not self.pager.is_dirty(blkno):
            return False
        e = self.pager.lookup(blkno)
        return e is not None and not e.unreadable

    def _swapin(self, b: Buf, heavy: bool = False) -> None:
        """Page in busy new buffer ``b`` and its contiguous swap neighbours (getpages).

        Lock held; released during the read.  Neighbours get buffers only if one
        is free without waiting, and enter the cache cold (B_AGE).  Installs the
        swap copy's valid sectors, leaving RAM clean: a dirty swap copy stays the
        authority until the block is modified (``_unswap``) or drained.  A clean
        copy that cannot be read is dropped (the backend has the data); a dirty
        one that cannot be read destroys ``b`` and raises EIO.
        """
        pager = self.pager
        # Neighbours come along when they cost no eviction, on a sequential stream, or for
        # the drain; on random access they would push out blocks more likely to be read.
        cluster = heavy or self._sequential or self.bufspace < self.lobufspace
        while True:
            claimed: dict[int, Buf] = {}

            def wanted(n: int) -> bool:
                if not cluster or n in self.hash or n >= self.nblocks or (
                        self._discarding and self._fenced(n)):
                    return False
                nb = self._claim(n, B_AGE, heavy=heavy)     # cold; B_HEAVY only if drained
                if nb is None:
                    return False
                claimed[n] = nb
                return True

            try:
                run = pager.getpages_begin(b.blkno, wanted)
            except SwapNoCredit:
                for nb in claimed.values():
                    self._destroy(nb)
                self._wait(0.01)
                continue
            if run is None:
                return
            self.lock.release()
            try:
                pager.pagein_io(run)
            finally:
                self.lock.acquire()
            again = False
            failure: OSError | None = None
            for entry, data, err in pager.getpages_done(run):
                nb = b if entry.blkno == b.blkno else claimed[entry.blkno]
                if data is not None:
                    fill = entry.valid & ~nb.valid
                    for s, cnt in runs(fill):
                        lo = s << SECTOR_SHIFT
                        hi = min((s + cnt) << SECTOR_SHIFT, self.blocklen(nb.blkno))
                        nb.data[lo:hi] = data[lo:hi]
                    self._set_valid(nb, fill)
                    if nb is b:
                        self._swapin_served += 1
                    else:
                        self.stats.swap_pagein_neighbours += 1
                elif err is not None and entry.dirty:
                    if nb is b:
                        failure = OSError(errno.EIO, f"block {b.blkno}: its only current "
                                          f"copy, in swap, cannot be read: {err}")
                elif err is not None:
                    self.stats.swap_read_fallbacks += 1     # clean: read the backend
                elif nb is b:
                    again = True                            # remapped meanwhile: look again
                if nb is not b:
                    self.bqrelse(nb)
            if failure is not None:
                self.stats.read_errors += 1
                self.brelse(b)
                raise failure
            if not again:
                return

    def _unswap(self, b: Buf) -> None:
        """``swap_pager_unswapped``: ``b`` is being modified; free its swap copy, taking over
        the copy's dirty sectors first (RAM then holds the only current data)."""
        try:
            e = self.pager.unswapped(b.blkno, b.valid)
        except SwapPagerError as err:       # a cached block holds its swap copy's sectors
            raise BufCacheInvariantError(str(err)) from None
        if e is not None and e.dirty:
            self.bdirty(b, e.dirty_mask)

    def _swap_to_dirty(self, blkno: int, heavy: bool, wait: bool) -> Buf | None:
        """Move the dirty swap copy of ``blkno`` into a RAM buffer marked dirty (and
        B_HEAVY with ``heavy``: buf_daemon_hw's write-back); return it idle on its dirty
        queue, or None if it could not be done without waiting (``wait=False``) or the
        copy went away.  Raises EIO if the copy cannot be read.  Lock held."""
        if not self.pager.is_dirty(blkno):
            return None
        # A block dirty in swap is never being written from RAM (only dirty RAM buffers
        # are written back, and a page-out maps its slot only once it is done).
        b = self.getblk(blkno, wait=wait, heavy=heavy)
        if b is None:
            return None
        if self.pager.has(blkno):
            self._unswap(b)
        if heavy and b.flags & B_DELWRI:
            self.bheavy(b)
        self.bqrelse(b)
        return b if b.flags & B_DELWRI else None

    def _pageout(self, bufs: list[Buf], sync: bool) -> int:
        """Page out idle buffers that the caller took off their queues (putpages).

        Lock held; released during the writes.  The data is copied under the lock
        and the buffers are marked ``writing`` meanwhile (a guest write may still
        modify one: ``_unswap`` then cancels its page-out).  A block paged out
        dirty becomes clean in RAM (its swap copy is the dirty one) and a candidate
        for recycling; blocks that got no slot, no credit or a write error stay as
        they were.  Returns the number of blocks now in swap.
        """
        pager = self.pager
        bufs.sort(key=lambda x: x.blkno)
        by = {x.blkno: x for x in bufs}
        runs_, failed = pager.putpages_begin([(x.blkno, x.valid, x.dirty) for x in bufs],
                                             sync)
        for blk in failed:
            self._requeue(by[blk])
        if not runs_:
            return 0
        gens: dict[int, int] = {}
        for run in runs_:
            for i, blk in enumerate(run.blknos):
                x = by[blk]
                run.block(i)[:] = x.data
                x.writing = True
                gens[blk] = x.gen
        self.lock.release()
        try:
            for run in runs_:
                pager.pageout_io(run)
        finally:
            self.lock.acquire()
        n = 0
        st = self.stats
        for run in runs_:
            for blk, ok in pager.putpages_done(run):
                x = by[blk]
                x.writing = False
                if ok and x.gen != gens[blk]:           # cannot happen: writes cancel
                    pager.unswapped(blk)
                    ok = False
                if ok:
                    n += 1
                    if x.flags & B_DELWRI:
                        self.bundirty(x)
                        st.swap_spill_dirty += 1
                        if sync:
                            st.swap_spill_sync += 1
                    else:
                        st.swap_spill_clean += 1
                    x.flags |= B_AGE
                self._requeue(x)
        self._wakeup()
        return n

    def _take_dirty(self, maxbufs: int) -> list[Buf]:
        """Up to ``maxbufs`` idle dirty buffers, oldest first, each with its idle dirty
        neighbours (so that page-outs cluster).  Taken off their queue.  Lock held."""
        q = self.queues[QUEUE_DIRTY]
        cluster = max(1, self.pager.nsw_cluster_max)
        out: list[Buf] = []
        while q and len(out) < maxbufs:
            b = next(iter(q.values()))
            self.bremfree(b)
            out.append(b)
            k = b.blkno + 1
            while len(out) < maxbufs and (k - b.blkno) < cluster:
                n = self.hash.get(k)
                if n is None or n.qindex != QUEUE_DIRTY:
                    break
                self.bremfree(n)
                out.append(n)
                k += 1
        return out

    def spill_dirty(self, maxbufs: int, sync: bool) -> int:
        """Page out up to ``maxbufs`` of the oldest dirty buffers to swap, if the policy
        and ``swap_pager_almost_full`` allow.  Lock held.  Returns blocks paged out."""
        if self.spill not in ("dirty", "both") or not self.pager.may_spill_dirty():
            return 0
        bufs = self._take_dirty(maxbufs)
        return self._pageout(bufs, sync) if bufs else 0

    def swapcache_pass(self, maxbufs: int) -> int:
        """Copy clean buffers about to be recycled (the oldest half of CLEAN) that have
        no swap copy to swap, so that a later miss is a cheap page-in: DragonFly's
        swapcache.  Only once the cache is half full.  Lock held."""
        if (self.spill not in ("clean", "both") or self.bufspace < self.lobufspace // 2
                or not self.pager.may_spill_clean()):
            return 0
        q = self.queues[QUEUE_CLEAN]
        pager = self.pager
        take = []
        for i, b in enumerate(list(q.values())[:max(1, len(q) // 2)]):
            if len(take) >= maxbufs:
                break
            if b.valid and not pager.has(b.blkno):
                take.append(b)
        for b in take:
            self.bremfree(b)
        return self._pageout(take, sync=False) if take else 0

    def swap_pass(self) -> int:
        """One pass of the swap daemon: dirty spill when the guest is about to wait for a
        saturated backend, then the swapcache copy.  Takes the lock; blocks for I/O."""
        with self.lock:
            t = self.throttle
            budget = self.pager.nsw_cluster_max * max(1, self.pager.nsw_wcount_async_max)
            n = 0
            total = t.runningbufspace + t.dirtykvaspace
            if total >= t.mid1() and t.buf_runningbufspace_severe():
                n += self.spill_dirty(budget, sync=False)
            n += self.swapcache_pass(budget)
            return n

    def swap_drain(self, maxblocks: int | None = None) -> int:
        """buf_daemon_hw's share of swap: move dirty swap copies into heavy RAM buffers and
        issue their write-back, while write-back pressure is low (dirty+running below
        mid1 and running below hirunningspace).  Takes the lock; returns blocks moved."""
        jobs = []
        with self.lock:
            pager, t = self.pager, self.throttle
            if not pager.ndirty:
                return 0
            maxblocks = maxblocks or max(1, self.max_io >> self.shift)
            moved = 0
            drained: list[Buf] = []
            for blk in pager.dirty_blocks(maxblocks):
                if (t.runningbufspace + t.dirtykvaspace >= t.mid1()
                        or t.runningbufspace >= t.hirunningspace):
                    break
                try:
                    b = self._swap_to_dirty(blk, heavy=True, wait=False)
                except OSError:
                    continue                    # counted by the pager; FLUSH reports it
                if b is None:
                    continue
                moved += 1
                self.stats.swap_drained += 1
                drained.append(b)
            for b in drained:                   # all paged in first: clusters form
                if b.qindex == QUEUE_DIRTY_HW:
                    self.bremfree(b)
                    jobs.append(self._cluster(b))
        for job in jobs:
            self.submit(self._do_write, job)
        return moved

    def _recycled_uncopied(self) -> None:
        """getnewbuf recycled a clean block swap has no copy of: wake the swap daemon."""
        st = self.stats
        st.swap_recycled_uncopied += 1
        if st.swap_recycled_uncopied % 4 == 1 and self.spill in ("clean", "both"):
            self.kick_swap()

    # ================================================================== discard

    def _fenced(self, blkno: int) -> bool:
        return any(lo <= blkno < hi for lo, hi in self._discarding)

    def discard(self, offset: int, count: int, zero: bool, fua: bool = False) -> None:
        """TRIM (zero=False) or WRITE_ZEROES (zero=True) of [offset, offset+count).

        Whole blocks are dropped from the cache, dirty data included (the only
        operations allowed to), and the backend trims or zeroes them while the
        range is fenced against new buffers.  Partial blocks at either end are
        written as zeroes through the cache for WRITE_ZEROES and left alone by
        TRIM (which is advisory).
        """
        bs = self.block_size
        end = offset + count
        b0 = -(-offset // bs)
        b1 = self.nblocks if end >= self.size else end // bs
        if b1 <= b0:
            if zero:
                self._write_zeroes(offset, end)
        else:
            if zero and offset < b0 * bs:
                self._write_zeroes(offset, b0 * bs)
            if zero and end > b1 * bs:
                self._write_zeroes(b1 * bs, end)
            self._discard_blocks(b0, b1, zero)
        if fua:
            self.sync_range(offset, count)
            self.backend.flush()

    def _write_zeroes(self, start: int, end: int) -> None:
        zeroes = memoryview(_ZEROES)
        while start < end:
            n = min(len(_ZEROES), end - start)
            self.pwrite(zeroes[:n], start)
            start += n

    def _discard_blocks(self, b0: int, b1: int, zero: bool) -> None:
        with self.lock:
            self.stats.discards += 1
            fence = (b0, b1)
            self._discarding.append(fence)
            try:
                if self.pager is not None:
                    self.pager.freespace(b0, b1 - b0)
                if b1 - b0 <= len(self.hash):
                    cached = [k for k in range(b0, b1) if k in self.hash]
                else:
                    cached = [k for k in self.hash if b0 <= k < b1]
                for blkno in cached:
                    b = self.hash.get(blkno)
                    while b is not None and (b.busy or b.writing):
                        self._wait()
                        b = self.hash.get(blkno)
                    if b is None:
                        continue
                    if b.flags & B_DELWRI:
                        self.stats.discarded_dirty += 1
                    self.bremfree(b)
                    b.busy = True
                    b.flags |= B_NOCACHE | B_INVAL
                    self.brelse(b)
                start = b0 << self.shift
                length = min(b1 << self.shift, self.size) - start
                self.lock.release()
                try:
                    if zero:
                        self.backend.zero(start, length)
                    else:
                        self.backend.trim(start, length)
                finally:
                    self.lock.acquire()
            finally:
                self._discarding.remove(fence)
                self._wakeup()

    # ================================================================== invariants & stats

    def check_invariants(self) -> None:
        """Raise BufCacheInvariantError if any accounting or queue invariant fails.

        Call with no I/O in flight from other threads for exact results (tests do).
        """
        def fail(msg: str) -> None:
            raise BufCacheInvariantError(msg)

        bs = self.block_size
        t = self.throttle
        seen: set[int] = set()
        for qi, q in enumerate(self.queues):
            for idx, b in q.items():
                if b.qindex != qi or b.index != idx:
                    fail(f"{b!r} found on queue {QUEUE_NAMES[qi]}")
                if idx in seen:
                    fail(f"{b!r} on two queues")
                seen.add(idx)
                if b.busy or b.writing:
                    fail(f"{b!r} is queued while busy or writing")
        dirty = dirtyhw = dirtybytes = dirtybyteshw = 0
        running = 0
        held = 0
        for b in self.bufs:
            if b.qindex == QUEUE_NONE and not (b.busy or b.writing):
                fail(f"{b!r} is idle but on no queue")
            if b.dirty & ~b.valid:
                fail(f"{b!r} has dirty sectors that are not valid")
            if bool(b.flags & B_DELWRI) != bool(b.dirty):
                fail(f"{b!r}: B_DELWRI disagrees with its dirty mask")
            if b.flags & B_DELWRI and b.qindex in (QUEUE_CLEAN, QUEUE_EMPTY):
                fail(f"{b!r}: a dirty buffer on {QUEUE_NAMES[b.qindex]}")
            if b.qindex == QUEUE_DIRTY_HW and not b.flags & B_HEAVY:
                fail(f"{b!r}: on DIRTY_HW without B_HEAVY")
            if b.blkno >= 0:
                if self.hash.get(b.blkno) is not b:
                    fail(f"{b!r} is not the hashed buffer of block {b.blkno}")
                if bool(b.flags & B_CACHE) != (b.valid == self.fullmask(b.blkno)):
                    fail(f"{b!r}: B_CACHE disagrees with its valid mask")
                held += 1
            elif b.qindex != QUEUE_EMPTY and not b.busy:
                fail(f"{b!r}: no identity but not on EMPTY")
            if b.qindex == QUEUE_EMPTY and (b.blkno >= 0 or b.valid):
                fail(f"{b!r}: on EMPTY with contents")
            if b.flags & B_DELWRI:
                dirty += 1
                dirtybytes += b.dirty.bit_count() * SECTOR
                if b.flags & B_HEAVY:
                    dirtyhw += 1
                    dirtybyteshw += b.dirty.bit_count() * SECTOR
            if b.writing:
                running += 1
        if self.pager is not None:
            for blkno, b in self.hash.items():
                e = self.pager.lookup(blkno)
                if e is None or b.busy:
                    continue
                if e.valid & ~b.valid:
                    fail(f"{b!r} lacks sectors {e.valid & ~b.valid:#x} of its swap copy")
                if b.flags & B_DELWRI:
                    fail(f"{b!r} is dirty in RAM and still has a swap copy")
            self.pager.check_invariants()
        if len(self.hash) != held:
            fail(f"hash holds {len(self.hash)} buffers, {held} have an identity")
        if self.bufspace != bs * (self.nbuf - len(self.queues[QUEUE_EMPTY])):
            fail(f"bufspace {self.bufspace} != block_size * buffers off EMPTY")
        if (t.dirtybufcount, t.dirtybufcounthw) != (dirty, dirtyhw):
            fail(f"dirtybufcount(hw) {t.dirtybufcount}/{t.dirtybufcounthw} != {dirty}/{dirtyhw}")
        if t.dirtykvaspace != dirty * bs:
            fail(f"dirtykvaspace {t.dirtykvaspace} != {dirty} * block_size")
        if (t.dirtybufspace, t.dirtybufspacehw) != (dirtybytes, dirtybyteshw):
            fail(f"dirtybufspace(hw) {t.dirtybufspace}/{t.dirtybufspacehw} != "
                 f"{dirtybytes}/{dirtybyteshw}")
        if running == 0 and (t.runningbufspace or t.runningbufcount):
            fail(f"runningbufspace {t.runningbufspace} with nothing in flight")
        if t.runningbufspace < 0 or t.runningbufcount < 0:
            fail("negative running counters")

    def counters(self) -> dict[str, Any]:
        """Every statistic under its kernel name (and ours), read under the lock."""
        with self.lock:
            t = self.throttle
            st = self.stats.as_dict()
            out = {
                "nbuf": self.nbuf, "block_size": self.block_size,
                "bufspace": self.bufspace, "maxbufspace": self.maxbufspace,
                "hibufspace": self.hibufspace, "lobufspace": self.lobufspace,
                "getnewbufcalls": self.getnewbufcalls, "flushingbufs": int(self.flushing),
                "dirtybufspace": t.dirtybufspace, "dirtybufspacehw": t.dirtybufspacehw,
                "dirtykvaspace": t.dirtykvaspace, "dirtybufcount": t.dirtybufcount,
                "dirtybufcounthw": t.dirtybufcounthw, "runningbufspace": t.runningbufspace,
                "runningbufcount": t.runningbufcount, "hidirtybufspace": t.hidirtybufspace,
                "lodirtybufspace": t.lodirtybufspace, "hirunningspace": t.hirunningspace,
                "bd_wait_blocks": t.bd_wait_blocks,
                "bd_wait_seconds": round(t.bd_wait_seconds, 6),
                "bd_speedup_kicks": t.bd_speedup_kicks, "bd_wake_index": t.bd_wake_index,
                "waitrunningbufspace_blocks": t.waitrunningbufspace_blocks,
                "queue_clean": len(self.queues[QUEUE_CLEAN]),
                "queue_dirty": len(self.queues[QUEUE_DIRTY]),
                "queue_dirty_hw": len(self.queues[QUEUE_DIRTY_HW]),
                "queue_empty": len(self.queues[QUEUE_EMPTY]),
                "flushperqueue": self.flushperqueue, "max_io": self.max_io,
                "readahead": self.readahead,
            }
            if self.pager is None:
                st = {k: v for k, v in st.items() if not k.startswith("swap_")}
            else:
                from nbdcache.statistics import swap_statistics
                out.update(swap_statistics(self.pager.stats()))
                out["swap_hit_ratio"] = (round(st["swap_hits"] / st["misses"], 4)
                                         if st["misses"] else 0.0)
            out.update(st)
        lookups = out["hits"] + out["misses"]
        out["hit_ratio"] = round(out["hits"] / lookups, 4) if lookups else 0.0
        out["writeback_mean_cluster_bufs"] = (
            round(out["writeback_bufs"] / out["writeback_clusters"], 2)
            if out["writeback_clusters"] else 0.0)
        return out
