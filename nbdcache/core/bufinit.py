"""Derived defaults of the buffer cache, all in one function, as the kernel's ``bufinit()``.

DragonFly sizes the cache from physical memory (``nbuf`` in ``cpu_startup``) and
then derives every watermark from ``maxbufspace`` in ``bufinit()`` (vfs_bio.c
L605–710).  Here the RAM budget is given directly (``cache.ram``) and plays
``maxbufspace``; ``cache.block_size`` plays ``MAXBSIZE``.  Every value may be
overridden in the configuration; an override does not re-derive the others
(as writing a sysctl does not).

Byte thresholds on dirty data are compared against ``dirtykvaspace``, which the
kernel counts as 64 KiB (the KVA reservation) per dirty buffer.  The user-space
equivalent is ``block_size`` per dirty buffer: the memory a dirty buffer pins,
whatever number of its sectors is dirty.
"""

from __future__ import annotations

from typing import Any, Mapping

MiB = 1024 * 1024


def bufinit(cfg: Any) -> dict[str, int]:
    """Return the cache's sizes and watermarks for a validated Config (or a mapping of keys)."""
    get = cfg.get if isinstance(cfg, Mapping) else cfg.values.get
    bs = get("cache.block_size")
    maxbufspace = get("cache.ram") // bs * bs       # L663: nbuf * NBUFCALCSIZE; whole buffers
    nbuf = maxbufspace // bs
    # L664: keep 10 buffers (or a quarter) above hibufspace for buf_daemon_hw's page-ins.
    hibufspace = get("cache.hibufspace") or max(3 * maxbufspace // 4, maxbufspace - 10 * bs)
    lobufspace = get("cache.lobufspace")
    if lobufspace is None:
        lobufspace = hibufspace * 7 // 8            # L665: 1/8 hysteresis ...
        if hibufspace - lobufspace > 64 * MiB:      # L666: ... but at most 64 MiB per pass
            lobufspace = hibufspace - 64 * MiB
        if lobufspace > hibufspace - bs:            # L668: and at least one buffer
            lobufspace = hibufspace - bs
    hidirty = get("cache.hidirtybufspace") or hibufspace // 2        # L683: dirty + running
    hirunning = get("cache.hirunningspace") or max(hibufspace // 16, 1 * MiB)  # L684–686
    lodirty = get("cache.lodirtybufspace") or hidirty // 2           # L692
    return {
        "block_size": bs,
        "nbuf": nbuf,
        "maxbufspace": maxbufspace,
        "hibufspace": hibufspace,
        "lobufspace": lobufspace,
        "hidirtybufspace": hidirty,
        "lodirtybufspace": lodirty,
        "hirunningspace": hirunning,
    }


def midpoints(params: Mapping[str, int]) -> tuple[int, int]:
    """``bd_heatup``'s mid1 (kick the daemons) and mid2 (hold writers), vfs_bio.c L418–435."""
    lo, hi = params["lodirtybufspace"], params["hidirtybufspace"]
    mid1 = lo + (hi - lo) // 2
    mid2 = mid1 + (hi - mid1) // 2
    return mid1, mid2
