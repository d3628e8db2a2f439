"""Buffer headers, their flags and queues, and per-sector validity masks.

A ``Buf`` caches one block of ``block_size`` bytes of the disk.  Its memory is a
fixed slice of the arena (one anonymous mmap allocated at startup), so a buffer
never changes size: the kernel's ``allocbuf`` resizing and ``B_VMIO`` page
juggling disappear, and "memory attached" simply means "not on EMPTY".

Validity and dirtiness are tracked per 4 KiB sector as two bitmasks (Python
ints; bit *i* is sector *i* of the block):

* ``valid``: the sector holds the disk's current contents (read from the
  backend, or written by the guest).  ``B_CACHE`` is set exactly when every
  sector is valid: the kernel's "contents fully valid".
* ``dirty``: the sector was written by the guest and not yet written back.
  ``dirty`` is always a subset of ``valid``; ``B_DELWRI`` is set exactly when
  ``dirty`` is non-zero.

A fill-in read only ever writes invalid sectors, which is what the kernel's
``bogus_page`` substitution protects.

Two per-buffer states replace the kernel's buffer lock:

* ``busy``: an owner is filling or changing the buffer outside the engine
  lock (a miss being read, a partial write being read-modified); nobody else
  may touch its data, and ``getblk`` waits for it.
* ``writing``: a snapshot of the buffer is being written back.  Guest writes
  may continue (they bump ``gen``); completion clears ``B_DELWRI`` only if
  ``gen`` did not move, so a block rewritten during its write-back stays
  dirty.  At most one write of a buffer is in flight.
"""

from __future__ import annotations

SECTOR_SHIFT = 12
SECTOR = 1 << SECTOR_SHIFT

# Flags, with the kernel's meaning where one applies (vfs_bio.c, SEED-CATALOGUE A2).
B_DELWRI = 0x001    # dirty: written by the guest, not yet on the backend
B_CACHE = 0x002     # every sector valid
B_INVAL = 0x004     # contents junk; the buffer is being destroyed
B_ERROR = 0x008     # the last I/O failed (a dirty buffer keeps its data and is retried)
B_AGE = 0x010       # second chance used: recycle first (set on written-back and read-ahead)
B_HEAVY = 0x020     # heavy-weight: queued on DIRTY_HW and served by buf_daemon_hw
B_NOCACHE = 0x040   # destroy on release, discarding dirty data (TRIM / WRITE_ZEROES)
B_RAM = 0x080       # filled by read-ahead and not yet read by the guest

FLAG_NAMES = {B_DELWRI: "B_DELWRI", B_CACHE: "B_CACHE", B_INVAL: "B_INVAL",
              B_ERROR: "B_ERROR", B_AGE: "B_AGE", B_HEAVY: "B_HEAVY",
              B_NOCACHE: "B_NOCACHE", B_RAM: "B_RAM"}

# Queues (BQUEUE_* in the kernel).  A buffer is on exactly one, or on none while
# it is busy or being written.
QUEUE_NONE, QUEUE_CLEAN, QUEUE_DIRTY, QUEUE_DIRTY_HW, QUEUE_EMPTY = range(5)
QUEUE_NAMES = ("NONE", "CLEAN", "DIRTY", "DIRTY_HW", "EMPTY")


class Buf:
    """One buffer header.  Every field is guarded by the engine lock."""

    __slots__ = ("index", "data", "blkno", "flags", "qindex", "valid", "dirty", "gen",
                 "wgen", "busy", "writing", "errors", "retry_at")

    def __init__(self, index: int, data: memoryview) -> None:
        self.index = index
        self.data = data            # the arena slice; never reallocated
        self.blkno = -1             # block number (b_loffset / block_size), -1 if none
        self.flags = B_INVAL
        self.qindex = QUEUE_NONE
        self.valid = 0
        self.dirty = 0
        self.gen = 0                # bumped by every guest modification
        self.wgen = 0               # gen of the snapshot being written back
        self.busy = False
        self.writing = False
        self.errors = 0             # consecutive failed write-backs
        self.retry_at = 0.0         # no write-back retry before this clock time

    def __repr__(self) -> str:
        flags = "|".join(n for f, n in FLAG_NAMES.items() if self.flags & f) or "0"
        return (f"<Buf #{self.index} blk={self.blkno} {flags} q={QUEUE_NAMES[self.qindex]} "
                f"valid={self.valid:#x} dirty={self.dirty:#x}"
                f"{' busy' if self.busy else ''}{' writing' if self.writing else ''}>")


def sector_span(start: int, end: int) -> int:
    """Mask of the sectors that bytes [start, end) of a block touch (end > start)."""
    first = start >> SECTOR_SHIFT
    last = (end - 1) >> SECTOR_SHIFT
    return ((1 << (last - first + 1)) - 1) << first


def sector_cover(start: int, end: int, limit: int) -> int:
    """Mask of the sectors that bytes [start, end) of a block overwrite entirely.

    ``limit`` is the block's length on the disk: a last sector cut short by the
    end of the disk counts as covered when the write reaches the end.
    """
    first = (start + SECTOR - 1) >> SECTOR_SHIFT
    if end >= limit:
        last = (limit + SECTOR - 1) >> SECTOR_SHIFT
    else:
        last = end >> SECTOR_SHIFT
    if last <= first:
        return 0
    return ((1 << (last - first)) - 1) << first


def runs(mask: int) -> list[tuple[int, int]]:
    """The maximal runs of set bits of ``mask`` as (first sector, sector count)."""
    out = []
    i = 0
    while mask:
        if mask & 1:
            n = 0
            while mask & 1:
                mask >>= 1
                n += 1
            out.append((i, n))
            i += n
        else:
            low = (mask & -mask).bit_length() - 1
            mask >>= low
            i += low
    return out
