"""Swap faults: a full swap device, failing swap writes and failing swap reads never
serve a stale block and never lose one; a read fails only where a dirty block's only
copy sits in swap and cannot be read, and FLUSH fails while such a block exists.

Every test runs a real nbdcache (4 MiB of RAM, 64 KiB blocks, no readahead) in front
of a slow backend (``nbdkit --filter=delay file IMAGE``, reached with the NBD
backend), so a working set four times RAM lives mostly in swap and dirty blocks spill
there instead of waiting for the backend.  Each block holds a self-identifying
pattern (``reliakit.pattern_bytes``: the write that put it there and its offset), the
test keeps the last version of every block, and every read is compared with it.

* *Full*: a 1 MiB swap file (16 slots) against a 16 MiB working set.
* *Write EIO*: the swap file lives on an ``nbdfuse`` mount of ``nbdkit
  --filter=error memory``; 10 % or 100 % of its writes fail with EIO.
* *Read EIO*: the same mount with reads failing while a trigger file exists; the
  test drops the host page cache of the FUSE file (``posix_fadvise DONTNEED``) so
  nbdcache's reads really reach the failing export.

At the end the server is stopped and IMAGE is read directly: it must hold the last
version of every block.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import nbd
import pytest
from reliakit import FuseDisk, KiB, MiB, fuse_unusable, make_image, nbdcache_yaml, \
    pattern_bytes, read_file

from nbdcache.control import ControlClient

BS = 64 * KiB
WORKING_SET = 16 * MiB          # four times cache.ram
NBLK = WORKING_SET // BS

needs_fuse = pytest.mark.skipif(fuse_unusable() is not None, reason=str(fuse_unusable()))


class SwapRun:
    """One nbdcache with swap in front of a slow upstream, and the model of its blocks."""

    def __init__(self, upstream, serve, tmp: Path, devices: list[dict], name: str,
                 delay_write: str = "5ms") -> None:
        self.tmp = tmp
        self.img = tmp / "backend.img"
        make_image(self.img, WORKING_SET)
        self.up = upstream("--filter=delay", "file", str(self.img),
                           f"delay-write={delay_write}", name=f"{name}-slow")
        self.ctl = tmp / f"{name}-ctl.sock"
        self.server = serve(nbdcache_yaml(
            backend={"type": "nbd", "uri": self.up.uri, "connections": 2},
            cache={"ram": "4M", "block_size": "64K", "readahead": 0},
            swap={"devices": devices, "spill": "both"},
            server={"control_socket": str(self.ctl)},
            log={"file": str(tmp / f"{name}-log.jsonl"), "stats_interval": 0}), name=name)
        self.h = self.server.connect()
        self.version = [0] * NBLK       # write id of each block's last version (0: zeroes)
        self.wid = 0
        self.rounds = 0
        self.errors: dict[str, int] = {}
        self.stale_reads = 0
        self.first_stale = ""

    def stats(self) -> dict:
        return ControlClient(self.ctl).stats()

    def want(self, k: int) -> bytes:
        v = self.version[k]
        return pattern_bytes(v, k * BS, BS) if v else bytes(BS)

    def write(self, k: int) -> None:
        self.wid += 1
        data = pattern_bytes(self.wid, k * BS, BS)
        try:
            self.h.pwrite(data, k * BS)
        except nbd.Error as e:
            bump(self.errors, f"write: {e.errno}")
            return          # may or may not have landed: every test asserts none fails
        self.version[k] = self.wid

    def read(self, k: int) -> bool:
        """Read block k; False if it failed (counted), a stale block is counted too."""
        try:
            got = self.h.pread(BS, k * BS)
        except nbd.Error as e:
            bump(self.errors, f"read: {e.errno}")
            return False
        if got != self.want(k):
            self.stale_reads += 1
            if not self.first_stale:
                self.first_stale = f"block {k}: got write {int.from_bytes(got[:8], 'little')}" \
                                   f", want {self.version[k]}"
        return True

    def workload(self, rng: random.Random, rounds: int) -> None:
        """Rounds over the working set in random order, half writes and half reads."""
        for _ in range(rounds):
            order = list(range(NBLK))
            rng.shuffle(order)
            for k in order:
                if rng.random() < 0.5:
                    self.write(k)
                else:
                    self.read(k)
            self.rounds += 1

    def flush(self) -> str:
        try:
            self.h.flush()
        except nbd.Error as e:
            bump(self.errors, f"flush: {e.errno}")
            return e.errno or "?"
        return "ok"

    def lost_on_backend(self) -> list[int]:
        """Stop the server (SIGTERM, flush on shutdown) and read IMAGE directly."""
        self.server.stop()
        on_disk = read_file(self.img, WORKING_SET)
        return [k for k in range(NBLK) if on_disk[k * BS:(k + 1) * BS] != self.want(k)]

    def report(self, figures, name: str, lost: list[int]) -> None:
        figures.add(name, "rounds / blocks", f"{self.rounds} / {NBLK} x 64 KiB")
        figures.add(name, "errors seen by the client", errnos(self.errors))
        figures.add(name, "stale reads", self.stale_reads, 0, self.stale_reads == 0)
        figures.add(name, "blocks lost on the backend", len(lost), 0, not lost)


def bump(d: dict, key: str) -> None:
    d[key] = d.get(key, 0) + 1


def errnos(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "none"


def assert_nothing_lost(run, flushed: str, lost: list) -> None:
    """The swap fault stayed invisible: FLUSH ok, no error, no stale read, all on the backend."""
    assert flushed == "ok"
    assert run.errors == {}, errnos(run.errors)
    assert run.stale_reads == 0, run.first_stale
    assert not lost, f"blocks not on the backend after FLUSH: {lost[:10]}"


def drop_page_cache(path: Path) -> None:
    """Make the next reads of a FUSE file reach its server (clean pages only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fuse_swap(upstream, tmp: Path, error_args: list[str]) -> tuple[FuseDisk, Path]:
    up = upstream("--filter=error", "memory", "32M", *error_args, name="swapdev")
    disk = FuseDisk(tmp / "mnt", up.sock, tmp / "nbdfuse.log")
    return disk, disk.file


def test_fault_swap_full_loses_nothing(upstream, serve, tmp_path, long_mode, figures):
    run = SwapRun(upstream, serve, tmp_path,
                  [{"path": str(tmp_path / "swap0.img"), "size": "1M"}], "full")
    rng = random.Random(21)
    run.workload(rng, 8 if long_mode else 2)
    for k in range(NBLK):                   # every block, whatever its state
        run.read(k)
    flushed = run.flush()
    st = run.stats()
    lost = run.lost_on_backend()
    name = "swap fault: device full (16 slots)"
    run.report(figures, name, lost)
    figures.add(name, "full / almost-full transitions",
                f"{st['swap_full_transitions']} / {st['swap_almost_full_transitions']}")
    figures.add(name, "dirty spilled / pageout failed (no slot)",
                f"{st['swap_spill_dirty']} / {st['swap_pageout_failed']}")
    assert_nothing_lost(run, flushed, lost)
    assert st["swap_almost_full_transitions"] > 0, "swap never filled: the test proves nothing"


@needs_fuse
@pytest.mark.parametrize("rate", ["10%", "100%"])
def test_fault_swap_write_eio_loses_nothing(upstream, serve, tmp_path, rate, long_mode,
                                            figures):
    disk, swapfile = fuse_swap(upstream, tmp_path,
                               ["error-pwrite=EIO", f"error-pwrite-rate={rate}"])
    try:
        run = SwapRun(upstream, serve, tmp_path, [{"path": str(swapfile), "create": False}],
                      f"weio{rate[:-1]}")
        rng = random.Random(22)
        run.workload(rng, 8 if long_mode else 2)
        for k in range(NBLK):
            run.read(k)
        flushed = run.flush()
        st = run.stats()
        lost = run.lost_on_backend()
    finally:
        disk.close()
    name = f"swap fault: write EIO {rate}"
    run.report(figures, name, lost)
    figures.add(name, "swap write errors / bad slots",
                f"{st['swap_write_errors']} / {st['swap_bad_slots']}")
    figures.add(name, "swap hits / dirty spilled", f"{st['swap_hits']} / {st['swap_spill_dirty']}")
    assert_nothing_lost(run, flushed, lost)
    assert st["swap_write_errors"] > 0, "no swap write failed: the test proves nothing"


@needs_fuse
def test_fault_swap_read_eio_fails_only_lost_dirty_blocks(upstream, serve, tmp_path,
                                                          long_mode, figures):
    trig = tmp_path / "swap-read-fault"
    disk, swapfile = fuse_swap(upstream, tmp_path,
                               ["error-pread=EIO", "error-pread-rate=100%",
                                f"error-pread-file={trig}"])
    try:
        run = SwapRun(upstream, serve, tmp_path, [{"path": str(swapfile), "create": False}],
                      "reio", delay_write="20ms")
        rng = random.Random(23)
        for k in range(NBLK):                       # v1 everywhere, on the backend
            run.write(k)
        assert run.flush() == "ok"
        for k in rng.sample(range(NBLK), NBLK):     # clean copies go to swap
            run.read(k)
        rewritten = set(rng.sample(range(NBLK), NBLK // 2))
        for k in sorted(rewritten):                 # v2 of half: dirty spill
            run.write(k)
        run.rounds = 1
        before = run.stats()
        trig.touch()
        drop_page_cache(swapfile)
        failed = [k for k in range(NBLK) if not run.read(k)]
        mid = run.stats()
        flush_during = run.flush()
        unreadable = run.stats()["swap_unreadable_slots"]
        trig.unlink()
        after_ok = [k for k in failed if run.read(k)]
        flush_after = run.flush()
        end = run.stats()
        lost = run.lost_on_backend()
    finally:
        if trig.exists():
            trig.unlink()
        disk.close()
    name = "swap fault: read EIO 100% (switched)"
    run.report(figures, name, lost)
    figures.add(name, "swap clean / dirty slots when errors began",
                f"{before['swap_clean_slots']} / {before['swap_dirty_slots']}")
    figures.add(name, "swap read errors / read fallbacks",
                f"{mid['swap_read_errors']} / {mid['swap_read_fallbacks']}")
    figures.add(name, "reads failed (blocks) / swap_lost_dirty",
                f"{len(failed)} / {mid['swap_lost_dirty']}")
    figures.add(name, "failed reads of blocks never dirty", len(set(failed) - rewritten), 0,
                not set(failed) - rewritten)
    figures.add(name, "FLUSH with unreadable dirty / after clear",
                f"{flush_during} ({unreadable} unreadable) / {flush_after}")
    assert mid["swap_read_errors"] > 0, "no swap read failed: the test proves nothing"
    assert run.stale_reads == 0, run.first_stale
    assert not set(failed) - rewritten, "a block with a clean copy on the backend failed"
    assert len(failed) <= mid["swap_lost_dirty"], "EIO without a lost dirty block"
    if unreadable:
        assert flush_during != "ok", "FLUSH succeeded with dirty data unreadable in swap"
    assert len(after_ok) == len(failed), "reads still fail after the fault cleared"
    assert flush_after == "ok"
    assert end["swap_unreadable_slots"] == 0
    assert not lost, f"blocks not on the backend after FLUSH: {lost[:10]}"
