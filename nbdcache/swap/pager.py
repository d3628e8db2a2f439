"""The swap pager: spill space for blocks evicted from the buffer cache (``swap_pager.c``).

Theory of operation
-------------------
A ``SwapPager`` owns one or more swap devices, the ``Blist`` that allocates
their slots, and the ``SwapMeta`` that says which slot holds which block.  It
decides (allocation, clustering, credits, watermarks, error policy) and does
the device I/O, in phases, so that its caller, the buffer cache, can keep its
one engine lock for metadata and drop it for I/O::

    lock held      putpages_begin  --> runs (slots allocated, nothing mapped yet)
    caller         fills run.data from its buffers (RAM copy kept!)
    NO lock        pageout_io(run)      one pwrite of the whole run
    lock held      putpages_done(run) -> [(blkno, ok)]: now mapped, RAM may go

    lock held      getpages_begin(blkno, wanted) --> run (block + contiguous neighbours)
    NO lock        pagein_io(run)       one pread of the whole run
    lock held      getpages_done(run) -> [(entry, data | None, error | None)]

*Swap space.*  Devices are interleaved in stripes of ``dmmax`` slots into one
swap address space of *global* slots: global slot ``s`` lives on device
``(s // dmmax) % ndev`` at local slot ``(s // (dmmax*ndev))*dmmax + s % dmmax``
(``BLK2DEVIDX``, L137, and ``vm_swap.c``).  One ``Blist`` covers the whole
space; the stripes (or stripe tails) a smaller device lacks are ``fill``-ed
once at startup, so they are never allocated.  No single I/O crosses a stripe:
putpages clips its run (L1362-1366) and getpages never extends past one
(L1072-1091), so every I/O is one contiguous transfer on one device.

*Metadata.*  ``SwapMeta`` maps a block to ``(slot, dirty)``.  The tag says
whether the slot holds a *clean* copy (the backend has the same data: the
DragonFly swapcache) or the *only* current copy (*dirty*: the anonymous
swap-pager case).  Beside it a dict keeps, per mapped block, the sector masks
(``valid``, ``dirty_mask``) of the RAM buffer it was written from, a
generation number (a fresh one per mapping, so a stale answer can be told from
a current one) and the ``unreadable`` flag.  Metadata is RAM-only, exactly as
the kernel's: a new pager maps nothing, so data a previous process left in a
swap file is never served.

*Page-out* (``putpages``, L1246-1472).  Victims ``(blkno, valid, dirty)`` come
sorted.  Runs of consecutive block numbers are cut into chunks of at most
``min(32, nsw_cluster_max)``; each chunk gets one contiguous slot run from the
blist, halving the length while allocation fails and ``n > 4`` (L1344-1349).
If even that fails, those ``n`` victims are *failed* (the caller keeps them in
RAM) and the next chunk is tried.  A run crossing a stripe boundary gives its
tail back and is shortened; the cut-off victims start the next chunk.  Each run
needs an I/O credit: ``nsw_wcount_async`` (``swap_async_max``, resizable live)
or ``nsw_wcount_sync``; with none free the remaining victims are returned as
failed (deferred), since the caller's lock must not be held across a wait.
Nothing is mapped until ``putpages_done``: the block's previous slot, if any,
stays valid meanwhile, and ``meta_build`` replaces (and frees) it only once the
new copy is on the device.  On a write error the run's slots are
*quarantined*: kept allocated, never reused (what L1551-1557 intended and did
not do), and the blocks are reported not paged out.

*Cancel.*  A block modified or trimmed while its page-out is in flight must not
end up mapped to the snapshot: ``cancel(blkno)`` marks it in its run and
``putpages_done`` frees its new slot instead of mapping it.  ``unswapped`` and
``freespace``, which the caller calls on every modification and trim anyway,
cancel for it.

*Page-in* (``getpages``, L1033-1221; ``haspage``, L754-817).  A block with a
slot is read together with neighbours whose slots are exactly contiguous (at
most 7 each way, never across a stripe) and that the caller wants (not in RAM,
not busy); extension stops at the first neighbour not wanted.  A page-in frees
nothing: while RAM stays clean the swap copy stays valid (L1215-1220).  On a
read error a *clean* entry is dropped and its slot quarantined (the caller
reads the backend instead); a *dirty* entry stays mapped, flagged
``unreadable`` and counted in ``lost_dirty`` (the caller returns EIO; a later
read retries, and a rewrite or trim ends it).

*Slot lifetimes.*  Every allocated slot is exactly one of: mapped (in
``SwapMeta``), in flight in a page-out run, quarantined, pending free, or a
fill hole.  A slot freed while a page-in is reading it (``meta_build``
replacing it, ``unswapped``, ``freespace``) is *pending* until that read
completes (SEED-CATALOGUE C5.5): it is never handed out again with I/O on it.

*Watermarks* (``swp_sizecheck``, L233-248).  ``almost_full`` is set when free
slots drop below ``nswap_lowat`` and cleared only when they exceed
``nswap_hiwat``; ``full`` is set only when a page-out chunk could not be
allocated at all, and cleared as soon as free slots are back at ``lowat``.
Both also set ``almost_full`` on that failure, as ``getswapspace`` does.  A
structlog event marks each transition.  ``may_spill_dirty`` first gives up
clean copies (oldest first) to climb back above ``hiwat``: the swapcache
yields to dirty spill (SEED-CATALOGUE C2).

Invariants (``check_invariants`` raises ``SwapPagerInvariantError``)
---------------------------------------------------------------------
1. ``free + mapped + in-flight page-out + quarantined + pending + holes ==
   total``; each of those slots is allocated in the blist and belongs to only
   one of those sets; per-device used counts match the blist.
2. Mapped blocks and mask records coincide; ``dirty`` tag <=> ``dirty_mask``;
   ``dirty_mask`` within ``valid``; ``valid`` not empty; only dirty entries are
   unreadable, and suspect slots are those of unreadable entries or pending.
3. Slots under a read are mapped, pending or quarantined; every pending slot
   is under a read.
4. ``0 <= free credits <= max`` for reads, sync and async writes, and the
   credits in use equal the runs in flight of that kind.
5. ``free < nswap_lowat`` implies ``almost_full``.

Locking
-------
The pager has no lock of its own.  **Every method except ``pageout_io`` and
``pagein_io`` is called WITH the caller's engine lock held and never blocks**
(no I/O, no waiting; allocation failure and missing credits are answered, not
waited out).  **``pageout_io`` and ``pagein_io`` are called WITHOUT it**: they
do one blocking device transfer and touch nothing but their run, so any number
may run at once.  Between ``*_begin`` and ``*_done`` a run belongs to the
caller.

How the buffer cache drives it
------------------------------
RAM *clean* means "equal to the newest copy, in the backend or in swap"; a
dirty swap entry is dirty data that merely lives in swap.

* Evict clean / spill dirty: if ``lookup`` shows an entry covering the
  buffer's valid sectors, just drop RAM.  Otherwise, if ``may_spill_clean()``
  / ``may_spill_dirty()``: ``putpages_begin`` (RAM dirty sectors as
  ``dirty_mask``), fill the runs, ``pageout_io``, ``putpages_done``; drop the
  buffers reported ok, keep the rest (and the ``failed`` ones) as they were.
* Miss: ``getpages_begin(blkno, wanted)``; None means read the backend.  Then
  ``pagein_io``, ``getpages_done``: merge data into invalid sectors within
  ``entry.valid``, leaving RAM clean; errors as ``getpages_done`` says.
* Modify (write): the buffer must hold every dirty swap sector the write does
  not overwrite (page in first); then ``e = unswapped(blkno, ram_valid)``,
  and if ``e.dirty`` mark ``e.dirty_mask`` dirty in RAM, then write.
* TRIM / WRITE_ZEROES: ``freespace(first, count)``.
* Drain (``buf_daemon_hw``, FLUSH): ``dirty_blocks``; page each in (or take
  its clean RAM copy), then either ``unswapped`` it into a dirty RAM buffer
  that write-back handles (what ``BufCache`` does: the slot is freed), or write
  it to the backend yourself and ``set_clean(blkno, e.gen)`` (the slot stays as
  a clean copy).  Entries still ``unreadable`` fail the FLUSH.

Differences from ``swap_pager.c`` are listed in ``SwapPager``'s docstring.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbdcache.swap.blist import BLIST_MAX_ALLOC, SWAPBLK_NONE, Blist
from nbdcache.swap.swblock import HASPAGE_MAXRUN, SWB_NPAGES, SWM_FREE, SWM_POP, SwapMeta

# Tunables and constants, each with its kernel ancestor.
NSWBUF = 256                            # typical nswbuf [ext]; the credits below derive from it
NSW_RCOUNT = (NSWBUF + 1) // 2          # 128 page-in runs in flight (L317)
NSW_WCOUNT_SYNC = (NSWBUF + 3) // 4     # 64 synchronous page-out runs in flight (L318)
SWAP_ASYNC_MAX = 4                      # vm.swap_async_max: async page-out runs (L126, live)
SWAP_ASYNC_MAX_LIMIT = 64               # clamp of swap_async_max (kernel: nswbuf/2, L1293)
MAX_PAGEOUT_CLUSTER = SWB_NPAGES        # 16: nsw_cluster_max default (L314)
DMMAX = SWB_NPAGES * 2                  # 32-slot stripe (L275, read-only)
PAGEOUT_MIN_RUN = 4                     # putpages halves its run while n > 4 (L1344-1349)


def swap_watermarks(nslots: int, cluster: int = MAX_PAGEOUT_CLUSTER) -> tuple[int, int]:
    """Default ``(nswap_lowat, nswap_hiwat)`` for ``nslots`` usable slots.

    The kernel's 128/512 pages (L194-195) are 0.5/2 MiB: fixed, tiny for
    today's swap.  Here, as SEED-CATALOGUE C2 suggests, lowat is 1 % of swap
    but at least two full clusters (room for the page-outs already allocated
    when dirty spill stops), and hiwat keeps the kernel's 1:4 ratio (4 %).
    For example 1 GiB of 64 KiB slots (16384): almost full below 163 free
    slots (10 MiB), cleared above 652 (41 MiB).  A small device keeps the 1:4
    ratio inside half the device, so that ``almost_full`` can always clear.
    """
    lowat = max(2 * cluster, nslots // 100)     # 1 % of swap, at least two clusters
    hiwat = 4 * lowat                           # the kernel's 128:512
    if hiwat > nslots // 2:                     # small device
        hiwat = max(1, nslots // 2)
        lowat = min(hiwat - 1, hiwat // 4)
    return lowat, hiwat


class SwapPagerError(Exception):
    """The caller broke a rule of the pager's interface (its fault, not the device's)."""


class SwapNoCredit(SwapPagerError):
    """``getpages_begin`` was called with every read credit in use; wait for a completion."""


class SwapPagerInvariantError(AssertionError):
    """The pager's state contradicts one of its invariants (the KASSERT habit)."""


@dataclass(frozen=True)
class SwapEntry:
    """What swap holds for one block.

    ``valid``/``dirty_mask`` are the sector masks of the RAM buffer the slot
    was written from: only ``valid`` sectors of the slot mean anything, and
    ``dirty_mask`` sectors are not on the backend (``dirty`` is
    ``dirty_mask != 0``: the slot is the only current copy).  ``gen`` is unique
    per mapping.  ``unreadable``: a dirty entry whose last read failed.
    """

    blkno: int
    slot: int
    valid: int
    dirty_mask: int
    dirty: bool
    gen: int
    unreadable: bool = False


@dataclass(eq=False)
class PageoutRun:
    """One page-out: contiguous victims to contiguous slots on one device.

    The caller fills ``data`` (``block(i)`` is the view for ``blknos[i]``)
    from its buffers before ``pageout_io``, and keeps those buffers until
    ``putpages_done`` says a block is on swap.
    """

    dev: int                        # device index
    local_slot: int                 # first slot on that device
    slot: int                       # first global slot
    blknos: tuple[int, ...]
    valid: tuple[int, ...]
    dirty_masks: tuple[int, ...]
    sync: bool
    data: bytearray
    block_size: int
    error: OSError | None = None
    cancelled: set[int] = field(default_factory=set)
    done: bool = False

    def block(self, i: int) -> memoryview:
        """Writable view of the bytes of ``blknos[i]`` inside ``data``."""
        bs = self.block_size
        return memoryview(self.data)[i * bs:(i + 1) * bs]


@dataclass(eq=False)
class PageinRun:
    """One page-in: the requested block ``blkno`` and contiguous neighbours, one read."""

    blkno: int                      # the requested block
    dev: int
    local_slot: int
    slot: int                       # first global slot
    blknos: tuple[int, ...]
    entries: tuple[SwapEntry, ...]  # as mapped when the read was issued
    slots: tuple[int, ...]
    data: bytearray
    block_size: int
    error: OSError | None = None
    done: bool = False

    def block(self, i: int) -> memoryview:
        """Read-only view of the bytes of ``blknos[i]`` inside ``data``."""
        bs = self.block_size
        return memoryview(self.data)[i * bs:(i + 1) * bs].toreadonly()


class _Rec:
    """Per mapped block, beside ``SwapMeta``: masks, generation, readability."""

    __slots__ = ("valid", "dirty_mask", "gen", "unreadable")

    def __init__(self, valid: int, dirty_mask: int, gen: int) -> None:
        self.valid = valid
        self.dirty_mask = dirty_mask
        self.gen = gen
        self.unreadable = False


_COUNTERS = (
    "pageout_calls", "swapout", "swappgsout", "pageout_failed", "pageout_deferred",
    "pageout_cancelled", "write_errors", "pagein_calls", "swapin", "swappgsin",
    "pagein_stale", "read_errors", "lost_dirty", "unswapped", "freed_by_trim",
    "trimmed_dirty", "reclaimed_clean", "set_clean", "almost_full_transitions",
    "full_transitions", "deferred_frees",
)


class SwapPager:
    """Swap policy and device I/O; see the module docstring for the locking rule.

    Differences from ``swap_pager.c``:

    * Page-outs map their blocks at completion, not at issue: the old slot
      stays valid meanwhile, and a write error leaves no stale mapping.
    * Failed writes and failed reads quarantine their slots (the kernel's
      comment promises it, the code reuses them).
    * Credits are never waited for (the caller holds its lock): a page-out
      without a credit returns its victims as failed; a page-in raises
      ``SwapNoCredit``.  The sync/async choice is the caller's (kernel: sync
      unless the pageout daemon, L1275).
    * ``full`` is set only when a chunk fails after halving, not by each
      halving step, so a fragmented but roomy swap does not flap it.
    * The stripe clip tests the run's last slot (the kernel's ``blk + n``
      "clips" zero slots when a run ends on a boundary).
    * A clean entry's read error frees (quarantines) the slot; a dirty one
      stays, flagged ``unreadable``.
    * ``may_spill_dirty`` reclaims clean swap copies when almost full.
    """

    def __init__(self, devices: Sequence[Any], block_size: int, *, dmmax: int = DMMAX,
                 nsw_cluster_max: int = MAX_PAGEOUT_CLUSTER,
                 swap_async_max: int = SWAP_ASYNC_MAX, nswap_lowat: int | None = None,
                 nswap_hiwat: int | None = None, nsw_rcount: int = NSW_RCOUNT,
                 nsw_wcount_sync: int = NSW_WCOUNT_SYNC, log: Any = None) -> None:
        """Build the swap space over ``devices`` (objects with ``nslots``, ``block_size``,
        ``pread``, ``pwrite``, ``close``).  Raises ValueError naming the bad setting."""
        if not devices:
            raise ValueError("swap needs at least one device")
        for d in devices:
            if d.block_size != block_size:
                raise ValueError(f"swap device {getattr(d, 'path', d)!r} has block size "
                                 f"{d.block_size}, the pager {block_size}")
            if d.nslots < 1:
                raise ValueError(f"swap device {getattr(d, 'path', d)!r} has no slots")
        _check_int("swap dmmax", dmmax, 1, 1 << 20)
        _check_int("nsw_cluster_max", nsw_cluster_max, 1, BLIST_MAX_ALLOC)
        _check_int("swap_async_max", swap_async_max, 1, SWAP_ASYNC_MAX_LIMIT)
        _check_int("nsw_rcount", nsw_rcount, 1, 1 << 16)
        _check_int("nsw_wcount_sync", nsw_wcount_sync, 1, 1 << 16)
        self.devices = list(devices)
        self.ndev = len(self.devices)
        self.block_size = block_size
        self.dmmax = dmmax
        self.nsw_cluster_max = nsw_cluster_max
        self.log = log
        self.closed = False

        # the interleaved space: every device padded to the longest one's stripes
        stripes = max(-(-d.nslots // dmmax) for d in self.devices)
        self.blist = Blist(stripes * dmmax * self.ndev)
        self.nslots = sum(d.nslots for d in self.devices)   # usable slots
        self._holes: list[tuple[int, int]] = []
        for i, d in enumerate(self.devices):      # only the stripes past a device's end
            for k in range(d.nslots // dmmax, stripes):
                have = max(d.nslots - k * dmmax, 0)
                start = (k * self.ndev + i) * dmmax + have
                self.blist.fill(start, dmmax - have)
                self._holes.append((start, dmmax - have))
        self.nholes = sum(n for _, n in self._holes)
        self._dev_used = [0] * self.ndev

        self.meta = SwapMeta(self._swp_pager_freeswapspace)
        self._recs: dict[int, _Rec] = {}
        self._clean: dict[int, None] = {}       # clean entries, oldest mapping first
        self._dirty: set[int] = set()           # dirty entries
        self._gen = 0
        self._bad: set[int] = set()             # quarantined slots
        self._suspect: set[int] = set()         # slots whose read failed, still referenced
        self._pending: set[int] = set()         # freed while a read is in flight on them
        self._reading: dict[int, int] = {}      # slot -> page-in runs reading it
        self._out: dict[int, PageoutRun] = {}   # blkno -> its in-flight, uncancelled page-out
        self._out_runs: set[PageoutRun] = set()
        self._in_runs: set[PageinRun] = set()

        # credits (getpbuf counters): free and maximum
        self._swap_async_max = swap_async_max           # requested (the sysctl)
        self._async_max = swap_async_max                # nsw_wcount_async_max
        self._async_free = swap_async_max               # nsw_wcount_async
        self._sync_max = self._sync_free = nsw_wcount_sync
        self._rmax = self._rfree = nsw_rcount

        self.st = dict.fromkeys(_COUNTERS, 0)
        self._almost_full = False
        self._full = False
        self._write_failing = False             # latches: one event per failure episode
        self._read_failing = False
        lo, hi = swap_watermarks(self.nslots, nsw_cluster_max)
        for name, v in (("nswap_lowat", nswap_lowat), ("nswap_hiwat", nswap_hiwat)):
            if v is not None:
                _check_int(name, v, 0, 1 << 62)
        if nswap_lowat is None and nswap_hiwat is not None:
            lo = nswap_hiwat // 4                       # keep the 1:4 ratio
        elif nswap_lowat is not None and nswap_hiwat is None:
            hi = max(nswap_lowat + 1, min(4 * nswap_lowat, self.nslots - 1))
        self.set_watermarks(nswap_lowat if nswap_lowat is not None else lo,
                            nswap_hiwat if nswap_hiwat is not None else hi)

    # ================================================================ geometry and settings

    def device_of(self, slot: int) -> tuple[int, int]:
        """``(device index, local slot)`` of global ``slot`` (``BLK2DEVIDX``).  O(1)."""
        stripe, off = divmod(slot, self.dmmax)
        return stripe % self.ndev, (stripe // self.ndev) * self.dmmax + off

    def set_watermarks(self, nswap_lowat: int, nswap_hiwat: int) -> None:
        """Set the almost-full hysteresis (startup or live), validated together.

        Raises ValueError unless ``0 <= nswap_lowat < nswap_hiwat < nslots``
        (a hiwat at or past the device could never be exceeded, so
        ``almost_full`` would never clear).  Lock held; never blocks.
        """
        _check_int("nswap_lowat", nswap_lowat, 0, 1 << 62)
        _check_int("nswap_hiwat", nswap_hiwat, 0, 1 << 62)
        if nswap_lowat >= nswap_hiwat:
            raise ValueError(f"nswap_lowat ({nswap_lowat}) must be less than nswap_hiwat "
                             f"({nswap_hiwat})")
        if nswap_hiwat >= self.nslots:
            raise ValueError(f"nswap_hiwat ({nswap_hiwat}) must be less than the "
                             f"{self.nslots} swap slots")
        self.nswap_lowat = nswap_lowat
        self.nswap_hiwat = nswap_hiwat
        self._swp_sizecheck()

    def set_swap_async_max(self, n: int) -> int:
        """Change ``swap_async_max`` live; return the clamped value (L1285-1313).

        Clamped to [1, 64].  The async credit pool grows or shrinks by the
        difference only if its free count stays >= 0; otherwise the resize is
        deferred and retried by every later ``putpages_begin``/``putpages_done``.
        Lock held; never blocks.
        """
        n = max(1, min(SWAP_ASYNC_MAX_LIMIT, int(n)))
        self._swap_async_max = n
        self._retry_async_resize()
        return n

    def _retry_async_resize(self) -> None:
        delta = self._swap_async_max - self._async_max
        if delta and self._async_free + delta >= 0:
            self._async_free += delta
            self._async_max += delta

    @property
    def swap_async_max(self) -> int:
        """The requested async page-out limit (the sysctl, clamped)."""
        return self._swap_async_max

    @property
    def nsw_wcount_async_max(self) -> int:
        """The async page-out limit in effect (lags ``swap_async_max`` while deferred)."""
        return self._async_max

    @property
    def nswap_free(self) -> int:
        """Free slots (the kernel's ``vm_swap_size``)."""
        return self.blist.avail

    @property
    def almost_full(self) -> bool:
        return self._almost_full

    @property
    def full(self) -> bool:
        return self._full

    @property
    def read_credits(self) -> int:
        """Free read credits (``nsw_rcount``); ``getpages_begin`` needs one."""
        return self._rfree

    # ================================================================ space accounting

    def _dev_account(self, slot: int, count: int, sign: int) -> None:
        dmmax = self.dmmax
        while count:
            k = min(count, dmmax - slot % dmmax)
            self._dev_used[(slot // dmmax) % self.ndev] += sign * k
            slot += k
            count -= k

    def _swp_pager_getswapspace(self, n: int) -> int:
        """Allocate ``n`` contiguous slots or return SWAPBLK_NONE (L494-515).  Never blocks."""
        blk = self.blist.alloc(n)
        if blk != SWAPBLK_NONE:
            self._dev_account(blk, n, +1)
            self._swp_sizecheck()
        return blk

    def _blist_free(self, slot: int, n: int) -> None:
        """Give slots back to the blist (``swp_pager_freeswapspace``, L532-544)."""
        self.blist.free(slot, n)
        self._dev_account(slot, n, -1)
        self._swp_sizecheck()

    def _swp_pager_freeswapspace(self, slot: int, n: int) -> None:
        """Free mapped slots dropped by ``SwapMeta``: quarantine suspect ones, defer
        those under a read (SEED-CATALOGUE C5.5), free the rest."""
        for s in range(slot, slot + n):
            if self._reading.get(s):
                self._pending.add(s)
                self.st["deferred_frees"] += 1
            elif s in self._suspect:
                self._suspect.discard(s)
                self._quarantine(s)
            else:
                self._blist_free(s, 1)

    def _quarantine(self, slot: int) -> None:
        """Keep ``slot`` allocated forever: its device sector failed."""
        self._bad.add(slot)

    def _swp_sizecheck(self) -> None:
        """The almost-full hysteresis (L233-248).  Never blocks."""
        free = self.blist.avail
        if free < self.nswap_lowat:
            self._set_almost_full(True, free)
        else:
            self._set_full(False, free)
            if free > self.nswap_hiwat:
                self._set_almost_full(False, free)

    def _swp_full(self) -> None:
        """A page-out chunk found no space at all (``getswapspace`` failure, L503-506)."""
        free = self.blist.avail
        self._set_full(True, free)
        self._set_almost_full(True, free)

    def _set_almost_full(self, on: bool, free: int) -> None:
        if on == self._almost_full:
            return
        self._almost_full = on
        if on:
            self.st["almost_full_transitions"] += 1
            self._event("warning", "swap.almost_full", free=free, lowat=self.nswap_lowat)
        else:
            self._event("info", "swap.almost_full_cleared", free=free, hiwat=self.nswap_hiwat)

    def _set_full(self, on: bool, free: int) -> None:
        if on == self._full:
            return
        self._full = on
        if on:
            self.st["full_transitions"] += 1
            self._event("warning", "swap.full", free=free)
        else:
            self._event("info", "swap.full_cleared", free=free, lowat=self.nswap_lowat)

    def _io_outcome(self, op: str, dev: int, slot: int, err: OSError | None) -> None:
        """Log ``swap.<op>_error`` when I/O starts failing and ``swap.<op>_recovered``
        at the next success: events on state changes, not per failed run."""
        attr = f"_{op}_failing"
        failing = getattr(self, attr)
        if err is not None and not failing:
            self._event("warning", f"swap.{op}_error", device=dev, slot=slot, error=str(err))
        elif err is None and failing:
            self._event("info", f"swap.{op}_recovered", device=dev)
        setattr(self, attr, err is not None)

    def _event(self, level: str, event: str, **kw: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **kw)

    # ================================================================ metadata

    def lookup(self, blkno: int) -> SwapEntry | None:
        """The entry of ``blkno``, or None if swap holds nothing for it.  O(1), lock held."""
        rec = self._recs.get(blkno)
        if rec is None:
            return None
        slot, dirty = self.meta.meta_lookup(blkno)     # type: ignore[misc]
        return SwapEntry(blkno, slot, rec.valid, rec.dirty_mask, dirty, rec.gen,
                         rec.unreadable)

    def has(self, blkno: int) -> bool:
        """Whether ``blkno`` has a swap copy or a page-out in flight (the cache must call
        ``unswapped`` before modifying it).  O(1), lock held."""
        return blkno in self._recs or blkno in self._out

    def is_dirty(self, blkno: int) -> bool:
        """Whether swap holds the only current copy of (some sectors of) ``blkno``.  O(1)."""
        return blkno in self._dirty

    @property
    def ndirty(self) -> int:
        """Blocks whose swap copy is dirty (readable or not)."""
        return len(self._dirty)

    def _map(self, blkno: int, slot: int, valid: int, dirty_mask: int) -> None:
        """Map ``blkno`` to ``slot``, freeing its previous slot (``meta_build``)."""
        self._unrecord(blkno)
        self.meta.meta_build(blkno, slot, dirty=bool(dirty_mask))
        self._gen += 1
        self._recs[blkno] = _Rec(valid, dirty_mask, self._gen)
        if dirty_mask:
            self._dirty.add(blkno)
        else:
            self._clean[blkno] = None

    def _unrecord(self, blkno: int) -> _Rec | None:
        """Forget the side record of ``blkno`` (the caller drops the SwapMeta entry)."""
        rec = self._recs.pop(blkno, None)
        if rec is not None:
            self._clean.pop(blkno, None)
            self._dirty.discard(blkno)
        return rec

    def _unmap(self, blkno: int, flags: int = SWM_FREE) -> None:
        """Drop the mapping of ``blkno``; free its slot (SWM_FREE) or hand it back (SWM_POP)."""
        self._unrecord(blkno)
        self.meta.meta_ctl(blkno, flags)

    # ================================================================ page-out

    def putpages_begin(self, victims: Sequence[tuple[int, int, int]],
                       sync: bool) -> tuple[list[PageoutRun], list[int]]:
        """Allocate swap for ``victims`` ``(blkno, valid, dirty_mask)``; return (runs, failed).

        Lock held; never blocks.  Victims must be sorted by strictly
        increasing block number, have ``valid != 0`` and ``dirty_mask``
        within ``valid``, and not be in an uncancelled page-out already
        (SwapPagerError otherwise, before anything changes).  Each run needs a
        credit (async or sync by ``sync``); victims that got no space or no
        credit are in ``failed`` and stay the caller's, in RAM.  For each run:
        fill ``run.data``, call ``pageout_io`` without the lock, then
        ``putpages_done`` with it; keep the RAM copy until then.
        """
        self._check_victims(victims)
        self._retry_async_resize()
        st = self.st
        st["pageout_calls"] += 1
        cluster = min(BLIST_MAX_ALLOC, self.nsw_cluster_max)
        dmmax = self.dmmax
        runs: list[PageoutRun] = []
        failed: list[int] = []
        nv = len(victims)
        i = 0
        while i < nv:
            j = i + 1                                   # [i, j): logically adjacent victims
            while j < nv and victims[j][0] == victims[j - 1][0] + 1:
                j += 1
            while i < j:
                if not (self._sync_free if sync else self._async_free):
                    failed.extend(v[0] for v in victims[i:])
                    st["pageout_deferred"] += nv - i
                    return runs, failed
                n = min(cluster, j - i)
                blk = self._swp_pager_getswapspace(n)
                while blk == SWAPBLK_NONE and n > PAGEOUT_MIN_RUN:
                    n >>= 1
                    blk = self._swp_pager_getswapspace(n)
                if blk == SWAPBLK_NONE:
                    failed.extend(v[0] for v in victims[i:i + n])
                    st["pageout_failed"] += n
                    self._swp_full()
                    i += n
                    continue
                keep = dmmax - blk % dmmax              # stripe clip (L1362-1366)
                if keep < n:
                    self._blist_free(blk + keep, n - keep)
                    n = keep
                runs.append(self._new_pageout(blk, victims[i:i + n], sync))
                i += n
        return runs, failed

    def _check_victims(self, victims: Sequence[tuple[int, int, int]]) -> None:
        prev = -1
        for blkno, valid, dirty in victims:
            if not isinstance(blkno, int) or blkno <= prev:
                raise SwapPagerError(f"putpages: victims must be sorted by increasing "
                                     f"block number ({blkno!r} after {prev})")
            if not valid or dirty & ~valid or valid < 0 or dirty < 0:
                raise SwapPagerError(f"putpages: block {blkno}: bad masks valid={valid:#x} "
                                     f"dirty={dirty:#x}")
            if blkno in self._out:
                raise SwapPagerError(f"putpages: block {blkno} is already being paged out")
            prev = blkno

    def _new_pageout(self, blk: int, chunk: Sequence[tuple[int, int, int]],
                     sync: bool) -> PageoutRun:
        if sync:
            self._sync_free -= 1
        else:
            self._async_free -= 1
        dev, local = self.device_of(blk)
        n = len(chunk)
        run = PageoutRun(dev, local, blk, tuple(v[0] for v in chunk),
                         tuple(v[1] for v in chunk), tuple(v[2] for v in chunk), sync,
                         bytearray(n * self.block_size), self.block_size)
        for b in run.blknos:
            self._out[b] = run
        self._out_runs.add(run)
        self.st["swapout"] += 1
        self.st["swappgsout"] += n
        return run

    def pageout_io(self, run: PageoutRun) -> None:
        """Write ``run.data`` to its slots in one transfer; record any OSError in ``run.error``.

        Called WITHOUT the engine lock; blocks for the I/O; touches only ``run``.
        """
        try:
            self.devices[run.dev].pwrite(run.data, run.local_slot)
        except OSError as e:
            run.error = e

    def cancel(self, blkno: int) -> bool:
        """Stop an in-flight page-out of ``blkno`` from mapping its snapshot.

        Call (lock held, never blocks) when the caller modifies or trims a
        block between ``putpages_begin`` and ``putpages_done``; ``unswapped``
        and ``freespace`` do it themselves.  ``putpages_done`` then frees the
        block's new slot and reports it not paged out.  Returns whether a
        page-out was cancelled.
        """
        run = self._out.pop(blkno, None)
        if run is None:
            return False
        run.cancelled.add(blkno)
        return True

    def putpages_done(self, run: PageoutRun) -> list[tuple[int, bool]]:
        """Complete a page-out (``swp_pager_async_iodone`` for writes); lock held, never blocks.

        Returns ``(blkno, ok)`` per block.  ``ok``: the block is mapped to its
        new slot (its previous slot freed) with the run's masks, and the caller
        may drop the RAM copy.  Not ok (write error, or cancelled): the caller
        keeps the block in RAM, dirty as it was.  A failed run's slots are
        quarantined.  Releases the run's credit.
        """
        if run.done or run not in self._out_runs:
            raise SwapPagerError("putpages_done: run already completed or not ours")
        run.done = True
        self._out_runs.discard(run)
        if run.sync:
            self._sync_free += 1
        else:
            self._async_free += 1
        for b in run.blknos:
            if self._out.get(b) is run:
                del self._out[b]
        out: list[tuple[int, bool]] = []
        self._io_outcome("write", run.dev, run.local_slot, run.error)
        if run.error is not None:
            self.st["write_errors"] += 1
            for k, b in enumerate(run.blknos):
                self._quarantine(run.slot + k)
                out.append((b, False))
        else:
            for k, b in enumerate(run.blknos):
                slot = run.slot + k
                if b in run.cancelled:
                    self._blist_free(slot, 1)
                    self.st["pageout_cancelled"] += 1
                    out.append((b, False))
                else:
                    self._map(b, slot, run.valid[k], run.dirty_masks[k])
                    out.append((b, True))
        self._retry_async_resize()
        return out

    # ================================================================ page-in

    def haspage(self, blkno: int) -> tuple[int, int] | None:
        """``(before, after)`` contiguous swap neighbours of ``blkno``, or None if it has no slot.

        ``swap_pager_haspage`` (L754-817) with getpages' stripe bound: at most
        7 each way, slots exactly ``slot -/+ i``, inside one stripe.  Lock
        held; never blocks.
        """
        hp = self.meta.haspage(blkno, HASPAGE_MAXRUN, self.dmmax)
        return None if hp is None else (hp[1], hp[2])

    def getpages_begin(self, blkno: int,
                       wanted: Callable[[int], bool]) -> PageinRun | None:
        """Start reading ``blkno`` from swap with its contiguous neighbours; None if unmapped.

        Lock held; never blocks.  Neighbours (from ``haspage``) are included
        while ``wanted(nblk)`` is True and they are readable: the caller says
        False for blocks cached in RAM or busy, and must treat those it said
        True for as its own (busy) until ``getpages_done``.  Raises
        ``SwapNoCredit`` if all ``nsw_rcount`` read credits are in use.
        Frees nothing.  Then ``pagein_io`` without the lock, ``getpages_done``
        with it.
        """
        hp = self.meta.haspage(blkno, HASPAGE_MAXRUN, self.dmmax)
        if hp is None:
            return None
        if self._rfree <= 0:
            raise SwapNoCredit(f"getpages: all {self._rmax} read credits in use")
        slot0, before, after = hp
        recs = self._recs
        lo = hi = blkno
        for i in range(1, before + 1):
            if recs[blkno - i].unreadable or not wanted(blkno - i):
                break
            lo = blkno - i
        for i in range(1, after + 1):
            if recs[blkno + i].unreadable or not wanted(blkno + i):
                break
            hi = blkno + i
        first = slot0 - (blkno - lo)
        blknos = tuple(range(lo, hi + 1))
        entries = tuple(self.lookup(b) for b in blknos)     # type: ignore[misc]
        slots = tuple(range(first, first + len(blknos)))
        for s in slots:
            self._reading[s] = self._reading.get(s, 0) + 1
        self._rfree -= 1
        dev, local = self.device_of(first)
        run = PageinRun(blkno, dev, local, first, blknos, entries, slots,
                        bytearray(len(blknos) * self.block_size), self.block_size)
        self._in_runs.add(run)
        st = self.st
        st["pagein_calls"] += 1
        st["swapin"] += 1
        st["swappgsin"] += len(blknos)
        return run

    def pagein_io(self, run: PageinRun) -> None:
        """Read the run's slots into ``run.data`` in one transfer; record any OSError.

        Called WITHOUT the engine lock; blocks for the I/O; touches only ``run``.
        """
        try:
            self.devices[run.dev].pread(memoryview(run.data), run.local_slot)
        except OSError as e:
            run.error = e

    def getpages_done(self, run: PageinRun) -> list[tuple[SwapEntry, memoryview | None,
                                                          OSError | None]]:
        """Complete a page-in; lock held, never blocks.  One result per block of the run:

        * ``(entry, data, None)``: install ``data`` into the buffer's invalid
          sectors that are in ``entry.valid`` (never over valid or dirty RAM
          sectors); the entry stays mapped.  If ``entry.dirty``, the RAM copy
          carries data the backend lacks: see ``unswapped``.
        * ``(entry, None, error)``, ``entry.dirty`` False: the slot was dropped
          and quarantined; read the block from the backend.
        * ``(entry, None, error)``, ``entry.dirty`` True: the only copy is
          unreadable; fail the read with EIO.  The entry stays, flagged
          ``unreadable`` (``lost_dirty`` counts it once).
        * ``(entry, None, None)``: the mapping changed while the read was in
          flight (rewritten, trimmed, reclaimed or replaced); ignore the data
          and look again.

        Releases the read credit and the frees deferred on the run's slots.
        """
        if run.done or run not in self._in_runs:
            raise SwapPagerError("getpages_done: run already completed or not ours")
        run.done = True
        self._in_runs.discard(run)
        self._rfree += 1
        for s in run.slots:
            left = self._reading[s] - 1
            if left:
                self._reading[s] = left
            else:
                del self._reading[s]
        err = run.error
        st = self.st
        self._io_outcome("read", run.dev, run.local_slot, err)
        if err is not None:
            st["read_errors"] += 1
        out: list[tuple[SwapEntry, memoryview | None, OSError | None]] = []
        for k, (b, old) in enumerate(zip(run.blknos, run.entries)):
            rec = self._recs.get(b)
            if rec is None or rec.gen != old.gen:
                st["pagein_stale"] += 1
                out.append((old, None, None))
                continue
            slot = run.slots[k]
            if err is None:
                if rec.unreadable:
                    rec.unreadable = False
                    self._suspect.discard(slot)
                out.append((self.lookup(b), run.block(k), None))    # type: ignore[arg-type]
            elif not rec.dirty_mask:
                entry = self.lookup(b)
                self._unmap(b, SWM_POP)
                self._quarantine(slot)
                out.append((entry, None, err))                      # type: ignore[arg-type]
            else:
                if not rec.unreadable:
                    rec.unreadable = True
                    self._suspect.add(slot)
                    st["lost_dirty"] += 1
                out.append((self.lookup(b), None, err))             # type: ignore[arg-type]
        for s in run.slots:
            if s in self._pending and s not in self._reading:
                self._pending.discard(s)
                if err is not None or s in self._suspect:
                    self._suspect.discard(s)
                    self._quarantine(s)
                else:
                    self._blist_free(s, 1)
        return out

    # ================================================================ other operations

    def unswapped(self, blkno: int, ram_valid: int | None = None) -> SwapEntry | None:
        """Free the slot of a block the caller is modifying; return the entry it had.

        ``swap_pager_unswapped`` (L829-843).  The caller must call it on every
        modification of a block that may have a swap copy, and, when the
        returned entry is dirty, mark its RAM copy dirty (``entry.dirty_mask``)
        before releasing the lock: the RAM copy now carries the only current
        data.  Cancels an in-flight page-out of the block.  With
        ``ram_valid`` (the sectors RAM holds, including those the write
        overwrites entirely), refuses with SwapPagerError, changing nothing,
        when that would discard dirty sectors RAM does not hold: page the
        block in first.  Lock held; never blocks.
        """
        rec = self._recs.get(blkno)
        if rec is not None and ram_valid is not None and rec.dirty_mask & ~ram_valid:
            raise SwapPagerError(f"unswapped: block {blkno} has dirty sectors "
                                 f"{rec.dirty_mask & ~ram_valid:#x} only in swap; "
                                 "page it in first")
        self.cancel(blkno)
        if rec is None:
            return None
        entry = self.lookup(blkno)
        self._unmap(blkno)
        self.st["unswapped"] += 1
        return entry

    def freespace(self, blkno: int, count: int) -> int:
        """Drop every swap copy of blocks ``[blkno, blkno+count)``: TRIM / WRITE_ZEROES.

        ``swap_pager_freespace`` / ``meta_free``: dirty and unreadable entries
        too (the only operations allowed to discard dirty data), and in-flight
        page-outs in the range are cancelled.  Returns how many entries were
        dropped.  Lock held; never blocks.  O(min(count, entries)).
        """
        if count <= 0:
            return 0
        end = blkno + count
        for b in [b for b in self._out if blkno <= b < end]:
            self.cancel(b)
        if count <= len(self._recs):
            doomed = [b for b in range(blkno, end) if b in self._recs]
        else:
            doomed = [b for b in self._recs if blkno <= b < end]
        for b in doomed:
            if self._unrecord(b).dirty_mask:        # type: ignore[union-attr]
                self.st["trimmed_dirty"] += 1
        if doomed:
            self.meta.meta_free(blkno, count)
        self.st["freed_by_trim"] += len(doomed)
        return len(doomed)

    def set_clean(self, blkno: int, gen: int | None = None) -> bool:
        """Mark the swap copy of ``blkno`` clean: the caller wrote its data to the backend.

        Pass the ``gen`` of the entry whose data was written: if the block was
        remapped since (rewritten and paged out again), nothing changes and
        False is returned, so newer dirty data is never marked clean.  An
        unreadable entry is dropped instead (a clean copy that cannot be read
        is worthless).  Returns whether the entry (still) exists clean or was
        dropped that way.  Lock held; never blocks.
        """
        rec = self._recs.get(blkno)
        if rec is None or (gen is not None and rec.gen != gen):
            return False
        self.st["set_clean"] += 1
        if rec.unreadable:
            self._unmap(blkno)
            return True
        if rec.dirty_mask:
            self.meta.meta_set_clean(blkno)
            rec.dirty_mask = 0
            self._dirty.discard(blkno)
            self._clean[blkno] = None
        return True

    def dirty_blocks(self, limit: int, start: int = 0,
                     include_unreadable: bool = False) -> list[int]:
        """Up to ``limit`` blocks ``>= start`` whose swap copy is dirty, ascending.

        For ``buf_daemon_hw``: page each in, write it to the backend, then
        ``set_clean(blkno, entry.gen)``.  Unreadable entries are left out
        unless asked for (they cannot be drained; FLUSH must report them).
        Lock held; never blocks.  O(dirty entries * log limit).
        """
        recs = self._recs
        cands = (b for b in self._dirty
                 if b >= start and (include_unreadable or not recs[b].unreadable))
        return heapq.nsmallest(limit, cands)

    def reclaim_clean(self, count: int) -> int:
        """Drop up to ``count`` clean swap copies, oldest mapping first; return how many.

        Skips copies under a read.  Clean copies are redundant (the backend
        has the data), so this never loses data; a RAM buffer that relied on
        one simply has no swap copy any more.  Lock held; never blocks.
        """
        done = 0
        for b in list(self._clean):
            if done >= count:
                break
            slot = self.meta.meta_ctl(b, 0)
            if slot in self._reading:
                continue
            self._unmap(b)
            done += 1
        self.st["reclaimed_clean"] += done
        return done

    def may_spill_dirty(self) -> bool:
        """Whether dirty victims may go to swap now (False when almost full).

        When almost full, first reclaims clean swap copies to get back above
        ``nswap_hiwat`` (the swapcache yields to dirty spill).  Lock held;
        never blocks.
        """
        self._swp_sizecheck()
        if self._almost_full and self._clean:
            need = self.nswap_hiwat + 1 - self.blist.avail
            if need > 0:
                self.reclaim_clean(need)
        return not self._almost_full

    def may_spill_clean(self) -> bool:
        """Whether clean victims should be copied to swap now (False when almost full:
        a clean copy is only worth space that is plentiful).  Lock held; never blocks."""
        self._swp_sizecheck()
        return not self._almost_full

    # ================================================================ statistics and checks

    def stats(self) -> dict[str, Any]:
        """Counters and gauges under their kernel names where one exists.  Lock held."""
        st = dict(self.st)
        st["pageout_mean_cluster"] = (round(st["swappgsout"] / st["swapout"], 2)
                                      if st["swapout"] else 0.0)
        st["pagein_mean_cluster"] = (round(st["swappgsin"] / st["swapin"], 2)
                                     if st["swapin"] else 0.0)
        devs = []
        for i, d in enumerate(self.devices):
            devs.append({"path": getattr(d, "path", str(i)), "slots": d.nslots,
                         "used": self._dev_used[i], "free": d.nslots - self._dev_used[i],
                         "bad": sum(1 for s in self._bad if self.device_of(s)[0] == i)})
        st.update({
            "devices": devs,
            "nswap": self.nslots, "vm_swap_size": self.blist.avail,
            "swap_used": self.nslots - self.blist.avail,
            "swap_clean": self.meta.nclean, "swap_dirty": self.meta.ndirty,
            "swap_unreadable": sum(1 for r in self._recs.values() if r.unreadable),
            "swap_bad": len(self._bad), "swap_pending_free": len(self._pending),
            "swap_pageout_inflight": sum(len(r.blknos) for r in self._out_runs),
            "swap_pager_almost_full": int(self._almost_full),
            "swap_pager_full": int(self._full),
            "nswap_lowat": self.nswap_lowat, "nswap_hiwat": self.nswap_hiwat,
            "dmmax": self.dmmax, "nsw_cluster_max": self.nsw_cluster_max,
            "swap_async_max": self._swap_async_max,
            "nsw_wcount_async_max": self._async_max,
            "swap_async_inuse": self._async_max - self._async_free,
            "swap_sync_inuse": self._sync_max - self._sync_free,
            "swap_read_inuse": self._rmax - self._rfree,
        })
        return st

    def check_invariants(self) -> None:
        """Raise SwapPagerInvariantError unless invariants 1-5 hold.  O(slots); tests."""
        def fail(msg: str) -> None:
            raise SwapPagerInvariantError(msg)

        self.blist.check_invariants()
        self.meta.check_invariants()
        bl = self.blist
        owner: dict[int, str] = {}

        def claim(slot: int, what: str) -> None:
            if slot in owner:
                fail(f"slot {slot} is both {owner[slot]} and {what}")
            if bl.is_free(slot):
                fail(f"slot {slot} ({what}) is free in the blist")
            owner[slot] = what

        mapped = {}
        for b, slot, dirty in self.meta.items():
            mapped[b] = (slot, dirty)
            claim(slot, f"mapped to block {b}")
        for run in self._out_runs:
            for k in range(len(run.blknos)):
                claim(run.slot + k, f"in a page-out of block {run.blknos[k]}")
        for s in self._bad:
            claim(s, "quarantined")
        for s in self._pending:
            claim(s, "pending free")
        for s, what in owner.items():
            dev, local = self.device_of(s)
            if local >= self.devices[dev].nslots:
                fail(f"slot {s} ({what}) is a hole: device {dev} has no local slot {local}")
        used = len(owner) + self.nholes
        if bl.avail + used != bl.nblocks:
            fail(f"free {bl.avail} + used {used} != {bl.nblocks} slots")
        free_map = bl.free_bitmap()
        for i, d in enumerate(self.devices):
            n = 0
            for k in range(0, d.nslots, self.dmmax):
                g = ((k // self.dmmax) * self.ndev + i) * self.dmmax
                width = min(self.dmmax, d.nslots - k)
                n += width - (free_map >> g & ((1 << width) - 1)).bit_count()
            if n != self._dev_used[i]:
                fail(f"device {i}: {self._dev_used[i]} slots counted used, blist says {n}")

        if set(mapped) != set(self._recs):
            fail(f"mapped blocks and records differ: "
                 f"{set(mapped) ^ set(self._recs)}")
        suspect = set()
        for b, rec in self._recs.items():
            slot, dirty = mapped[b]
            if dirty != bool(rec.dirty_mask):
                fail(f"block {b}: dirty tag {dirty} but dirty mask {rec.dirty_mask:#x}")
            if not rec.valid or rec.dirty_mask & ~rec.valid:
                fail(f"block {b}: masks valid={rec.valid:#x} dirty={rec.dirty_mask:#x}")
            if (b in self._dirty) != dirty or (b in self._clean) == dirty:
                fail(f"block {b}: on the wrong clean/dirty list")
            if rec.unreadable:
                if not dirty:
                    fail(f"block {b}: clean but flagged unreadable")
                suspect.add(slot)
        if len(self._dirty) + len(self._clean) != len(self._recs):
            fail("clean/dirty lists hold blocks that are not mapped")
        if not self._suspect <= suspect | self._pending or not suspect <= self._suspect:
            fail(f"suspect slots {self._suspect} vs unreadable {suspect}")
        for s, n in self._reading.items():
            if n <= 0 or not (owner.get(s, "").startswith("mapped") or s in self._pending
                              or s in self._bad):
                fail(f"slot {s} read by {n} runs but {owner.get(s, 'free')}")
        if not self._pending <= set(self._reading):
            fail(f"pending frees {self._pending - set(self._reading)} with no read in flight")
        for b, run in self._out.items():
            if run not in self._out_runs or b not in run.blknos or b in run.cancelled:
                fail(f"block {b}: stale in-flight page-out record")
        for run in self._out_runs:
            for b in run.blknos:
                if b not in run.cancelled and self._out.get(b) is not run:
                    fail(f"block {b}: in flight in a page-out that is neither tracked "
                         "nor cancelled")

        sync_runs = sum(1 for r in self._out_runs if r.sync)
        async_runs = len(self._out_runs) - sync_runs
        for name, free, top, inuse in (
                ("read", self._rfree, self._rmax, len(self._in_runs)),
                ("sync", self._sync_free, self._sync_max, sync_runs),
                ("async", self._async_free, self._async_max, async_runs)):
            if not 0 <= free <= top or top - free != inuse:
                fail(f"{name} credits: {free} free of {top}, {inuse} runs in flight")
        if bl.avail < self.nswap_lowat and not self._almost_full:
            fail(f"{bl.avail} free slots < lowat {self.nswap_lowat} but not almost_full")

    def close(self) -> None:
        """Close every device (idempotent).  Swap contents die with the pager: the
        metadata is RAM-only.  Call with no run in flight; may block on close()."""
        if self.closed:
            return
        self.closed = True
        for d in self.devices:
            d.close()

    def __repr__(self) -> str:
        return (f"<SwapPager ndev={self.ndev} slots={self.nslots} free={self.blist.avail} "
                f"mapped={len(self._recs)} bad={len(self._bad)}>")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], not {value!r}")
