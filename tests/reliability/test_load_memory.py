"""Memory: the nbdkit process stays within its RAM budget under a sustained mixed load.

nbdcache allocates its arena (cache.ram) once; everything else (the embedded
Python, request buffers of up to 1 MiB, write-back snapshots, libnbd) must fit
in 64 MiB more.  Four connections keep four random requests each in flight
(writes of 4 KiB to 1 MiB, reads, zeroes, trims, flushes) over a 512 MiB
image, eight times the cache, for 12 s (long version: 120 s); the peak resident
set (VmHWM of the nbdkit process) must stay at or below cache.ram + 64 MiB.

At most one flush or FUA request is in flight at a time: concurrent ones
deadlock today (test_overload_concurrent_flushes_make_progress), and this test
is about memory.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from reliakit import MiB, AioPool, History, Mix, connect, fill, make_image, nbdcache_yaml, \
    vm_status

RAM = 64 * MiB
DISK = 512 * MiB


@pytest.mark.xfail(strict=True, reason="BUG: peak RSS ~178 MiB > cache.ram + 64M = 128 MiB "
                   "(435 MiB before plugin._tune_malloc capped glibc at one arena). Measured at "
                   "rest after the load (smaps): the arena 63 MiB; nbdkit's per-thread request "
                   "buffers (threadlocal_buffer, kept for the thread's life: ~40 MiB in 42 maps "
                   "of up to 1 MiB, 4 connections x 16 threads); the main malloc heap 21 MiB and "
                   "CPython's object arenas 17 MiB; libraries 15 MiB. At the peak, write-back "
                   "snapshots add up to ~19 MiB (a FLUSH snapshots every dirty cluster at once)")
def test_memory_peak_rss_within_cache_ram_plus_64m(serve, tmp_path, long_mode, figures):
    img = tmp_path / "disk.img"
    make_image(img, DISK)
    s = serve(nbdcache_yaml(backend={"path": str(img)},
                            cache={"ram": RAM, "daemon_interval": 0.2}), name="memory")
    pid = s.proc.pid
    idle = vm_status(pid)["VmHWM"]
    seconds = 120 if long_mode else 12
    rng = random.Random(17)
    mix = Mix(hot=DISK)
    pool = AioPool([connect(s.uri) for _ in range(4)], History(b"", epoch=1))
    pool.hist.size = DISK
    stop_at = time.monotonic() + seconds
    moved = 0
    while time.monotonic() < stop_at:
        moved += fill(pool, rng, mix, 4, serial_sync=True)
        pool.pump(10)
        if time.monotonic() - pool.last_completion > 20:
            pool.close()
            raise AssertionError("hang: no completion for 20 s")
        if len(pool.hist.ops) > 10000:             # keep the client's own memory flat
            pool.hist.ops = [op for op in pool.hist.ops if op.complete is None]
    drained = pool.drain(30)
    st = vm_status(pid)
    threads = len(os.listdir(f"/proc/{pid}/task"))
    pool.close()
    assert drained, "hang: requests still in flight 30 s after the load stopped"
    errors = sum(pool.errors.values())
    bound = RAM + 64 * MiB
    name = "memory: 4 conns x 4 in flight, 64M cache"
    figures.add(name, "load", f"{seconds} s, {moved // MiB} MiB requested, {errors} errors, "
                f"{threads} threads")
    figures.add(name, "VmHWM idle / peak", f"{idle / MiB:.0f} / {st['VmHWM'] / MiB:.0f} MiB",
                f"<= ram+64M = {bound // MiB} MiB", st["VmHWM"] <= bound)
    assert errors == 0, pool.errors
    assert st["VmHWM"] <= bound, f"peak RSS {st['VmHWM'] / MiB:.0f} MiB > {bound // MiB} MiB"
