"""Overload: many connections with deep queues, and a write stream far larger than
the cache in front of a slow backend.

* 8 connections x 32 requests in flight (libnbd aio) of overlapping writes tagged
  per 4 KiB sector, through a 4 MiB cache that writes back and recycles all the
  while; then a FLUSH.  Every sector must equal exactly one of the writes that
  covered it, and not one superseded by a write issued after it was
  acknowledged (``History.check`` with 4 KiB units): no torn, foreign or stale
  data.  The file behind must hold the same bytes.
* A stream of sequential 1 MiB writes, 12 times the cache, to an upstream with
  ``--filter=delay delay-write=2ms``: it completes, and dirty memory stays
  bounded.  The server's periodic ``stats`` events (every 0.1 s) are sampled.
  A buffer being written back stays B_DELWRI until its write completes, so it
  is counted in dirtykvaspace *and* in runningbufspace (the kernel undirties it
  when the write starts): the dirty memory is dirtykvaspace, and its peak must
  stay within hidirtybufspace plus one cluster (max_io, the size of each guest
  write); the sum the throttle compares, dirtykvaspace + runningbufspace, may
  exceed that by what is in flight (at most hirunningspace).  With four
  writers the allowance is one write per writer: writers released from
  bd_wait together each add a write before the next check.

The 60 s watchdog of the suite reports a hang; the aio loop itself fails after
20 s without a single completion.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from reliakit import (
    KiB, MiB, AioPool, History, connect, hard_kill, make_image, nbdcache_yaml, pattern_bytes,
    read_all, read_file, stats_events,
)

SECTOR = 4 * KiB
REGION = 8 * MiB


def test_overload_8x32_in_flight_no_torn_or_foreign_sectors(serve, tmp_path: Path, long_mode,
                                                             figures):
    img = tmp_path / "disk.img"
    make_image(img, REGION)
    s = serve(nbdcache_yaml(backend={"path": str(img)},
                            cache={"ram": "4M", "daemon_interval": 0.05}), name="overload")
    per_conn = 2000 if long_mode else 120
    hist = History(bytes(REGION), epoch=9, unit=SECTOR)
    pool = AioPool([connect(s.uri) for _ in range(8)], hist)
    rng = random.Random(5)
    left = [per_conn] * 8
    t0 = last_progress = time.monotonic()
    done_before = 0
    while any(left) or pool.total_inflight():
        for i in pool.alive():
            while left[i] and pool.inflight[i] < 32:
                n = rng.randrange(1, 65) * SECTOR
                off = rng.randrange(0, (REGION - n) // SECTOR + 1) * SECTOR
                pool.submit(i, hist.new("write", off, n))
                left[i] -= 1
        pool.pump(10)
        done = sum(1 for op in hist.ops if op.complete is not None or op.error)
        if done != done_before:
            done_before, last_progress = done, time.monotonic()
        assert time.monotonic() - last_progress < 20, \
            f"hang: no completion for 20 s with {pool.total_inflight()} requests in flight"
        assert not pool.dead, "a connection died under load"
    flush = hist.new("flush")
    pool.submit(0, flush)
    assert pool.drain(30), "the flush did not complete"
    elapsed = time.monotonic() - t0
    pool.close()
    actual = read_all(connect(s.uri), REGION)
    res = hist.check(actual)
    on_disk = read_file(img, REGION)
    errors = sum(pool.errors.values())
    name = "overload: 8 conns x 32 in flight"
    figures.add(name, "writes acked / failed", f"{hist.count('write', acked=True)} / {errors}",
                f"{8 * per_conn} / 0", errors == 0)
    figures.add(name, "max requests in flight", pool.max_inflight, ">= 200",
                pool.max_inflight >= 200)
    figures.add(name, "4K sectors torn, foreign or stale", res.lost_units, 0,
                res.lost_units == 0)
    figures.add(name, "elapsed", f"{elapsed:.1f} s")
    assert errors == 0, pool.errors
    assert flush.complete is not None
    assert res.lost_units == 0, res.summary()
    assert on_disk == actual, "the file differs from what the export reads after FLUSH"


def test_overload_concurrent_flushes_make_progress(serve, tmp_path: Path, figures):
    """8 connections x 8 in flight: 64K-256K writes over 2 MiB and 30 % flushes for 3 s.
    Every request must complete; a 5 s wait without any completion is a deadlock."""
    img = tmp_path / "disk.img"
    make_image(img, 64 * MiB)
    s = serve(nbdcache_yaml(backend={"path": str(img)}, cache={"ram": "32M"}), name="storm")
    hist = History(b"", epoch=11)
    hist.size = 64 * MiB
    pool = AioPool([connect(s.uri) for _ in range(8)], hist)
    rng = random.Random(3)
    stop_at = time.monotonic() + 3
    stalled = 0.0
    try:
        while time.monotonic() < stop_at or pool.total_inflight():
            if time.monotonic() < stop_at:
                for i in pool.alive():
                    while pool.inflight[i] < 8:
                        if rng.random() < 0.3:
                            pool.submit(i, hist.new("flush"))
                        else:
                            n = rng.choice([64, 128, 256]) * KiB
                            pool.submit(i, hist.new("write", rng.randrange(32) * 64 * KiB, n))
            pool.pump(10)
            stalled = time.monotonic() - pool.last_completion
            if stalled > 5:
                break
    finally:
        flushes = hist.count("flush", acked=True)
        figures.add("overload: concurrent flushes (8 x 8)", "flushes acked / stuck",
                    f"{flushes} / {pool.total_inflight()} requests stuck "
                    f"{stalled:.0f} s", "all complete", not pool.total_inflight())
        if pool.total_inflight():
            hard_kill(s)                 # a deadlocked server cannot stop gracefully
        del pool
    assert stalled <= 5, f"deadlock: no completion for {stalled:.0f} s after {flushes} flushes"


def stream(upstream, serve, tmp: Path, writers: int, seconds: float, chunk: int, figures,
           name: str) -> tuple[int, int, dict]:
    """Sequential writes of ``chunk`` bytes from ``writers`` threads, each over its own
    share of a 128 MiB image and around again, for ``seconds``; then FLUSH and check
    the image holds the last pass.  Returns (peak dirtykvaspace, peak dirtykvaspace +
    runningbufspace, last stats)."""
    size = 128 * MiB
    img = tmp / "slow.img"
    make_image(img, size)
    up = upstream("--filter=delay", "file", str(img), "delay-write=2ms", name="slow-up")
    log = tmp / f"stream{writers}.log"
    s = serve(nbdcache_yaml(backend={"type": "nbd", "uri": up.uri, "connections": 4},
                            cache={"ram": "8M"}, log={"file": str(log), "stats_interval": 0.1}),
              name=f"stream{writers}")
    handles = [connect(s.uri) for _ in range(writers)]
    share = size // writers
    tags = {}
    written = [0] * writers
    failures: list[BaseException] = []
    stop_at = time.monotonic() + seconds

    def write(i: int, h) -> None:
        try:
            n = 0
            while time.monotonic() < stop_at:
                for off in range(i * share, (i + 1) * share, chunk):
                    tags[off] = (n << 40) | (writers << 32) | off // chunk
                    h.pwrite(pattern_bytes(tags[off], off, chunk), off)
                    written[i] += chunk
                    if time.monotonic() >= stop_at:
                        break
                n += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failures.append(e)

    t0 = time.monotonic()
    threads = [threading.Thread(target=write, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 40)
    assert not any(t.is_alive() for t in threads), "hang: a writer is stuck 40 s after its end"
    handles[0].flush()
    elapsed = time.monotonic() - t0
    for h in handles:
        h.shutdown()
    s.stop()
    up.stop()
    assert not failures, failures
    ev = stats_events(log)
    samples = [e for e in ev if not e.get("final")]
    assert len(samples) >= 5, f"only {len(samples)} stats samples"
    peak = max(e["dirtykvaspace"] for e in samples)
    peak_sum = max(e["dirtykvaspace"] + e["runningbufspace"] for e in samples)
    total = sum(written)
    figures.add(name, "streamed / elapsed / stats samples",
                f"{total // MiB} MiB ({total / (8 * MiB):.0f}x the cache) / {elapsed:.1f} s / "
                f"{len(samples)}")
    on_disk = read_file(img, size)
    bad = [off for off, tag in tags.items()
           if on_disk[off:off + chunk] != pattern_bytes(tag, off, chunk)]
    assert not bad, f"{len(bad)} chunks differ from the last acknowledged write, first {bad[0]}"
    return peak, peak_sum, ev[-1]


def report_peaks(figures, name: str, peak: int, peak_sum: int, st: dict, allowance: int,
                 what: str) -> bool:
    bound = st["hidirtybufspace"] + allowance
    # In flight: flushbufqueues stops once runningbufspace reaches hirunningspace, so the
    # last cluster it issues may start just below it: hirunningspace + one max_io cluster.
    running = st["hirunningspace"] + st["max_io"]
    figures.add(name, "peak dirtykvaspace (dirty memory)", f"{peak / MiB:.2f} MiB",
                f"hidirty+{what}={bound / MiB:.2f} MiB", peak <= bound)
    figures.add(name, "peak dirtykva+running (in-flight counted twice)",
                f"{peak_sum / MiB:.2f} MiB",
                f"hidirty+{what}+hirunning+max_io={(bound + running) / MiB:.2f} MiB",
                peak_sum <= bound + running)
    return peak <= bound and peak_sum <= bound + running


def test_overload_stream_bounded_dirty_one_writer(upstream, serve, tmp_path, long_mode,
                                                  figures):
    name = "overload: 1 writer, 1 MiB writes, slow backend"
    peak, peak_sum, st = stream(upstream, serve, tmp_path, 1, 60 if long_mode else 2.5, MiB,
                                figures, name)
    assert report_peaks(figures, name, peak, peak_sum, st, st["max_io"], "max_io")


def test_overload_stream_bounded_dirty_four_writers(upstream, serve, tmp_path, long_mode,
                                                    figures):
    chunk = 256 * KiB
    name = "overload: 4 writers, 256K writes, slow backend"
    peak, peak_sum, st = stream(upstream, serve, tmp_path, 4, 60 if long_mode else 2.5, chunk,
                                figures, name)
    # Four writers released from bd_wait together may each add a write before the next check.
    assert report_peaks(figures, name, peak, peak_sum, st, 4 * chunk, "4 writes")
