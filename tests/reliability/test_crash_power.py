"""Power loss: nothing acknowledged is lost when the disk under nbdcache loses power too.

The "disk" is an upstream ``nbdkit --filter=cache file IMAGE cache=writeback``:
its cache filter holds every write in a volatile cache until a FLUSH writes it
through to IMAGE (then fdatasync), so SIGKILLing it drops exactly what was not
flushed, as a disk with a volatile write cache losing power.

* ``nbdfuse``: the export is mounted as a file with nbdfuse and nbdcache's
  *file* backend uses that file (pwrite/fdatasync through FUSE become NBD
  writes and flushes), the configuration of a host whose disk loses power.
* ``nbd-direct``: nbdcache's NBD backend talks to the same upstream directly
  (the alternative with the same power when FUSE is unusable; run as well).

Each round kills the upstream and nbdcache together at a random moment under the
crash workload of test_crash_process, restarts the whole stack on IMAGE and
checks every 512-byte unit.  The negative controls add ``--filter=fua
fuamode=discard`` in front of the cache filter, so every flush is dropped: they
MUST lose data, proving that the check sees a disk that lies about flushes.

Short: 10 rounds per stack.  Long (--long): 1000 rounds per stack.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import pytest
from reliakit import (
    KiB, MiB, FuseDisk, Mix, Stack, crash_rounds, fuse_unusable, make_image, nbdcache_yaml,
    report_crash, seed_from_env,
)

DISK = 16 * MiB
MIX = Mix(max_len=512 * KiB, hot=1 * MiB)


def start_stack(serve, upstream, tmp: Path, img: Path, kind: str, lying: bool,
                rng: random.Random, r: int) -> Stack:
    filters = ["--filter=fua", "--filter=cache"] if lying else ["--filter=cache"]
    params = ["cache=writeback"] + (["fuamode=discard"] if lying else [])
    up = upstream(*filters, "file", str(img), *params, name="power-up")
    mounts = []
    if kind == "nbdfuse":
        fuse = FuseDisk(tmp / "mnt", up.sock, tmp / "nbdfuse.log")
        mounts.append(fuse)
        backend = {"path": str(fuse.file), "create": False}
    else:
        backend = {"type": "nbd", "uri": up.uri, "connections": rng.choice([1, 2, 4])}
    bs = rng.choice([4 * KiB, 64 * KiB, 256 * KiB])
    cache = {"ram": max(16 * bs, rng.choice([2, 4, 8]) * MiB), "block_size": bs,
             "daemon_interval": rng.choice([0.05, 0.2, 1.0])}
    try:
        s = serve(nbdcache_yaml(backend=backend, cache=cache), name="power")
    except Exception:
        for m in mounts:
            m.close()
        raise
    return Stack(s, below=[up], mounts=mounts)


def skip_reason(kind: str) -> str | None:
    return fuse_unusable() if kind == "nbdfuse" else None


@pytest.mark.parametrize("kind", ["nbdfuse", "nbd-direct"])
def test_crash_power_loses_nothing_acknowledged(upstream, serve, tmp_path: Path, kind,
                                                long_mode, figures):
    reason = skip_reason(kind)
    if reason:
        figures.add(f"power loss: {kind}", "skipped", reason)
        pytest.skip(reason)
    rounds = 1000 if long_mode else 10
    seed = seed_from_env()
    rng = random.Random(seed)
    img = tmp_path / "disk.img"
    make_image(img, DISK)
    t0 = time.monotonic()
    t = crash_rounds(functools.partial(start_stack, serve, upstream, tmp_path, img, kind,
                                       False, rng), DISK, rounds, rng, seed,
                     mix=MIX)
    report_crash(figures, f"power loss: {kind}", t, rounds, seed, time.monotonic() - t0)
    if kind == "nbdfuse":
        log = tmp_path / "nbdfuse.log"
        aborts = log.read_text().count("Assertion") if log.exists() else 0
        figures.add(f"power loss: {kind}", "nbdfuse aborts (its own assertion, remounted)",
                    aborts)
    assert not t.failure, t.failure
    assert t.flushes > 0 and t.durable > 0, "the workload never made data durable"


@pytest.mark.parametrize("kind", ["nbdfuse", "nbd-direct"])
def test_crash_power_negative_control_flush_discarded(upstream, serve, tmp_path: Path, kind,
                                                      figures):
    """A disk that drops flushes (fua filter, fuamode=discard) MUST be caught losing data."""
    reason = skip_reason(kind)
    if reason:
        pytest.skip(reason)
    seed = seed_from_env()
    rng = random.Random(seed)
    img = tmp_path / "disk.img"
    make_image(img, DISK)
    t = crash_rounds(functools.partial(start_stack, serve, upstream, tmp_path, img, kind,
                                       True, rng), DISK, 3, rng, seed, mix=MIX,
                     kill_window=(0.3, 0.6))
    figures.add(f"power loss: negative control ({kind}, flushes dropped)",
                "units lost (must be > 0)", t.lost, "> 0", t.lost > 0)
    assert t.lost > 0, "flushes were dropped yet nothing was lost: the check cannot fail"


def test_write_zeroes_reads_back_zeroes_on_nbdfuse(upstream, serve, tmp_path: Path):
    """FileBackend.zero used PUNCH_HOLE, which nbdfuse turns into an advisory NBD TRIM,
    so the range kept its old data; it now uses ZERO_RANGE, or writes zeroes where
    that is unsupported (FUSE)."""
    reason = fuse_unusable()
    if reason:
        pytest.skip(reason)
    img = tmp_path / "disk.img"
    make_image(img, DISK)
    up = upstream("--filter=cache", "file", str(img), "cache=writeback", name="zero-up")
    fuse = FuseDisk(tmp_path / "mnt", up.sock, tmp_path / "nbdfuse.log")
    try:
        s = serve(nbdcache_yaml(backend={"path": str(fuse.file), "create": False},
                                cache={"ram": "4M"}), name="zero")
        h = s.connect()
        h.pwrite(b"A" * MiB, 0)
        h.flush()
        h.zero(MiB, 0)                                # whole blocks: the backend's zero
        got = h.pread(MiB, 0)
        h.flush()
        s.stop()
    finally:
        fuse.close()
    assert got == bytes(MiB), (f"WRITE_ZEROES acknowledged, then read back "
                               f"{got.count(b'A')} bytes of the old data")
