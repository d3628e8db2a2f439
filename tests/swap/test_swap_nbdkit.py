"""Swap through a real nbdkit: a working set larger than RAM served from swap, dirty
spill in front of a slow backend, FLUSH draining swap, and swap on a failing device."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nbdcache.control import ControlClient
from nbdcache.statistics import STATISTICS, check_table

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB


def swap_config(tmp_path: Path, backend: str, ram: str = "4M", devices: str = "",
                extra: str = "") -> str:
    devices = devices or (f"    - {{path: {tmp_path / 'swap0.img'}, size: 32M}}\n"
                          f"    - {{path: {tmp_path / 'swap1.img'}, size: 32M}}\n")
    return (f"backend: {backend}\n"
            f"cache: {{ram: {ram}, block_size: 64K, readahead: 0}}\n"
            f"swap:\n  devices:\n{devices}{extra}"
            f"server: {{control_socket: {tmp_path / 'ctl.sock'}}}\n"
            f"log: {{file: {tmp_path / 'log.jsonl'}, stats_interval: 0}}\n")


def stats(tmp_path: Path) -> dict:
    return ControlClient(tmp_path / "ctl.sock").stats()


def block(tag: int, version: int = 0) -> bytes:
    head = tag.to_bytes(4, "little") + version.to_bytes(4, "little")
    return head * (BS // 8)


def test_working_set_four_times_ram_is_served_from_swap(serve, tmp_path):
    """16 MiB of data through a 4 MiB RAM cache and two 32 MiB swap files: after the
    first pass, most RAM misses are swap hits, and every read is byte-exact."""
    img = tmp_path / "disk.img"
    s = serve(swap_config(tmp_path, f"{{path: {img}, size: 64M}}"))
    h = s.connect()
    nblk = 16 * MiB // BS                                   # 4x the RAM cache
    for k in range(nblk):
        h.pwrite(block(k), k * BS)
    h.flush()
    rng = random.Random(7)
    order = list(range(nblk))
    rng.shuffle(order)
    for k in order:                                         # warm: swapcache fills
        assert h.pread(BS, k * BS) == block(k)
    time.sleep(0.5)
    before = stats(tmp_path)
    for _ in range(3):
        rng.shuffle(order)
        for k in order:
            assert h.pread(BS, k * BS) == block(k), f"block {k}"
    after = stats(tmp_path)
    misses = after["misses"] - before["misses"]
    swap_hits = after["swap_hits"] - before["swap_hits"]
    backend = after["backend_reads"] - before["backend_reads"]
    print(f"misses {misses}, swap hits {swap_hits}, backend reads {backend}, "
          f"page-in mean cluster {after['swap_pagein_mean_cluster']}, "
          f"page-out mean cluster {after['swap_pageout_mean_cluster']}")
    assert misses > 2 * nblk, "the working set fitted in RAM: the test proves nothing"
    assert swap_hits > misses / 2, f"only {swap_hits} of {misses} misses were swap hits"
    assert after["swap_dev0_slots_used"] > 0 and after["swap_dev1_slots_used"] > 0
    assert check_table(after) == []
    missing = [x.name for x in STATISTICS if x.group == "swap" and x.name not in after
               and not x.name.startswith("swap_dev_")]
    assert missing == [], f"swap statistics the engine does not report: {missing}"


def test_dirty_spill_in_front_of_a_slow_backend_and_flush_drains(upstream, serve, tmp_path):
    """A write burst larger than RAM to a slow backend: no error, dirty data spills to
    swap, FLUSH writes everything to the backend (read back from the upstream itself)."""
    up_img = tmp_path / "up.img"
    subprocess.run(["truncate", "-s", "64M", str(up_img)], check=True)
    up = upstream("--filter=delay", "file", str(up_img), "delay-write=5ms", "delay-read=1ms",
                  name="slow")
    s = serve(swap_config(tmp_path, f"{{type: nbd, uri: '{up.uri}', connections: 2}}"))
    h = s.connect()
    nblk = 12 * MiB // BS                                   # 3x the RAM cache
    t0 = time.monotonic()
    for k in range(nblk):
        h.pwrite(block(k, 1), k * BS)
    burst = time.monotonic() - t0
    mid = stats(tmp_path)
    t0 = time.monotonic()
    h.flush()
    flush = time.monotonic() - t0
    end = stats(tmp_path)
    print(f"burst {burst:.2f}s, flush {flush:.2f}s, spilled dirty {mid['swap_spill_dirty']}, "
          f"dirty in swap at flush {mid['swap_dirty_slots']}, bd_wait {mid['bd_wait_blocks']}")
    assert mid["swap_spill_dirty"] > 0, "nothing spilled: the test proves nothing"
    assert end["swap_dirty_slots"] == 0, "dirty data left in swap after FLUSH"
    direct = upstream("file", str(up_img), name="check")
    d = direct.connect()
    for k in range(nblk):
        assert d.pread(BS, k * BS) == block(k, 1), f"block {k} not on the backend after FLUSH"
    for k in range(nblk):                                   # and the cache still serves it
        assert h.pread(BS, k * BS) == block(k, 1)


def test_buf_daemon_hw_drains_swap_without_flush(upstream, serve, tmp_path):
    up_img = tmp_path / "up.img"
    subprocess.run(["truncate", "-s", "64M", str(up_img)], check=True)
    up = upstream("--filter=delay", "file", str(up_img), "delay-write=5ms", name="slow")
    s = serve(swap_config(tmp_path, f"{{type: nbd, uri: '{up.uri}', connections: 2}}"))
    h = s.connect()
    for k in range(12 * MiB // BS):
        h.pwrite(block(k, 2), k * BS)
    assert stats(tmp_path)["swap_spill_dirty"] > 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = stats(tmp_path)
        if st["swap_dirty_slots"] == 0 and st["dirtybufcount"] == 0:
            break
        time.sleep(0.2)
    assert st["swap_dirty_slots"] == 0, f"buf_daemon_hw left {st['swap_dirty_slots']} dirty"
    assert st["swap_drained"] > 0


@pytest.mark.skipif(not shutil.which("nbdfuse") or not os.path.exists("/dev/fuse"),
                    reason="needs nbdfuse and /dev/fuse")
def test_swap_on_a_failing_device_loses_nothing(upstream, serve, tmp_path):
    """The swap file lives on an nbdfuse mount of an nbdkit export with the error filter
    (10 % of reads and writes fail with EIO): page-outs fail and are retried later, clean
    page-ins fall back to the backend; every read is right and FLUSH puts everything on
    the backend."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    up = upstream("--filter=error", "memory", "32M", "error-rate=10%", "error=EIO",
                  name="badswap")
    fuse = subprocess.Popen(["nbdfuse", str(mnt / "swap"), "--unix", str(up.sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (mnt / "swap").exists():
            assert time.monotonic() < deadline, "nbdfuse did not mount"
            time.sleep(0.05)
        img = tmp_path / "disk.img"
        s = serve(swap_config(tmp_path, f"{{path: {img}, size: 64M}}",
                              devices=f"    - {{path: {mnt / 'swap'}, create: false}}\n"))
        h = s.connect()
        nblk = 16 * MiB // BS
        rng = random.Random(9)
        version = [0] * nblk
        for rnd in range(3):
            order = list(range(nblk))
            rng.shuffle(order)
            for k in order:
                if rng.random() < 0.5:
                    version[k] += 1
                    h.pwrite(block(k, version[k]), k * BS)
                else:
                    got = h.pread(BS, k * BS)
                    assert got == (block(k, version[k]) if version[k] else bytes(BS)), k
        h.flush()
        st = stats(tmp_path)
        print({k: st[k] for k in ("swap_write_errors", "swap_read_errors", "swap_lost_dirty",
                                  "swap_bad_slots", "swap_hits", "swap_spill_dirty")})
        assert st["swap_write_errors"] + st["swap_read_errors"] > 0, "no swap error injected"
        s.stop()
        with open(img, "rb") as f:
            for k in range(nblk):
                f.seek(k * BS)
                want = block(k, version[k]) if version[k] else bytes(BS)
                assert f.read(BS) == want, f"block {k} wrong on the backend after FLUSH"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        fuse.terminate()
        fuse.wait(10)
