"""Swap metadata: which swap slot holds each block of one disk, after ``struct swblock``.

Theory of operation
-------------------
FreeBSD keeps, per VM object, a hash of ``struct swblock`` chunks: each covers
``SWAP_META_PAGES`` (32) consecutive page indexes aligned to 32 and holds their
32 swap block numbers plus ``swb_count``, the number that are assigned
(seeds/swap_pager.c L1724-2005).  Here a ``SwapMeta`` plays the object: one per
cached disk, a ``dict`` from the chunk's first block number (``swb_index``,
aligned to 32) to a small ``SwBlock``.  A ``dict`` per disk replaces the global
hash, so ``meta_free_all`` costs the number of chunks, not a scan up to the
highest index (L1913-1937).

Each assigned entry also carries a **clean/dirty tag**, which the kernel does
not need (SEED-CATALOGUE C1):

* *clean*: the slot holds a copy of data the backing store also has (the
  DragonFly swapcache model); losing the slot loses nothing;
* *dirty*: the slot holds the only current copy of the block (the anonymous
  swap-pager model); it must be written back before it may be dropped.

A tag only ever goes dirty -> clean (``meta_set_clean``, after the flusher has
written the slot's data to the backing store).  There is no clean -> dirty:
when the guest modifies a block its swap copy becomes stale and is freed
(``meta_ctl(SWM_FREE)``, the kernel's ``swap_pager_unswapped``).

The owner supplies ``freeswapspace(slot, n)`` (the kernel's
``swp_pager_freeswapspace``), called exactly once for every slot this module
drops, one slot per call as in the kernel.  The owner may defer the real
``blist_free`` while I/O on the slot is in flight (SEED-CATALOGUE C5.5).

Invariants (``check_invariants`` raises ``SwapMetaInvariantError``)
-------------------------------------------------------------------
1. Every chunk is stored under its own ``index``, a multiple of 32, and its
   ``count`` equals its number of assigned entries, which is at least 1 (a
   chunk is freed when its count reaches 0, never kept empty).
2. Dirty bits are set only on assigned entries.
3. No slot is referenced twice, in this map (the kernel's "every allocated
   block is referenced by exactly one metadata slot", B2; a check across disks
   is the pager's job).
4. ``nclean`` and ``ndirty`` equal the numbers of clean and dirty entries.

Costs: every ``meta_*`` call on one block is O(1); ``meta_free`` of a range is
O(range / 32 + entries freed); ``meta_free_all`` is O(entries); ``haspage`` is
O(maxrun).  Locking: none here; the pager serialises every call under its lock,
and nothing in this module blocks or does I/O (``freeswapspace`` must not block
either; it runs with the caller's lock held).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from nbdcache.swap.blist import SWAPBLK_NONE

SWAP_META_PAGES = 32                    # entries per chunk (swap_pager.h: SWB_NPAGES * 2)
SWAP_META_MASK = SWAP_META_PAGES - 1
SWB_NPAGES = 16                         # MAX_PAGEOUT_CLUSTER (L86-90)
HASPAGE_MAXRUN = SWB_NPAGES // 2 - 1    # 7: haspage's "i < SWB_NPAGES/2" loops (L787-813)

SWM_FREE = 0x02                         # remove the entry and free its slot
SWM_POP = 0x04                          # remove the entry, hand the slot to the caller


class SwapMetaError(ValueError):
    """A caller passed a bad block number or slot, or named an absent entry."""


class SwapMetaInvariantError(AssertionError):
    """The metadata contradicts one of its invariants (the KASSERT habit)."""


class SwBlock:
    """One chunk: 32 consecutive block numbers from ``index`` (``struct swblock``)."""

    __slots__ = ("index", "pages", "dirty", "count")

    def __init__(self, index: int) -> None:
        self.index = index                              # swb_index: first blkno, 32-aligned
        self.pages = [SWAPBLK_NONE] * SWAP_META_PAGES   # swb_pages: slot per block
        self.dirty = 0                                  # bit i: pages[i] is the only copy
        self.count = 0                                  # swb_count: assigned entries

    def __repr__(self) -> str:
        used = {self.index + i: s for i, s in enumerate(self.pages) if s != SWAPBLK_NONE}
        return f"<SwBlock {self.index} count={self.count} dirty={self.dirty:#x} {used}>"


class SwapMeta:
    """Block number -> (swap slot, dirty) for one disk; see the module docstring."""

    def __init__(self, freeswapspace: Callable[[int, int], None]) -> None:
        self.freeswapspace = freeswapspace
        self._chunks: dict[int, SwBlock] = {}
        self.nclean = 0                 # statistic: entries whose slot is a clean copy
        self.ndirty = 0                 # statistic: entries whose slot is the only copy

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Number of assigned entries."""
        return self.nclean + self.ndirty

    @property
    def swp_bcount(self) -> int:
        """Number of chunks (the object's ``swp_bcount``)."""
        return len(self._chunks)

    def meta_lookup(self, blkno: int) -> tuple[int, bool] | None:
        """``(slot, dirty)`` for ``blkno``, or None if it has no slot.  O(1)."""
        swap = self._chunks.get(blkno & ~SWAP_META_MASK)
        if swap is None:
            return None
        i = blkno & SWAP_META_MASK
        slot = swap.pages[i]
        if slot == SWAPBLK_NONE:
            return None
        return slot, bool(swap.dirty >> i & 1)

    def items(self) -> Iterator[tuple[int, int, bool]]:
        """``(blkno, slot, dirty)`` for every entry, in block order."""
        for index in sorted(self._chunks):
            swap = self._chunks[index]
            for i, slot in enumerate(swap.pages):
                if slot != SWAPBLK_NONE:
                    yield index + i, slot, bool(swap.dirty >> i & 1)

    def haspage(self, blkno: int, maxrun: int = HASPAGE_MAXRUN,
                dmmax: int | None = None) -> tuple[int, int, int] | None:
        """``(slot, before, after)`` if ``blkno`` has a slot, else None (``swap_pager_haspage``).

        ``before``/``after`` count neighbours ``blkno -/+ i`` (``i <= maxrun``)
        whose slots are exactly ``slot -/+ i``, so that one read covers them.
        With ``dmmax``, the run also stops at a stripe boundary of the swap
        address space (``slot // dmmax`` must not change), as getpages clips.
        """
        if maxrun < 0 or (dmmax is not None and dmmax < 1):
            raise SwapMetaError(f"haspage: bad maxrun {maxrun!r} or dmmax {dmmax!r}")
        slot0 = self.meta_ctl(blkno, 0)
        if slot0 == SWAPBLK_NONE:
            return None
        # slot0 - i >= 0 as well: the kernel compares with SWAPBLK_NONE (-1)
        # unguarded, so slot 0 with an unassigned left neighbour counted 1
        back = min(maxrun, blkno, slot0)
        ahead = maxrun
        if dmmax is not None:
            back = min(back, slot0 % dmmax)
            ahead = min(ahead, dmmax - 1 - slot0 % dmmax)
        before = 0
        while before < back and self.meta_ctl(blkno - before - 1, 0) == slot0 - before - 1:
            before += 1
        after = 0
        while after < ahead and self.meta_ctl(blkno + after + 1, 0) == slot0 + after + 1:
            after += 1
        return slot0, before, after

    # ---------------------------------------------------------------- changes

    def meta_build(self, blkno: int, slot: int, *, dirty: bool) -> None:
        """Record that ``slot`` holds ``blkno`` (``swp_pager_meta_build``, L1758-1842).

        Any slot previously assigned to ``blkno`` is freed first (re-assigning
        a block releases its old slot at once).  Building ``SWAPBLK_NONE``
        just frees the old slot and never creates a chunk; ``dirty`` is then
        ignored.  ``dirty`` says whether the slot will hold the only current
        copy; it must be given, since guessing wrong either loses data or pins
        swap forever.  Raises ``SwapMetaError`` for a negative block or slot,
        or if ``slot`` is already the slot of ``blkno`` (freeing it would leave
        the entry pointing at a free slot).
        """
        self._check_blkno(blkno)
        if slot < 0 and slot != SWAPBLK_NONE:
            raise SwapMetaError(f"meta_build: bad slot {slot!r}")
        index = blkno & ~SWAP_META_MASK
        swap = self._chunks.get(index)
        if swap is None:
            if slot == SWAPBLK_NONE:
                return
            swap = self._chunks[index] = SwBlock(index)
        i = blkno & SWAP_META_MASK
        old = swap.pages[i]
        if old != SWAPBLK_NONE:
            if old == slot:
                raise SwapMetaError(f"meta_build: block {blkno} already has slot {slot}")
            self._clear(swap, i)
        if slot != SWAPBLK_NONE:
            swap.pages[i] = slot
            swap.count += 1
            if dirty:
                swap.dirty |= 1 << i
                self.ndirty += 1
            else:
                self.nclean += 1
        elif not swap.count:
            del self._chunks[index]
        if old != SWAPBLK_NONE:
            self.freeswapspace(old, 1)

    def meta_set_clean(self, blkno: int) -> None:
        """Mark the slot of ``blkno`` a clean copy (its data reached the backing store).

        Raises ``SwapMetaError`` if ``blkno`` has no slot.  O(1).
        """
        swap = self._chunks.get(blkno & ~SWAP_META_MASK)
        i = blkno & SWAP_META_MASK
        if swap is None or swap.pages[i] == SWAPBLK_NONE:
            raise SwapMetaError(f"meta_set_clean: block {blkno} has no swap slot")
        if swap.dirty >> i & 1:
            swap.dirty &= ~(1 << i)
            self.ndirty -= 1
            self.nclean += 1

    def meta_free(self, blkno: int, count: int) -> None:
        """Drop and free the slots of blocks ``blkno .. blkno+count-1`` (``swp_pager_meta_free``).

        Absent chunks are skipped 32 blocks at a time, or, when the range is
        longer than 32 blocks per existing chunk, only existing chunks are
        visited: O(min(count / 32, chunks * log chunks) + entries freed).  A
        chunk is freed when its count reaches 0.  Used for TRIM, discard and
        block destruction.
        """
        self._check_blkno(blkno)
        end = blkno + count
        first = blkno & ~SWAP_META_MASK
        if count > SWAP_META_PAGES * (len(self._chunks) + 1):
            # a long, sparse range (a TRIM of the whole disk): visit the chunks
            # that exist rather than every 32-block stride the kernel walks
            indexes = sorted(i for i in self._chunks if first <= i < end)
        else:
            indexes = range(first, end, SWAP_META_PAGES)
        for index in indexes:
            swap = self._chunks.get(index)
            if swap is None:
                continue
            for i in range(max(blkno, index) - index, min(end, index + SWAP_META_PAGES) - index):
                slot = swap.pages[i]
                if slot != SWAPBLK_NONE:
                    self._clear(swap, i)
                    if not swap.count:
                        del self._chunks[index]
                    self.freeswapspace(slot, 1)

    def meta_free_all(self) -> None:
        """Drop and free every slot (``swp_pager_meta_free_all``), e.g. on disk close.

        The map is emptied before the first ``freeswapspace`` call.  O(entries).
        """
        chunks = self._chunks
        self._chunks = {}
        self.nclean = self.ndirty = 0
        for swap in chunks.values():
            for slot in swap.pages:
                if slot != SWAPBLK_NONE:
                    self.freeswapspace(slot, 1)

    def meta_ctl(self, blkno: int, flags: int = 0) -> int:
        """Look up, free or pop the slot of ``blkno`` (``swp_pager_meta_ctl``, L1963-2005).

        * ``flags == 0``: return the slot, or ``SWAPBLK_NONE``;
        * ``SWM_FREE``: free the slot, clear the entry, return ``SWAPBLK_NONE``;
        * ``SWM_POP``: clear the entry without freeing and return the slot: its
          ownership passes to the caller.

        ``SWM_FREE`` wins if both are given, as in the kernel.  O(1).
        """
        index = blkno & ~SWAP_META_MASK
        swap = self._chunks.get(index)
        if swap is None:
            return SWAPBLK_NONE
        i = blkno & SWAP_META_MASK
        slot = swap.pages[i]
        if slot == SWAPBLK_NONE or not flags & (SWM_FREE | SWM_POP):
            return slot
        self._clear(swap, i)
        if not swap.count:
            del self._chunks[index]
        if flags & SWM_FREE:
            self.freeswapspace(slot, 1)
            return SWAPBLK_NONE
        return slot

    def _clear(self, swap: SwBlock, i: int) -> None:
        """Empty entry ``i`` of ``swap`` and fix the counters (the caller frees the chunk)."""
        swap.pages[i] = SWAPBLK_NONE
        swap.count -= 1
        if swap.dirty >> i & 1:
            swap.dirty &= ~(1 << i)
            self.ndirty -= 1
        else:
            self.nclean -= 1

    @staticmethod
    def _check_blkno(blkno: int) -> None:
        if not isinstance(blkno, int) or blkno < 0:
            raise SwapMetaError(f"bad block number {blkno!r}")

    # --------------------------------------------------------------- checking

    def check_invariants(self) -> None:
        """Raise ``SwapMetaInvariantError`` unless invariants 1-4 hold.  O(entries)."""
        def fail(msg: str) -> None:
            raise SwapMetaInvariantError(msg)

        owner: dict[int, int] = {}
        clean = dirty = 0
        for index, swap in self._chunks.items():
            if swap.index != index or index & SWAP_META_MASK or index < 0:
                fail(f"{swap!r} stored under {index}")
            used = 0
            for i, slot in enumerate(swap.pages):
                if slot == SWAPBLK_NONE:
                    if swap.dirty >> i & 1:
                        fail(f"{swap!r}: empty entry {index + i} tagged dirty")
                    continue
                if slot < 0:
                    fail(f"{swap!r}: entry {index + i} holds bad slot {slot}")
                if slot in owner:
                    fail(f"slot {slot} referenced by blocks {owner[slot]} and {index + i}")
                owner[slot] = index + i
                used += 1
                if swap.dirty >> i & 1:
                    dirty += 1
                else:
                    clean += 1
            if swap.dirty >> SWAP_META_PAGES:
                fail(f"{swap!r}: dirty bits past entry 31")
            if swap.count != used:
                fail(f"{swap!r}: swb_count {swap.count} != {used} assigned entries")
            if not used:
                fail(f"{swap!r}: empty chunk not freed")
        if (self.nclean, self.ndirty) != (clean, dirty):
            fail(f"counters clean={self.nclean} dirty={self.ndirty}, "
                 f"entries say clean={clean} dirty={dirty}")
