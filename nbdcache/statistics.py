"""Statistics: one table naming every number the server reports.

Theory of operation
-------------------
``STATISTICS`` below is the only place a statistic is described, as
``config.TUNABLES`` is for settings.  Each entry gives the name under which
``Engine.stats()`` returns it, its group, its unit, its kind (``counter``: only
ever grows while the server runs; ``gauge``: goes up and down; ``histogram``: a
latency distribution from ``nbdcache.histogram``), the kernel variable or
function it descends from, and a one-line meaning.  From that table come:

* ``docs/statistics.md`` (:func:`statistics_markdown`), which a test compares
  with the committed file, and which also fails when ``Engine.stats()``
  returns a name the table lacks;
* the grouping, units and rates of ``nbdcache stats`` (``nbdcache.cli_observe``);
* the names, types and help strings of the Prometheus metrics
  (``nbdcache.metrics``): ``nbdcache_<name>``.

Names follow the kernel where there is a kernel counterpart (``bufspace``,
``dirtykvaspace``, ``getnewbufcalls``); swap statistics are prefixed ``swap_``
and latency histograms ``latency_``.  Swap statistics are declared ahead of the
swap pager that will report them; an entry whose name ``Engine.stats()`` does
not return is simply absent from the output.

Nothing here reads the engine or blocks; the module holds data and pure functions.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

GROUPS: tuple[str, ...] = ("buffer cache", "throttle", "daemons", "backend", "swap", "latency")
KINDS: tuple[str, ...] = ("counter", "gauge", "histogram")
UNITS: tuple[str, ...] = ("bytes", "buffers", "blocks", "slots", "count", "seconds", "ratio",
                          "flag")


@dataclasses.dataclass(frozen=True)
class Statistic:
    name: str
    group: str
    unit: str
    kind: str
    help: str
    ancestor: str = ""              # the kernel variable or function it descends from

    def __post_init__(self) -> None:
        if self.group not in GROUPS or self.kind not in KINDS or self.unit not in UNITS:
            raise ValueError(f"statistic {self.name}: bad group, kind or unit")


def _s(group: str) -> Any:
    def make(name: str, unit: str, kind: str, ancestor: str, help: str) -> Statistic:
        return Statistic(name, group, unit, kind, help, ancestor)
    return make


_C = _s("buffer cache")
_T = _s("throttle")
_D = _s("daemons")
_B = _s("backend")
_W = _s("swap")
_L = _s("latency")

STATISTICS: tuple[Statistic, ...] = (
    # -- buffer cache: sizes, occupancy, lookups (vfs_bio.c L128-153, A3)
    _C("nbuf", "buffers", "gauge", "nbuf", "Buffers in the arena (cache.ram / block_size)."),
    _C("block_size", "bytes", "gauge", "MAXBSIZE", "Size of one buffer (cache.block_size)."),
    _C("maxbufspace", "bytes", "gauge", "maxbufspace",
       "The arena: nbuf * block_size, the most buffer memory there can be."),
    _C("hibufspace", "bytes", "gauge", "hibufspace",
       "bufspace at which getnewbuf starts recycling clean buffers."),
    _C("lobufspace", "bytes", "gauge", "lobufspace",
       "bufspace that recycling brings the cache back down to."),
    _C("bufspace", "bytes", "gauge", "bufspace",
       "Memory attached to buffers that hold a block (clean, dirty or busy)."),
    _C("flushingbufs", "flag", "gauge", "flushingbufs",
       "1 while getnewbuf is recycling down from hibufspace to lobufspace."),
    _C("getnewbufcalls", "count", "counter", "getnewbufcalls",
       "Calls of getnewbuf: a buffer was needed for a block not in the cache."),
    _C("getnewbuf_waits", "count", "counter", "needsbuffer",
       "getnewbuf found no clean or empty buffer, kicked the daemons and waited."),
    _C("recycled", "buffers", "counter", "vfs_vmio_release",
       "Clean buffers whose block was dropped so the buffer could be reused."),
    _C("queue_empty", "buffers", "gauge", "BQUEUE_EMPTY",
       "Buffers on the EMPTY queue: no block, no memory counted in bufspace."),
    _C("queue_clean", "buffers", "gauge", "BQUEUE_CLEAN",
       "Buffers on the CLEAN queue: valid data, the recycling source (LRU, second chance)."),
    _C("queue_dirty", "buffers", "gauge", "BQUEUE_DIRTY",
       "Buffers on the DIRTY queue, waiting for buf_daemon."),
    _C("queue_dirty_hw", "buffers", "gauge", "BQUEUE_DIRTY_HW",
       "Buffers on the DIRTY_HW queue (B_HEAVY), waiting for buf_daemon_hw."),
    _C("reads", "count", "counter", "",
       "Guest read requests (NBD_CMD_READ)."),
    _C("writes", "count", "counter", "",
       "Guest write requests (NBD_CMD_WRITE), FUA or not."),
    _C("hits", "blocks", "counter", "B_CACHE",
       "Block lookups served from the cache without backend I/O (one per block a request "
       "touches)."),
    _C("misses", "blocks", "counter", "bread",
       "Block lookups that had to read missing sectors from the backend."),
    _C("hit_ratio", "ratio", "gauge", "",
       "hits / (hits + misses) since start (nbdcache stats --watch and the plot show it per "
       "interval)."),
    _C("readahead", "blocks", "gauge", "breadn",
       "Blocks read ahead of a sequential stream (cache.readahead)."),
    _C("readahead_issued", "blocks", "counter", "breadn",
       "Blocks read ahead of a detected sequential read stream."),
    _C("readahead_hits", "blocks", "counter", "B_RAM",
       "Read-ahead blocks later read by the guest."),
    _C("discards", "count", "counter", "",
       "Guest TRIM and WRITE_ZEROES requests."),
    _C("discarded_dirty", "buffers", "counter", "B_NOCACHE|B_DELWRI",
       "Dirty buffers whose data a TRIM or WRITE_ZEROES made obsolete before write-back."),
    # -- throttle: dirty and running space, and the waits they cause (A3, A4)
    _T("dirtykvaspace", "bytes", "gauge", "dirtykvaspace",
       "block_size per dirty buffer: the quantity every dirty watermark is compared with."),
    _T("dirtybufspace", "bytes", "gauge", "dirtybufspace",
       "Bytes of dirty sectors (a statistic only, as in the kernel)."),
    _T("dirtybufspacehw", "bytes", "gauge", "dirtybufspacehw",
       "The B_HEAVY share of dirtybufspace."),
    _T("dirtybufcount", "buffers", "gauge", "dirtybufcount", "Dirty (B_DELWRI) buffers."),
    _T("dirtybufcounthw", "buffers", "gauge", "dirtybufcounthw",
       "Dirty B_HEAVY buffers (buf_daemon_hw's share)."),
    _T("runningbufspace", "bytes", "gauge", "runningbufspace",
       "Write-back bytes in flight to the backend."),
    _T("runningbufcount", "count", "gauge", "runningbufcount",
       "Write-back I/Os in flight to the backend."),
    _T("hidirtybufspace", "bytes", "gauge", "hidirtybufspace",
       "dirtykvaspace + runningbufspace above which guest writes wait in bd_wait "
       "(cache.hidirtybufspace)."),
    _T("lodirtybufspace", "bytes", "gauge", "lodirtybufspace",
       "dirtykvaspace + runningbufspace the daemons flush down to, half each "
       "(cache.lodirtybufspace)."),
    _T("hirunningspace", "bytes", "gauge", "hirunningspace",
       "In-flight write-back limit; the daemons pause above 4/6 of it (cache.hirunningspace)."),
    _T("bd_wait_blocks", "count", "counter", "bd_wait",
       "Guest writes that were held in bd_wait (write back-pressure)."),
    _T("bd_wait_seconds", "seconds", "counter", "bd_wait",
       "Time guest writes spent held in bd_wait, summed over writers."),
    _T("bd_speedup_kicks", "count", "counter", "bd_speedup",
       "Wake-ups of buf_daemon requested because dirty space passed lodirtybufspace."),
    _T("bd_wake_index", "count", "counter", "bd_wake_index",
       "Write-back progress clock: one tick per block_size retired (bd_signal)."),
    _T("waitrunningbufspace_blocks", "count", "counter", "waitrunningbufspace",
       "Times a daemon paused because more than 4/6 of hirunningspace was in flight."),
    # -- daemons: the write-back they do (A7)
    _D("uptime", "seconds", "gauge", "",
       "Seconds since the engine started its daemons."),
    _D("daemon_passes", "count", "counter", "buf_daemon",
       "Wake-ups of buf_daemon (kicked or on its interval)."),
    _D("daemon_hw_passes", "count", "counter", "buf_daemon_hw",
       "Wake-ups of buf_daemon_hw."),
    _D("flushperqueue", "buffers", "gauge", "flushperqueue",
       "Buffers one flushbufqueues pass may take (cache.flushperqueue)."),
    _D("max_io", "bytes", "gauge", "MAXPHYS",
       "Largest write-back cluster (cache.max_io)."),
    _D("writeback_clusters", "count", "counter", "cluster_awrite",
       "Backend writes issued by write-back, each a cluster of adjacent dirty buffers."),
    _D("writeback_bufs", "buffers", "counter", "flushbufqueues",
       "Dirty buffers written back."),
    _D("writeback_segments", "count", "counter", "cluster_awrite",
       "Contiguous dirty runs written back (a buffer may hold several)."),
    _D("writeback_bytes", "bytes", "counter", "runningbufspace",
       "Bytes written back to the backend."),
    _D("writeback_errors", "count", "counter", "B_ERROR",
       "Write-back I/Os that failed; their buffers stay dirty and are retried."),
    _D("writeback_mean_cluster_bufs", "buffers", "gauge", "cluster_awrite",
       "writeback_bufs / writeback_clusters since start."),
    # -- backend: reads and flushes the guest causes
    _B("backend_reads", "count", "counter", "VOP_STRATEGY",
       "Backend reads (misses and read-ahead)."),
    _B("backend_read_bytes", "bytes", "counter", "VOP_STRATEGY",
       "Bytes read from the backend."),
    _B("read_errors", "count", "counter", "B_ERROR", "Backend reads that failed."),
    _B("flushes", "count", "counter", "VOP_FSYNC",
       "Guest FLUSH requests: write back everything dirty, then flush the backend."),
    _B("flush_errors", "count", "counter", "VOP_FSYNC",
       "Guest FLUSH requests that failed (a write-back or the backend flush)."),
    _B("fua_writes", "count", "counter", "bwrite",
       "Guest writes with FUA, written back and flushed before the reply."),
    # -- swap (swap_pager.c; declared ahead of the swap pager)
    _W("swap_slots_total", "slots", "gauge", "nswap", "Slots on the swap device."),
    _W("swap_slots_used", "slots", "gauge", "nswap - vm_swap_size",
       "Slots holding a block (clean or dirty)."),
    _W("swap_slots_free", "slots", "gauge", "vm_swap_size", "Slots free for allocation."),
    _W("swap_clean_slots", "slots", "gauge", "swapcache",
       "Slots holding a copy of data the backend also has; dropping one loses nothing."),
    _W("swap_dirty_slots", "slots", "gauge", "swb_count",
       "Slots holding the only current copy of a block; written back before being dropped."),
    _W("swap_bad_slots", "slots", "gauge", "swp_pager_async_iodone",
       "Slots taken out of use after an I/O error on them."),
    _W("swap_lowat", "slots", "gauge", "nswap_lowat",
       "Free slots below which swap is almost full."),
    _W("swap_hiwat", "slots", "gauge", "nswap_hiwat",
       "Free slots above which almost-full clears (the hysteresis)."),
    _W("swap_pageouts", "count", "counter", "swap_pager_putpages",
       "Page-out requests: buffers pushed from RAM to swap."),
    _W("swap_pageout_runs", "count", "counter", "v_swapout",
       "Swap writes issued by page-out (each a contiguous run of slots)."),
    _W("swap_pageout_blocks", "blocks", "counter", "v_swappgsout", "Blocks written to swap."),
    _W("swap_pageins", "count", "counter", "swap_pager_getpages",
       "Page-in requests: blocks read back from swap into the cache."),
    _W("swap_pagein_runs", "count", "counter", "v_swapin",
       "Swap reads issued by page-in (each a contiguous run of slots)."),
    _W("swap_pagein_blocks", "blocks", "counter", "v_swappgsin", "Blocks read from swap."),
    _W("swap_hits", "blocks", "counter", "swap_pager_haspage",
       "Cache misses served from swap instead of the backend."),
    _W("swap_hit_ratio", "ratio", "gauge", "",
       "swap_hits / misses: the share of RAM misses that swap served."),
    _W("swap_pagein_neighbours", "blocks", "counter", "swap_pager_getpages",
       "Blocks paged in beside a requested one (same read), entering the cache cold."),
    _W("swap_read_fallbacks", "blocks", "counter", "",
       "Clean swap copies that could not be read; the backend was read instead."),
    _W("swap_spill_dirty", "blocks", "counter", "",
       "Dirty blocks paged out to swap instead of waiting for the backend."),
    _W("swap_spill_sync", "blocks", "counter", "",
       "Of swap_spill_dirty, those paged out by a guest write past mid2 (synchronous)."),
    _W("swap_spill_clean", "blocks", "counter", "vm.swapcache",
       "Clean blocks copied to swap before recycling (the swapcache)."),
    _W("swap_drained", "blocks", "counter", "buf_daemon_hw",
       "Dirty swap copies moved into heavy buffers and written back to the backend."),
    _W("swap_recycled_uncopied", "blocks", "counter", "",
       "Clean blocks recycled with no swap copy (the swapcache fell behind or is off)."),
    _W("swap_dev_slots_used", "slots", "gauge", "swdevt.sw_used",
       "Slots in use on swap device N, reported as swap_devN_slots_used (N = 0, 1, ... in swap.devices order)."),
    _W("swap_dev_slots_free", "slots", "gauge", "",
       "Slots free on swap device N, reported as swap_devN_slots_free."),
    _W("swap_almost_full", "flag", "gauge", "swap_pager_almost_full",
       "1 from when free slots fall below swap_lowat until they rise above swap_hiwat."),
    _W("swap_full", "flag", "gauge", "swap_pager_full",
       "1 after a slot allocation failed, until free slots are back at swap_lowat."),
    _W("swap_almost_full_transitions", "count", "counter", "swp_sizecheck",
       "Times swap_almost_full went from 0 to 1."),
    _W("swap_full_transitions", "count", "counter", "swp_sizecheck",
       "Times swap_full went from 0 to 1."),
    _W("swap_write_errors", "count", "counter", "swp_pager_async_iodone",
       "Swap writes that failed."),
    _W("swap_read_errors", "count", "counter", "swp_pager_async_iodone",
       "Swap reads that failed."),
    _W("swap_lost_dirty", "blocks", "counter", "",
       "Dirty blocks whose only copy, in swap, could not be read back: data lost."),
    _W("swap_unreadable_slots", "slots", "gauge", "",
       "Dirty entries flagged unreadable after a read error (reads of them fail with EIO "
       "until the block is rewritten or trimmed)."),
    _W("swap_pending_free", "slots", "gauge", "",
       "Freed slots held back until the page-in reading them completes."),
    _W("swap_pageout_inflight", "blocks", "gauge", "nsw_wcount_async",
       "Blocks in page-out runs written but not yet mapped."),
    _W("swap_pageout_failed", "blocks", "counter", "VM_PAGER_FAIL",
       "Page-out victims kept in RAM because no slot run could be allocated."),
    _W("swap_pageout_deferred", "blocks", "counter", "nsw_wcount_async",
       "Page-out victims returned because no write credit was free."),
    _W("swap_pageout_cancelled", "blocks", "counter", "",
       "Blocks modified or trimmed while their page-out was in flight (new slot freed)."),
    _W("swap_pagein_stale", "blocks", "counter", "",
       "Page-in results dropped because the block's mapping changed during the read."),
    _W("swap_unswapped", "count", "counter", "swap_pager_unswapped",
       "Swap copies freed because the guest modified the block in RAM."),
    _W("swap_freed_by_trim", "slots", "counter", "swp_pager_meta_free",
       "Slots freed by TRIM or WRITE_ZEROES."),
    _W("swap_trimmed_dirty", "blocks", "counter", "",
       "Dirty swap copies that a TRIM or WRITE_ZEROES made obsolete."),
    _W("swap_reclaimed_clean", "slots", "counter", "",
       "Clean copies given up to make room for dirty spill when almost full."),
    _W("swap_set_clean", "count", "counter", "",
       "Dirty slots turned clean once the block was written back to the backend."),
    _W("swap_deferred_frees", "count", "counter", "",
       "Slot frees deferred because a page-in was reading the slot."),
    _W("swap_pageout_mean_cluster", "blocks", "gauge", "v_swappgsout / v_swapout",
       "swap_pageout_blocks / swap_pageout_runs since start."),
    _W("swap_pagein_mean_cluster", "blocks", "gauge", "v_swappgsin / v_swapin",
       "swap_pagein_blocks / swap_pagein_runs since start."),
    _W("swap_dmmax", "slots", "gauge", "dmmax",
       "Interleave stripe: no swap I/O crosses a multiple of it."),
    _W("swap_cluster_max", "blocks", "gauge", "nsw_cluster_max",
       "Most blocks one page-out run may carry."),
    _W("swap_async_max", "count", "gauge", "swap_async_max",
       "Asynchronous page-out runs allowed in flight (as requested)."),
    _W("swap_async_credits", "count", "gauge", "nsw_wcount_async_max",
       "Asynchronous page-out credits in force (swap_async_max as clamped)."),
    _W("swap_async_inuse", "count", "gauge", "nsw_wcount_async",
       "Asynchronous page-out runs in flight."),
    _W("swap_sync_inuse", "count", "gauge", "nsw_wcount_sync",
       "Synchronous page-out runs in flight."),
    _W("swap_read_inuse", "count", "gauge", "nsw_rcount",
       "Page-in runs in flight."),
    # -- latency histograms (nbdcache.histogram), one per request kind
    _L("latency_read_hit", "seconds", "histogram", "",
       "Guest reads served entirely from the cache, from callback entry to return."),
    _L("latency_read_miss", "seconds", "histogram", "",
       "Guest reads that needed at least one backend (or swap) read."),
    _L("latency_write", "seconds", "histogram", "bd_wait",
       "Guest writes, including any time held in bd_wait and, with FUA, the write-back."),
    _L("latency_flush", "seconds", "histogram", "VOP_FSYNC",
       "Guest FLUSH requests: write back everything dirty and flush the backend."),
    _L("latency_trim", "seconds", "histogram", "", "Guest TRIM requests."),
    _L("latency_zero", "seconds", "histogram", "", "Guest WRITE_ZEROES requests."),
)

BY_NAME: dict[str, Statistic] = {s.name: s for s in STATISTICS}

#: Groups whose statistics the engine may not report yet (their subsystem is
#: optional or not wired); every other entry must be in ``Engine.stats()``.
OPTIONAL_GROUPS = ("swap", "latency")


_DEV_RE = re.compile(r"^swap_dev\d+_")


def lookup(name: str) -> Statistic | None:
    """The table entry of ``name``; per-device names ``swap_dev3_...`` map to ``swap_dev_...``."""
    st = BY_NAME.get(name)
    if st is None and name.startswith("swap_dev"):
        st = BY_NAME.get(_DEV_RE.sub("swap_dev_", name))
    return st


def grouped(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``names`` grouped in table order; names not in the table come last, under "other"."""
    names = set(names)
    out = []
    for g in GROUPS:
        members = [s.name for s in STATISTICS if s.group == g and s.name in names]
        if members:
            out.append((g, members))
    unknown = sorted(n for n in names if n not in BY_NAME)
    if unknown:
        out.append(("other", unknown))
    return out


# --------------------------------------------------------------------------- formatting

def human_size(n: float) -> str:
    """1536 -> '1.5K', 16777216 -> '16.0M' (binary units); small values as they are."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, mult in (("T", 1024 * GiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= mult:
            return f"{sign}{n / mult:.1f}{unit}"
    return f"{sign}{n:g}" if isinstance(n, float) else f"{sign}{n}"


def human_seconds(s: float) -> str:
    """0.0000123 -> '12.3us', 0.5 -> '500.0ms', 12 -> '12.00s'."""
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
        return str(s)
    if s == 0:
        return "0s"
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    return f"{s:.2f}s"


def format_value(name: str, value: Any) -> str:
    """A value for people: sizes with K/M/G, seconds scaled, ratios as percentages."""
    st = BY_NAME.get(name)
    if isinstance(value, Mapping):
        return format_histogram(value)
    if st is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if st.unit == "bytes":
        return human_size(value)
    if st.unit == "seconds":
        return human_seconds(value)
    if st.unit == "ratio":
        return f"{100 * value:.1f}%"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_histogram(snap: Mapping[str, Any]) -> str:
    count = snap.get("count", 0)
    if not count:
        return "n=0"
    mean = snap.get("sum_seconds", 0.0) / count
    return (f"n={count} mean={human_seconds(mean)} p50={human_seconds(snap.get('p50', 0))} "
            f"p90={human_seconds(snap.get('p90', 0))} p99={human_seconds(snap.get('p99', 0))}")


# --------------------------------------------------------------------------- generated text

def statistics_markdown() -> str:
    """The body of docs/statistics.md, generated from STATISTICS."""
    from nbdcache.histogram import UPPER_SECONDS
    out = [
        "# Statistics",
        "",
        "Generated from `nbdcache/statistics.py` by `nbdcache stats --markdown` (or "
        "`python -m nbdcache.statistics`); a test fails when this file and the table differ, "
        "and when the engine reports a statistic the table lacks.",
        "",
        "Read them with `nbdcache stats` (grouped, human-readable; `--json` for machines; "
        "`--watch` for per-second rates), from the `stats` event of the JSON log (every "
        "`log.stats_interval`; `nbdcache plot` draws it), or from Prometheus when "
        "`server.prometheus_port` is set, as `nbdcache_<name>` (counters get the `_total` "
        "suffix Prometheus requires). A *counter* only grows while the server runs; a "
        "*gauge* goes up and down; a *histogram* is a latency distribution in "
        f"{len(UPPER_SECONDS) - 1} log2 buckets with upper bounds from "
        f"{human_seconds(UPPER_SECONDS[0])} to {human_seconds(UPPER_SECONDS[-2])} and an "
        "overflow bucket (`count`, `sum_seconds`, `p50`/`p90`/`p99` estimates, `buckets` keyed by "
        "upper bound in seconds, non-empty ones only). Swap statistics appear once a swap "
        "device is configured.",
        "",
    ]
    for group in GROUPS:
        out += [f"## {group[0].upper()}{group[1:]}", "",
                "| statistic | kind | unit | kernel ancestor | meaning |",
                "|---|---|---|---|---|"]
        for s in STATISTICS:
            if s.group == group:
                anc = f"`{s.ancestor}`" if s.ancestor else "—"
                out.append(f"| `{s.name}` | {s.kind} | {s.unit} | {anc} | {s.help} |")
        out.append("")
    out += ["## How the watermarks relate (worked example)", ""]
    out += worked_example()
    return "\n".join(out)


def worked_example(ram: int = GiB, bs: int = 64 * KiB) -> list[str]:
    """The watermarks bufinit() derives for ``ram``, told in terms of the statistics."""
    from nbdcache.config import format_size
    from nbdcache.core.bufinit import bufinit, midpoints
    p = bufinit({"cache.ram": ram, "cache.block_size": bs})
    mid1, mid2 = midpoints(p)

    def m(n: int) -> str:
        return f"{n / MiB:.1f}M"

    def pct(n: int) -> str:
        return f"{100 * n / ram:.1f}% of {format_size(ram)}"

    hi, lo = p["hibufspace"], p["lobufspace"]
    capped = (" (the kernel's 1/8 hysteresis, capped at 64M per pass)"
              if hi - lo == 64 * MiB else "")
    return [
        f"With `cache.ram: {format_size(ram)}` and `cache.block_size: "
        f"{format_size(bs)}`, `bufinit()` gives `nbuf` = {p['nbuf']} and "
        f"`maxbufspace` = {m(p['maxbufspace'])}.",
        "",
        f"* **Clean space.** Once `bufspace` reaches {m(hi)} ({pct(hi)}, `hibufspace`), "
        f"`getnewbuf` recycles clean buffers (`flushingbufs` = 1, `recycled` grows) until "
        f"`bufspace` is below {m(lo)} ({pct(lo)}, `lobufspace`){capped}. The "
        f"{(p['maxbufspace'] - hi) // KiB}K above `hibufspace` is kept for `buf_daemon_hw`.",
        f"* **Dirty space.** Writes are measured by `dirtykvaspace` + `runningbufspace` "
        f"(block_size per dirty buffer plus write-back in flight). At {m(mid1)} ({pct(mid1)}, "
        f"mid1, half-way from `lodirtybufspace` {m(p['lodirtybufspace'])} to "
        f"`hidirtybufspace` {m(p['hidirtybufspace'])}) every newly dirtied buffer kicks the "
        f"daemons (`bd_speedup_kicks`). Past {m(mid2)} ({pct(mid2)}, mid2) a guest write waits "
        f"in `bd_wait` (`bd_wait_blocks`, `bd_wait_seconds`) until write-back has retired "
        f"about the excess, and goes on waiting while the total is above "
        f"{m(p['hidirtybufspace'])} ({pct(p['hidirtybufspace'])}, `hidirtybufspace`). The "
        f"daemons write back until the total is down to {m(p['lodirtybufspace'] // 2)} "
        f"({pct(p['lodirtybufspace'] // 2)}, `lodirtybufspace`/2).",
        f"* **Running space.** The daemons pause (`waitrunningbufspace_blocks`) while more than "
        f"{m(p['hirunningspace'] * 4 // 6)} (4/6 of `hirunningspace` {m(p['hirunningspace'])})"
        f" of write-back is in flight (`runningbufspace`).",
        "",
    ]


#: ``SwapPager.stats()`` names (kernel names) -> the names of this table.
SWAP_RENAMES: dict[str, str] = {
    "nswap": "swap_slots_total", "swap_used": "swap_slots_used",
    "vm_swap_size": "swap_slots_free", "swap_clean": "swap_clean_slots",
    "swap_dirty": "swap_dirty_slots", "swap_bad": "swap_bad_slots",
    "swap_unreadable": "swap_unreadable_slots", "swap_pending_free": "swap_pending_free",
    "swap_pageout_inflight": "swap_pageout_inflight",
    "nswap_lowat": "swap_lowat", "nswap_hiwat": "swap_hiwat",
    "swap_pager_almost_full": "swap_almost_full", "swap_pager_full": "swap_full",
    "almost_full_transitions": "swap_almost_full_transitions",
    "full_transitions": "swap_full_transitions",
    "pageout_calls": "swap_pageouts", "swapout": "swap_pageout_runs",
    "swappgsout": "swap_pageout_blocks", "pageout_failed": "swap_pageout_failed",
    "pageout_deferred": "swap_pageout_deferred", "pageout_cancelled": "swap_pageout_cancelled",
    "pagein_calls": "swap_pageins", "swapin": "swap_pagein_runs",
    "swappgsin": "swap_pagein_blocks", "pagein_stale": "swap_pagein_stale",
    "write_errors": "swap_write_errors", "read_errors": "swap_read_errors",
    "lost_dirty": "swap_lost_dirty", "unswapped": "swap_unswapped",
    "freed_by_trim": "swap_freed_by_trim", "trimmed_dirty": "swap_trimmed_dirty",
    "reclaimed_clean": "swap_reclaimed_clean", "set_clean": "swap_set_clean",
    "deferred_frees": "swap_deferred_frees",
    "pageout_mean_cluster": "swap_pageout_mean_cluster",
    "pagein_mean_cluster": "swap_pagein_mean_cluster",
    "dmmax": "swap_dmmax", "nsw_cluster_max": "swap_cluster_max",
    "swap_async_max": "swap_async_max", "nsw_wcount_async_max": "swap_async_credits",
    "swap_async_inuse": "swap_async_inuse", "swap_sync_inuse": "swap_sync_inuse",
    "swap_read_inuse": "swap_read_inuse",
}


def swap_statistics(pager_stats: Mapping[str, Any]) -> dict[str, Any]:
    """``SwapPager.stats()`` renamed for ``Engine.stats()``: every scalar under its
    ``swap_`` name in this table (flags as 0/1).  The per-device list is left out;
    ``swap_hits`` is the cache's to count.  An unknown scalar keeps its name with a
    ``swap_`` prefix, so the drift test reports it."""
    out: dict[str, Any] = {}
    for k, v in pager_stats.items():
        if k == "devices":
            for i, d in enumerate(v):
                out[f"swap_dev{i}_slots_used"] = d["used"]
                out[f"swap_dev{i}_slots_free"] = d["free"]
            continue
        if isinstance(v, (list, dict, tuple)):
            continue
        name = SWAP_RENAMES.get(k) or (k if k.startswith("swap_") else "swap_" + k)
        out[name] = int(v) if isinstance(v, bool) else v
    return out


def check_table(stats: Mapping[str, Any]) -> list[str]:
    """Problems between the table and a real ``Engine.stats()``: names it lacks or misses."""
    problems = [f"{k}: returned by Engine.stats() but not in nbdcache.statistics.STATISTICS"
                for k in stats if lookup(k) is None]
    problems += [f"{s.name}: in the table but not returned by Engine.stats()"
                 for s in STATISTICS if s.group not in OPTIONAL_GROUPS and s.name not in stats]
    return problems


if __name__ == "__main__":
    print(statistics_markdown())
