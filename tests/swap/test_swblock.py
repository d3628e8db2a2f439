"""nbdcache.swap.swblock: swap metadata against a plain dict model.

The model maps blkno -> (slot, dirty).  ``freeswapspace`` records its calls;
after every rule the recorded frees must be exactly the slots the rule dropped
(each once, one slot per call), and the invariant checker must pass.
"""

from __future__ import annotations

import time
from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nbdcache.swap.blist import SWAPBLK_NONE, Blist
from nbdcache.swap.swblock import (
    HASPAGE_MAXRUN, SWAP_META_PAGES, SWM_FREE, SWM_POP, SwapMeta, SwapMetaError,
    SwapMetaInvariantError,
)

BLOCKS = st.integers(0, 300)        # about ten chunks: plenty of sharing and emptying


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, slot: int, n: int) -> None:
        self.calls.append((slot, n))


class SwapMetaModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rec = Recorder()
        self.meta = SwapMeta(self.rec)
        self.model: dict[int, tuple[int, bool]] = {}
        self.next_slot = 0                  # slot 0 included: haspage must not match -1
        self.spare: list[int] = []          # freed or popped slots, ours to reuse
        self.expect: list[int] = []         # slots the current rule must free

    def _fresh(self, n: int = 1) -> int:
        slot = self.next_slot
        self.next_slot += n + 3             # gaps, so separate runs are not contiguous
        return slot

    def _drop(self, blkno: int, freed: bool) -> None:
        slot, _ = self.model.pop(blkno)
        self.spare.append(slot)
        if freed:
            self.expect.append(slot)

    @rule(blkno=BLOCKS, dirty=st.booleans(), source=st.sampled_from(["fresh", "spare", "none"]))
    def build(self, blkno: int, dirty: bool, source: str) -> None:
        if source == "spare" and self.spare:
            slot = self.spare.pop()
        elif source == "none":
            slot = SWAPBLK_NONE
        else:
            slot = self._fresh()
        if blkno in self.model:
            self._drop(blkno, freed=True)
        if slot != SWAPBLK_NONE:
            self.model[blkno] = (slot, dirty)
        self.meta.meta_build(blkno, slot, dirty=dirty)

    @rule(blkno=BLOCKS, n=st.integers(1, 16), dirty=st.booleans())
    def build_run(self, blkno: int, n: int, dirty: bool) -> None:
        """A putpages cluster: n adjacent blocks get n contiguous fresh slots."""
        slot = self._fresh(n)
        for i in range(n):
            if blkno + i in self.model:
                self._drop(blkno + i, freed=True)
            self.model[blkno + i] = (slot + i, dirty)
            self.meta.meta_build(blkno + i, slot + i, dirty=dirty)

    @rule(blkno=BLOCKS, count=st.one_of(st.integers(0, 100), st.integers(100, 5000)))
    def free_range(self, blkno: int, count: int) -> None:
        for b in sorted(self.model):
            if blkno <= b < blkno + count:
                self._drop(b, freed=True)
        self.meta.meta_free(blkno, count)

    @rule(blkno=BLOCKS, flags=st.sampled_from([0, SWM_FREE, SWM_POP, SWM_FREE | SWM_POP]))
    def ctl(self, blkno: int, flags: int) -> None:
        had = self.model.get(blkno)
        got = self.meta.meta_ctl(blkno, flags)
        if had is None:
            assert got == SWAPBLK_NONE
        elif flags & SWM_FREE:
            assert got == SWAPBLK_NONE
            self._drop(blkno, freed=True)
        elif flags & SWM_POP:
            assert got == had[0]
            self._drop(blkno, freed=False)
        else:
            assert got == had[0]

    @rule()
    def free_all(self) -> None:
        for b in list(self.model):
            self._drop(b, freed=True)
        self.meta.meta_free_all()

    @rule(blkno=BLOCKS)
    def set_clean(self, blkno: int) -> None:
        if blkno in self.model:
            self.model[blkno] = (self.model[blkno][0], False)
            self.meta.meta_set_clean(blkno)
        else:
            with pytest.raises(SwapMetaError):
                self.meta.meta_set_clean(blkno)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), maxrun=st.sampled_from([HASPAGE_MAXRUN, 0, 3, 40]),
          dmmax=st.sampled_from([None, 1, 4, 32]))
    def haspage(self, data, maxrun: int, dmmax: int | None) -> None:
        blkno = data.draw(st.one_of(st.sampled_from(sorted(self.model)), BLOCKS))
        got = self.meta.haspage(blkno, maxrun, dmmax)
        if blkno not in self.model:
            assert got is None
            return
        slot0 = self.model[blkno][0]

        def good(i: int) -> bool:
            entry = self.model.get(blkno + i)
            same_stripe = dmmax is None or (slot0 + i) // dmmax == slot0 // dmmax
            return entry is not None and entry[0] == slot0 + i and same_stripe

        before = 0
        while before < maxrun and blkno - before - 1 >= 0 and good(-before - 1):
            before += 1
        after = 0
        while after < maxrun and good(after + 1):
            after += 1
        assert got == (slot0, before, after)
        assert self.meta.meta_lookup(blkno) == self.model[blkno]
        if dmmax is not None:
            assert (slot0 - before) // dmmax == (slot0 + after) // dmmax

    @invariant()
    def matches_model(self) -> None:
        self.meta.check_invariants()
        assert all(n == 1 for _, n in self.rec.calls)
        assert Counter(s for s, _ in self.rec.calls) == Counter(self.expect)
        self.rec.calls.clear()
        self.expect.clear()
        assert list(self.meta.items()) == [(b, s, d) for b, (s, d) in sorted(self.model.items())]
        assert len(self.meta) == len(self.model)
        assert self.meta.ndirty == sum(d for _, d in self.model.values())
        assert self.meta.swp_bcount == len({b // SWAP_META_PAGES for b in self.model})
        for b in (0, 31, 32, 150, 299):
            assert self.meta.meta_lookup(b) == self.model.get(b)


TestSwapMetaModel = SwapMetaModel.TestCase
TestSwapMetaModel.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


# ------------------------------------------------------------------ unit tests

def make() -> tuple[SwapMeta, Recorder]:
    rec = Recorder()
    return SwapMeta(rec), rec


def test_build_none_never_creates_a_chunk_and_frees_the_old_slot():
    meta, rec = make()
    meta.meta_build(40, SWAPBLK_NONE, dirty=False)
    assert meta.swp_bcount == 0
    meta.meta_build(40, 7, dirty=True)
    assert (meta.swp_bcount, meta.ndirty) == (1, 1)
    meta.meta_build(40, SWAPBLK_NONE, dirty=False)
    assert rec.calls == [(7, 1)]
    assert (meta.swp_bcount, len(meta), meta.ndirty) == (0, 0, 0)


def test_rebuild_frees_the_previous_slot_first():
    meta, rec = make()
    meta.meta_build(3, 10, dirty=True)
    meta.meta_build(3, 11, dirty=False)
    assert rec.calls == [(10, 1)]
    assert meta.meta_lookup(3) == (11, False)
    assert (meta.nclean, meta.ndirty) == (1, 0)
    with pytest.raises(SwapMetaError):
        meta.meta_build(3, 11, dirty=False)        # would free the slot it keeps
    with pytest.raises(SwapMetaError):
        meta.meta_build(-1, 5, dirty=False)
    meta.check_invariants()


def test_chunk_freed_when_count_reaches_zero():
    meta, rec = make()
    meta.meta_build(64, 1, dirty=False)
    meta.meta_build(95, 2, dirty=False)
    meta.meta_build(96, 3, dirty=False)
    assert meta.swp_bcount == 2
    assert meta.meta_ctl(64, SWM_POP) == 1
    assert meta.swp_bcount == 2
    assert meta.meta_ctl(95, SWM_FREE) == SWAPBLK_NONE
    assert meta.swp_bcount == 1
    assert rec.calls == [(2, 1)]                   # POP handed slot 1 to us, unfreed
    assert meta.meta_ctl(95, 0) == SWAPBLK_NONE


def test_meta_free_skips_absent_chunks_and_long_sparse_ranges_are_cheap():
    meta, rec = make()
    meta.meta_build(5, 50, dirty=True)
    meta.meta_build(100, 60, dirty=False)
    meta.meta_build(10 ** 9, 70, dirty=False)
    meta.meta_free(6, 94)                          # 6..99: nothing assigned there
    assert rec.calls == []
    t = time.process_time()
    meta.meta_free(0, 1 << 40)                     # a whole-disk TRIM
    assert time.process_time() - t < 0.5
    assert sorted(rec.calls) == [(50, 1), (60, 1), (70, 1)]
    assert (len(meta), meta.swp_bcount) == (0, 0)


def test_set_clean_moves_the_counters():
    meta, _ = make()
    meta.meta_build(1, 9, dirty=True)
    meta.meta_set_clean(1)
    meta.meta_set_clean(1)                         # already clean: no change
    assert (meta.nclean, meta.ndirty, meta.meta_lookup(1)) == (1, 0, (9, False))
    with pytest.raises(SwapMetaError):
        meta.meta_set_clean(2)


def test_free_all_empties_before_calling_back():
    seen = []
    meta = SwapMeta(lambda slot, n: seen.append((slot, len(meta))))
    for b in range(0, 200, 3):
        meta.meta_build(b, 1000 + b, dirty=b % 2 == 0)
    meta.meta_free_all()
    assert sorted(s for s, _ in seen) == [1000 + b for b in range(0, 200, 3)]
    assert {left for _, left in seen} == {0}
    meta.check_invariants()


def test_haspage_counts_exactly_contiguous_neighbours():
    meta, _ = make()
    for i in range(20):                            # blocks 10..29 -> slots 100..119
        meta.meta_build(10 + i, 100 + i, dirty=False)
    meta.meta_build(30, 500, dirty=False)          # not contiguous with 119
    assert meta.haspage(20) == (110, 7, 7)         # at most 7 each way (L787-813)
    assert meta.haspage(12) == (102, 2, 7)
    assert meta.haspage(29) == (119, 7, 0)
    assert meta.haspage(20, maxrun=40) == (110, 10, 9)
    assert meta.haspage(9) is None
    assert meta.haspage(20, dmmax=32) == (110, 7, 7)
    assert meta.haspage(20, dmmax=8) == (110, 6, 1)    # stripe 104..111
    assert meta.haspage(16, dmmax=8) == (106, 2, 5)    # not below slot 104


def test_haspage_slot_zero_does_not_match_an_empty_neighbour():
    """The kernel compares blk0 - 1 == SWAPBLK_NONE unguarded; we do not."""
    meta, _ = make()
    meta.meta_build(5, 0, dirty=False)
    meta.meta_build(6, 1, dirty=False)
    assert meta.haspage(5) == (0, 0, 1)
    assert meta.haspage(0) is None


def test_checker_catches_a_slot_referenced_twice_and_bad_counts():
    meta, _ = make()
    meta.meta_build(1, 42, dirty=False)
    meta.meta_build(70, 42, dirty=True)
    with pytest.raises(SwapMetaInvariantError, match="slot 42 referenced by blocks 1 and 70"):
        meta.check_invariants()
    meta, _ = make()
    meta.meta_build(1, 42, dirty=False)
    meta.nclean += 1
    with pytest.raises(SwapMetaInvariantError, match="counters"):
        meta.check_invariants()
    meta, _ = make()
    meta.meta_build(1, 42, dirty=False)
    meta._chunks[0].count = 2
    with pytest.raises(SwapMetaInvariantError, match="swb_count 2 != 1"):
        meta.check_invariants()


def test_with_a_real_blist_every_slot_comes_back():
    bl = Blist(1000)
    meta = SwapMeta(bl.free)
    for blkno in range(0, 592, 16):                # clusters of 16, as putpages writes
        slot = bl.alloc(16)
        for i in range(16):
            meta.meta_build(blkno + i, slot + i, dirty=True)
    assert bl.avail == 1000 - 592
    assert meta.haspage(40) == (40, 7, 7)
    for blkno in range(0, 592, 5):                 # re-spill some blocks elsewhere
        meta.meta_build(blkno, bl.alloc(1), dirty=False)
    meta.meta_free(100, 200)
    meta.check_invariants()
    bl.check_invariants()
    assert bl.avail == 1000 - len(meta)
    meta.meta_free_all()
    assert bl.avail == 1000
