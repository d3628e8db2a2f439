"""Swap slot allocator: a radix tree of bitmaps, after FreeBSD's ``subr_blist.c``.

Theory of operation
-------------------
A ``Blist`` hands out runs of *contiguous* swap slots, 1 to ``BLIST_MAX_ALLOC``
(32) at a time, the way ``blist_alloc()`` serves ``swp_pager_getswapspace()``
(swap_pager.c L494-515), and takes back any range, the way ``blist_free()``
serves ``swp_pager_freeswapspace()`` (L532-544).

The slots are the leaves of a radix tree.  A *leaf* is one 64-bit word
(``BLIST_BMAP_RADIX``), bit *i* set when slot ``64*leaf + i`` is **free** (the
kernel's convention).  A *meta node* summarises ``BLIST_META_RADIX`` (16)
children with two numbers::

    level 2  root          [avail 9000 | bighint 32]                radix 16384
                          /           |            \\
    level 1   [avail 300|bighint 9] [avail 0|bighint 0] ... x16     radix  1024
              /        |         \\
    level 0  ffff0000ffff0f0f  0000000000000000  ... x16 words      radix    64
             (1 = free)        (all allocated)

* ``avail``: the exact number of free slots below the node;
* ``bighint``: an upper bound on the longest free run that could be allocated
  starting inside the node (see *Invariants*).  A search for ``count`` slots
  never descends into a child whose ``bighint < count``, which is what keeps
  allocation cost independent of the device size.

Each level lives in a flat Python list (node ``j`` of level ``l`` has children
``16j .. 16j+15`` of level ``l-1``), an implicit tree like the kernel's
preorder array.  Every level is padded to a multiple of 16 with "allocated"
entries, and slots past ``nblocks`` in the last real leaf are allocated, so no
search ever looks at them.  A leaf holds no hint of its own: its runs are
computed from the word with a handful of shift-and-AND steps.

**Allocation** (``alloc``) is first-fit from a cursor, as in the modern
``blist_alloc()``: the lowest slot ``s >= cursor`` with ``[s, s+count)`` free,
otherwise the lowest such ``s >= 0``; the cursor then moves to ``s + count``
(wrapping to 0 at the end).  The search descends from the root, skipping
children by ``bighint``; at level 1 it tests each of the 16 words for a run of
``count`` set bits, looking into the *next* word (which may belong to another
meta node) when the run would cross the word's top bit.  So a run may straddle
any leaf boundary.  When a search covered a whole node without success, the
node's ``bighint`` is lowered to ``count - 1`` (level 1) or to the largest
child hint (higher levels): the kernel's lazy hint repair.  A node whose
``avail`` drops to 0 gets ``bighint`` 0 at once.

**Freeing** (``free``) sets the bits, adds to ``avail`` up the tree, and raises
the ``bighint`` of every node holding a slot of the freed run (including the
stretch of up to 32 free slots just before it, which the merged run now extends)
to the merged run's length, capped at 32.

Invariants (``check_invariants`` raises ``BlistInvariantError``)
-----------------------------------------------------------------
1. ``avail`` of a meta node equals the sum of its children's ``avail`` (a
   leaf's ``avail`` is its bit count); the root's ``avail`` equals the number of
   set bits of all leaves.
2. For every meta node N: ``0 <= bighint(N) <= BLIST_MAX_ALLOC`` and
   ``bighint(N) >= min(BLIST_MAX_ALLOC, R(N))`` where ``R(N)`` is the length of
   the longest free run that *starts* at a slot inside N, counted to its end
   even past N's right edge.  The hint may **overestimate** (that only costs
   one wasted descent, after which the failed search lowers it) but never
   **underestimate**: an underestimate would hide free space.  Because of this
   invariant, and because the search visits every node whose hint admits the
   request, ``alloc`` fails only when no run of ``count`` free slots exists
   anywhere in the device.
3. Bits past ``nblocks`` and padding entries are allocated / zero.
4. ``0 <= cursor < nblocks``.

Costs
-----
With ``depth = ceil(log16(nblocks / 64))`` meta levels (2 for 16 Ki slots, 5 for
16 Mi): ``alloc`` reads at most 16 hints per level on the path and tests up to
16 words per level-1 node it enters, which is O(16 * depth) when hints are
tight; a stale hint costs one extra level-1 scan and is then repaired.
``free``/``fill`` of a short run are O(depth); of a run spanning L leaves,
O(L + depth).  Construction is O(nblocks / 64) list multiplications: all free
leaves share one int object, so a 16 Mi-slot tree costs about 2 MiB of list
pointers until leaves are written (about 36 more bytes per partly used leaf).

Differences from ``subr_blist.c``
---------------------------------
* Flat per-level lists instead of one preorder array with skip counts, and no
  hint on leaves (a word's runs are cheaper to recompute than to maintain).
* Meta nodes count free slots (the 2001 blist's ``bmu_avail``), not the modern
  bitmap of non-empty children.
* ``bighint`` is capped at ``BLIST_MAX_ALLOC``, and ``free`` raises it to the
  merged run's length rather than to the maximum.
* ``alloc`` takes an exact count (no modern ``maxcount`` range).  Runs cross
  any leaf boundary, as the modern allocator's do (the 2001 one's never did).
* Freeing a free slot raises ``BlistFreeError``, where the kernel panics;
  ``fill`` returns how many slots it took, like ``blist_fill``.

Locking: none.  A ``Blist`` is owned by the swap pager, which serialises every
call under its own lock; no method blocks, sleeps or does I/O.  The only I/O in
this module is the debugging shell ``main()`` (``python -m
nbdcache.swap.blist``), which, like the test ``main`` of ``subr_blist.c``, is
never used by the pager.
"""

from __future__ import annotations

BLIST_BMAP_RADIX = 64       # slots per leaf word
BLIST_META_RADIX = 16       # children per meta node
BLIST_MAX_ALLOC = 32        # largest run alloc() hands out (and the cap of every bighint)
SWAPBLK_NONE = -1           # "no slot" (sys/blist.h)

_BMAP_SHIFT = 6             # log2(BLIST_BMAP_RADIX)
_META_SHIFT = 4             # log2(BLIST_META_RADIX)
_BMAP_MASK = BLIST_BMAP_RADIX - 1
_WORD_ALL = (1 << BLIST_BMAP_RADIX) - 1


def _run_shifts(count: int) -> tuple[int, ...]:
    """Shift amounts turning a word into its "run of ``count`` set bits starts here" mask.

    After ``r &= r >> s`` for each ``s``, bit p of ``r`` is set iff bits
    ``p .. p+count-1`` were all set: each step at most doubles the run length
    covered, so 32 needs five steps.
    """
    shifts = []
    have = 1
    while have < count:
        step = min(have, count - have)
        shifts.append(step)
        have += step
    return tuple(shifts)


_SHIFTS = tuple(_run_shifts(n) for n in range(BLIST_MAX_ALLOC + 1))


class BlistError(ValueError):
    """A caller passed a bad argument: size, slot range or allocation count."""


class BlistFreeError(BlistError):
    """``free`` named a slot that is already free (the kernel panics: "freeing free block")."""


class BlistInvariantError(AssertionError):
    """The tree contradicts one of its invariants (the KASSERT habit)."""


class Blist:
    """A bitmap allocator of ``nblocks`` swap slots; see the module docstring.

    Not thread-safe: the owner serialises calls.  No method blocks.
    """

    __slots__ = ("nblocks", "cursor", "nvisits", "_depth", "_radix", "_leaves", "_avail",
                 "_hint")

    def __init__(self, nblocks: int) -> None:
        """All of ``0 .. nblocks-1`` free (``blist_create`` then ``blist_free``).  O(nblocks/64)."""
        if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 1:
            raise BlistError(f"a blist needs at least one slot, not {nblocks!r}")
        self.nblocks = nblocks
        self.cursor = 0             # next-fit start of the next search
        self.nvisits = 0            # statistic: meta nodes entered by alloc()

        # Level sizes: leaves, then ceil(/16) per level up to a single root
        # (at least one meta level, so the root is always a meta node).
        sizes = [-(-nblocks >> _BMAP_SHIFT)]
        while sizes[-1] > 1 or len(sizes) == 1:
            sizes.append(-(-sizes[-1] >> _META_SHIFT))
        depth = len(sizes) - 1
        self._depth = depth
        self._radix = [BLIST_BMAP_RADIX << (_META_SHIFT * lvl) for lvl in range(depth + 1)]

        full, rem = divmod(nblocks, BLIST_BMAP_RADIX)
        leaves = [_WORD_ALL] * full
        if rem:
            leaves.append((1 << rem) - 1)
        leaves.extend([0] * (BLIST_META_RADIX * sizes[1] - len(leaves)))
        self._leaves = leaves

        self._avail: list[list[int]] = [[]]      # index 0 unused: leaves carry no counters
        self._hint: list[list[int]] = [[]]
        for lvl in range(1, depth + 1):
            radix = self._radix[lvl]
            length = BLIST_META_RADIX * sizes[lvl + 1] if lvl < depth else 1
            full, rem = divmod(nblocks, radix)
            avail = [radix] * full
            if rem:
                avail.append(rem)
            avail.extend([0] * (length - len(avail)))
            self._avail.append(avail)
            # free slots of a node are a prefix of it or the whole of it, so the
            # longest run starting inside is min(32, avail), exactly
            self._hint.append([min(BLIST_MAX_ALLOC, a) for a in avail])

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return self.nblocks

    @property
    def avail(self) -> int:
        """Number of free slots (the kernel's ``vm_swap_size`` mirrors it)."""
        return self._avail[self._depth][0]

    @property
    def depth(self) -> int:
        """Number of meta levels above the leaves."""
        return self._depth

    def is_free(self, slot: int) -> bool:
        """True if ``slot`` is free."""
        self._check_range(slot, 1)
        return bool(self._leaves[slot >> _BMAP_SHIFT] >> (slot & _BMAP_MASK) & 1)

    def free_bitmap(self) -> int:
        """The whole free map as one int, bit *i* set when slot *i* is free.  O(nblocks)."""
        raw = b"".join(w.to_bytes(8, "little") for w in self._leaves)
        return int.from_bytes(raw, "little")

    def __repr__(self) -> str:
        return f"<Blist nblocks={self.nblocks} avail={self.avail} cursor={self.cursor}>"

    # --------------------------------------------------------------- allocation

    def alloc(self, count: int) -> int:
        """Allocate ``count`` contiguous slots; return the first, or ``SWAPBLK_NONE``.

        ``blist_alloc()``: first fit from the cursor, then from slot 0.  Fails
        only when no free run of ``count`` slots exists.  Raises ``BlistError``
        unless ``1 <= count <= BLIST_MAX_ALLOC``.  Does not block.
        """
        if not isinstance(count, int) or not 1 <= count <= BLIST_MAX_ALLOC:
            raise BlistError(f"alloc count must be 1..{BLIST_MAX_ALLOC}, not {count!r}")
        depth = self._depth
        if self._hint[depth][0] < count:
            return SWAPBLK_NONE
        cursor = self.cursor
        slot = self._meta_alloc(depth, 0, count, cursor)
        if slot < 0 and cursor:
            slot = self._meta_alloc(depth, 0, count, 0)
        if slot < 0:
            return SWAPBLK_NONE
        self._take(slot, count)
        end = slot + count
        self.cursor = end if end < self.nblocks else 0
        return slot

    def _meta_alloc(self, level: int, node: int, count: int, lo: int) -> int:
        """Search meta node ``node`` of ``level`` for a run starting at a slot >= ``lo``.

        ``blst_meta_alloc()``.  Lowers the node's bighint when the search
        covered the whole node and failed.
        """
        self.nvisits += 1
        first = node << _META_SHIFT
        end = first + BLIST_META_RADIX
        child_radix = self._radix[level - 1]
        whole = lo <= first * child_radix
        start = first if whole else lo // child_radix
        if level == 1:
            slot = self._leaf_alloc(start, end, count, lo)
            if slot < 0 and whole:
                self._hint[1][node] = count - 1
            return slot
        hints = self._hint[level - 1]
        for child in range(start, end):
            if hints[child] >= count:
                slot = self._meta_alloc(level - 1, child, count, lo)
                if slot >= 0:
                    return slot
        if whole:
            # every child now has bighint < count (skipped, or lowered by its own
            # failed full search), so their maximum is a valid, tighter hint
            self._hint[level][node] = max(hints[first:end])
        return SWAPBLK_NONE

    def _leaf_alloc(self, start: int, end: int, count: int, lo: int) -> int:
        """First run of ``count`` free slots starting in words ``start..end-1`` at a slot >= ``lo``.

        ``blst_leaf_alloc()``, for 16 sibling words at once.  A run may
        continue into the following word, whoever its parent is.
        """
        leaves = self._leaves
        nleaves = len(leaves)
        shifts = _SHIFTS[count]
        spill = (1 << (count - 1)) - 1          # low bits of the next word a run may use
        for i in range(start, end):
            word = leaves[i]
            if not word:
                continue
            base = i << _BMAP_SHIFT
            if lo > base:
                word &= -1 << (lo - base)       # runs must start at or after lo
            if count > 1 and word >> (BLIST_BMAP_RADIX - 1) and i + 1 < nleaves:
                word |= (leaves[i + 1] & spill) << BLIST_BMAP_RADIX
            run = word
            for s in shifts:
                run &= run >> s
            run &= _WORD_ALL                    # the run must start in this word
            if run:
                return base + (run & -run).bit_length() - 1
        return SWAPBLK_NONE

    def _take(self, slot: int, count: int) -> None:
        """Mark the run found by ``alloc`` allocated (at most two words)."""
        leaves = self._leaves
        i = slot >> _BMAP_SHIFT
        bit = slot & _BMAP_MASK
        bits = ((1 << count) - 1) << bit
        leaves[i] &= ~bits
        if bit + count <= BLIST_BMAP_RADIX:
            self._adjust(i, -count)
        else:
            leaves[i + 1] &= ~(bits >> BLIST_BMAP_RADIX)
            self._adjust(i, bit - BLIST_BMAP_RADIX)
            self._adjust(i + 1, BLIST_BMAP_RADIX - bit - count)

    # ----------------------------------------------------------- free and fill

    def free(self, slot: int, count: int) -> None:
        """Return ``[slot, slot+count)`` to the free pool (``blist_free()``).

        Any length is accepted.  Raises ``BlistFreeError``, changing nothing,
        if any slot of the range is already free.  Does not block.
        """
        self._check_range(slot, count)
        end = slot + count
        leaves = self._leaves
        masks = list(self._masks(slot, end))
        for i, mask in masks:
            clash = leaves[i] & mask
            if clash:
                bad = (i << _BMAP_SHIFT) + (clash & -clash).bit_length() - 1
                raise BlistFreeError(f"freeing free slot {bad} (free({slot}, {count}))")
        for i, mask in masks:
            leaves[i] |= mask
        self._account([(i, mask.bit_count()) for i, mask in masks])

        # raise the hints of every node where a run now starts that the free lengthened
        left = self._run_before(slot)
        right = self._run_after(end)
        length = min(BLIST_MAX_ALLOC, left + count + right)
        first_leaf = (slot - left) >> _BMAP_SHIFT
        last_leaf = (end - 1) >> _BMAP_SHIFT
        for lvl in range(1, self._depth + 1):
            first_leaf >>= _META_SHIFT
            last_leaf >>= _META_SHIFT
            hint = self._hint[lvl]
            for j in range(first_leaf, last_leaf + 1):
                if hint[j] < length:
                    hint[j] = length

    def fill(self, slot: int, count: int) -> int:
        """Mark ``[slot, slot+count)`` allocated; return how many were free before.

        ``blist_fill()``: already allocated slots are left alone.  Hints stay
        valid (allocating never lengthens a run).  Does not block.
        """
        self._check_range(slot, count)
        leaves = self._leaves
        deltas = []
        taken = 0
        for i, mask in self._masks(slot, slot + count):
            hit = leaves[i] & mask
            if hit:
                leaves[i] ^= hit
                n = hit.bit_count()
                taken += n
                deltas.append((i, -n))
        self._account(deltas)
        return taken

    def _check_range(self, slot: int, count: int) -> None:
        if (not isinstance(slot, int) or not isinstance(count, int) or count < 1
                or slot < 0 or slot + count > self.nblocks):
            raise BlistError(f"range ({slot!r}, {count!r}) is not inside 0..{self.nblocks - 1}")

    @staticmethod
    def _masks(start: int, end: int):
        """Yield ``(leaf, mask)`` for the bits of ``[start, end)``, one word at a time."""
        first = start >> _BMAP_SHIFT
        last = (end - 1) >> _BMAP_SHIFT
        lo = start & _BMAP_MASK
        hi = ((end - 1) & _BMAP_MASK) + 1
        if first == last:
            yield first, ((1 << (hi - lo)) - 1) << lo
            return
        yield first, _WORD_ALL ^ ((1 << lo) - 1)
        for i in range(first + 1, last):
            yield i, _WORD_ALL
        yield last, (1 << hi) - 1

    def _account(self, deltas: list[tuple[int, int]]) -> None:
        """Propagate per-leaf changes of free count up the tree."""
        if len(deltas) <= 2:
            for leaf, delta in deltas:
                self._adjust(leaf, delta)
        else:
            self._recount(deltas[0][0], deltas[-1][0])

    def _adjust(self, leaf: int, delta: int) -> None:
        """Add ``delta`` to the avail of each ancestor of ``leaf``; an empty node gets bighint 0."""
        j = leaf
        avail = self._avail
        hint = self._hint
        for lvl in range(1, self._depth + 1):
            j >>= _META_SHIFT
            row = avail[lvl]
            v = row[j] + delta
            row[j] = v
            if not v:
                hint[lvl][j] = 0

    def _recount(self, first_leaf: int, last_leaf: int) -> None:
        """Recompute avail of the ancestors of leaves ``first_leaf..last_leaf`` (long ranges)."""
        leaves = self._leaves
        lo, hi = first_leaf, last_leaf
        for lvl in range(1, self._depth + 1):
            lo >>= _META_SHIFT
            hi >>= _META_SHIFT
            row = self._avail[lvl]
            hint = self._hint[lvl]
            below = self._avail[lvl - 1]
            for j in range(lo, hi + 1):
                kids = slice(j << _META_SHIFT, (j + 1) << _META_SHIFT)
                if lvl == 1:
                    a = sum(w.bit_count() for w in leaves[kids])
                else:
                    a = sum(below[kids])
                row[j] = a
                if not a:
                    hint[j] = 0

    def _bits(self, start: int, n: int) -> int:
        """Bits ``[start, start+n)`` of the free map, ``n <= 64``, bit 0 = ``start``."""
        i = start >> _BMAP_SHIFT
        bit = start & _BMAP_MASK
        word = self._leaves[i] >> bit
        if bit + n > BLIST_BMAP_RADIX:
            word |= self._leaves[i + 1] << (BLIST_BMAP_RADIX - bit)
        return word & ((1 << n) - 1)

    def _run_before(self, slot: int) -> int:
        """Free slots immediately before ``slot``, capped at BLIST_MAX_ALLOC."""
        n = min(slot, BLIST_MAX_ALLOC)
        if not n:
            return 0
        holes = ~self._bits(slot - n, n) & ((1 << n) - 1)
        return n - holes.bit_length()

    def _run_after(self, slot: int) -> int:
        """Free slots from ``slot`` on, capped at BLIST_MAX_ALLOC."""
        n = min(self.nblocks - slot, BLIST_MAX_ALLOC)
        if n <= 0:
            return 0
        holes = ~self._bits(slot, n) & ((1 << n) - 1)
        return n if not holes else (holes & -holes).bit_length() - 1

    # --------------------------------------------------------------- checking

    def _leaf_run(self, i: int) -> int:
        """Longest free run (capped) starting in word ``i``, continuing into word ``i+1``."""
        leaves = self._leaves
        word = leaves[i]
        if i + 1 < len(leaves):
            word |= (leaves[i + 1] & ((1 << (BLIST_MAX_ALLOC - 1)) - 1)) << BLIST_BMAP_RADIX
        run = 0
        while run < BLIST_MAX_ALLOC and word & _WORD_ALL:
            run += 1
            word &= word >> 1
        return run

    def check_invariants(self) -> None:
        """Raise ``BlistInvariantError`` unless invariants 1-4 of the module docstring hold.

        O(nblocks / 64 * 32): meant for tests and the shell, not the hot path.
        """
        def fail(msg: str) -> None:
            raise BlistInvariantError(msg)

        leaves = self._leaves
        full, rem = divmod(self.nblocks, BLIST_BMAP_RADIX)
        for i, w in enumerate(leaves):
            if not 0 <= w <= _WORD_ALL:
                fail(f"leaf {i} holds {w!r}, not a 64-bit word")
            if (i > full and w) or (i == full and w >> rem):
                fail(f"leaf {i} marks slots past nblocks={self.nblocks} free: {w:#x}")
        below = [w.bit_count() for w in leaves]
        runs = [self._leaf_run(i) for i in range(len(leaves))]
        for lvl in range(1, self._depth + 1):
            avail, hint = self._avail[lvl], self._hint[lvl]
            radix = self._radix[lvl]
            level_runs = []
            for j in range(len(avail)):
                kids = slice(j << _META_SHIFT, (j + 1) << _META_SHIFT)
                want = sum(below[kids])
                longest = max(runs[kids], default=0)
                level_runs.append(longest)
                where = f"level {lvl} node {j} [{j * radix}, {(j + 1) * radix})"
                if avail[j] != want:
                    fail(f"{where}: avail {avail[j]} != {want}, the sum of its children")
                if not 0 <= hint[j] <= BLIST_MAX_ALLOC:
                    fail(f"{where}: bighint {hint[j]} outside 0..{BLIST_MAX_ALLOC}")
                if hint[j] < longest:
                    fail(f"{where}: bighint {hint[j]} < {longest}, a free run starting "
                         f"below it, which the search would never find")
            below, runs = avail, level_runs
        total = sum(w.bit_count() for w in leaves)
        if self.avail != total:
            fail(f"root avail {self.avail} != {total} free bits")
        if not 0 <= self.cursor < self.nblocks:
            fail(f"cursor {self.cursor} outside 0..{self.nblocks - 1}")

    # --------------------------------------------------------------- printing

    def dump(self) -> str:
        """The tree as text, runs of uniform siblings collapsed (``blist_print()``)."""
        d = self._depth
        lines = [f"BLIST nblocks={self.nblocks} avail={self.avail} cursor={self.cursor} "
                 f"depth={d} radix={self._radix[d]} (leaf words: 1 = free)"]
        self._dump_node(d, 0, 1, lines)
        return "\n".join(lines)

    def _span(self, level: int, index: int) -> tuple[int, int]:
        start = index * self._radix[level]
        return start, min(self.nblocks, start + self._radix[level])

    def _node_avail(self, level: int, index: int) -> int:
        if level == 0:
            return self._leaves[index].bit_count()
        return self._avail[level][index]

    def _dump_node(self, level: int, node: int, indent: int, lines: list[str]) -> None:
        pad = "  " * indent
        start, end = self._span(level, node)
        if level == 0:
            lines.append(f"{pad}leaf [{start}, {end}) {self._leaves[node]:016x}")
            return
        lines.append(f"{pad}meta [{start}, {end}) avail={self._avail[level][node]} "
                     f"bighint={self._hint[level][node]}")
        group: list = []                    # [state, start, end] of uniform siblings

        def flush() -> None:
            if group:
                lines.append(f"{pad}  [{group[1]}, {group[2]}) all {group[0]}")
                group.clear()

        for child in range(node << _META_SHIFT, (node + 1) << _META_SHIFT):
            cstart, cend = self._span(level - 1, child)
            if cstart >= self.nblocks:
                break
            a = self._node_avail(level - 1, child)
            state = "free" if a == cend - cstart else "allocated" if a == 0 else None
            if state is not None and group and group[0] == state:
                group[2] = cend
                continue
            flush()
            if state is not None:
                group.extend([state, cstart, cend])
            else:
                self._dump_node(level - 1, child, indent + 1, lines)
        flush()


# ------------------------------------------------------------------ debug shell

_HELP = """commands:
  a N         allocate N contiguous slots (1..32), print the first or -1
  f SLOT N    free N slots from SLOT
  l SLOT N    fill: mark N slots from SLOT allocated, print how many were free
  p           print the tree
  c           check invariants
  h           this help
  q           quit"""


class _Usage(Exception):
    """A command line the shell does not understand."""


def _ints(args: list[str], names: tuple[str, ...]) -> list[int]:
    if len(args) != len(names):
        raise _Usage(f"expected {' '.join(names)}, got {' '.join(args) or 'nothing'}")
    try:
        return [int(a, 0) for a in args]
    except ValueError:
        raise _Usage(f"expected integers for {' '.join(names)}, got {' '.join(args)}") from None


def _command(bl: Blist, cmd: str, args: list[str], out) -> bool:
    """Run one shell command; return False to quit."""
    if cmd == "a":
        (n,) = _ints(args, ("N",))
        slot = bl.alloc(n)
        print(slot if slot != SWAPBLK_NONE else f"{SWAPBLK_NONE} (no free run of {n})", file=out)
    elif cmd == "f":
        slot, n = _ints(args, ("SLOT", "N"))
        bl.free(slot, n)
        print(f"freed [{slot}, {slot + n})", file=out)
    elif cmd == "l":
        slot, n = _ints(args, ("SLOT", "N"))
        print(f"filled [{slot}, {slot + n}): {bl.fill(slot, n)} were free", file=out)
    elif cmd == "p":
        _ints(args, ())
        print(bl.dump(), file=out)
    elif cmd == "c":
        _ints(args, ())
        bl.check_invariants()
        print("ok", file=out)
    elif cmd in ("h", "?"):
        print(_HELP, file=out)
    elif cmd == "q":
        return False
    else:
        raise _Usage(f"unknown command {cmd!r} (h for help)")
    return True


def main(argv: list[str] | None = None, stdin=None, stdout=None, stderr=None) -> int:
    """``python -m nbdcache.swap.blist [NBLOCKS]``: a shell on one tree, read from stdin.

    Exit status 0, or 1 if any command was rejected or a check failed (so a
    script can tell), 2 for a bad NBLOCKS.
    """
    import sys
    argv = sys.argv[1:] if argv is None else argv
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        if len(argv) > 1:
            raise ValueError
        bl = Blist(int(argv[0], 0) if argv else 1024)
    except (ValueError, BlistError):
        print("usage: python -m nbdcache.swap.blist [NBLOCKS]   (NBLOCKS >= 1, default 1024)",
              file=stderr)
        return 2
    interactive = stdin.isatty()
    print(f"BLIST representing {bl.nblocks} slots, depth {bl.depth}; h for help", file=stdout)
    status = 0
    while True:
        if interactive:
            print(f"{bl.avail}/{bl.nblocks}> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            if not _command(bl, words[0], words[1:], stdout):
                break
        except (_Usage, BlistError, BlistInvariantError) as e:
            print(f"error: {e}", file=stderr)
            status = 1
        stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
