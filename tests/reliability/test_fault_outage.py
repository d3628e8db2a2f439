"""Backend outage: the NBD upstream dies under a workload and comes back with the same
data (a file-backed nbdkit restarted on the same socket).

What a guest sees is measured and reported.  ``test_outage_current_behaviour``
keeps the upstream down longer than ``backend.retry_timeout`` (0.5 s here):
writes keep being acknowledged into the cache while dirty+running space is
below bd_wait's mark (mid2, just under hidirtybufspace), the next write waits
there (back-pressure, not an error), reads that miss, FUA writes and flushes
fail with EIO once the retry window is spent; after the upstream is back the
NBD backend reconnects, the next flush succeeds and everything acknowledged
reaches the upstream.  ``test_outage_backend_reconnects`` kills and restarts the
upstream within ``backend.retry_timeout`` under a running workload: requests
wait and then succeed, flushes included (writes the old upstream acknowledged
but had not flushed are written again from the NBD backend's journal), and
nothing acknowledged is lost.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import nbd
from reliakit import KiB, MiB, connect, make_image, nbdcache_yaml, pattern_bytes, read_file

from nbdcache import config as configmod
from nbdcache.core.bufinit import bufinit, midpoints

DISK = 32 * MiB
CACHE = {"ram": "8M", "daemon_interval": 0.1, "readahead": 0}


def start(upstream, serve, tmp: Path, retry_timeout: float = 0.5):
    img = tmp / "upstream.img"
    make_image(img, DISK)
    up = upstream("file", str(img), name="outage-up")
    cfg = nbdcache_yaml(backend={"type": "nbd", "uri": up.uri, "connections": 2,
                                 "retry_timeout": retry_timeout}, cache=CACHE)
    s = serve(cfg, name="outage")
    params = bufinit(configmod.load(None, {"backend.type": "memory", "backend.size": "1M",
                                           **{f"cache.{k}": str(v) for k, v in CACHE.items()}}))
    return img, up, s, params


def kill(server) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    server.stop()


def try_op(fn) -> str:
    try:
        fn()
        return "ok"
    except nbd.Error as e:
        return e.errno or "error"


def aio_write(h, data: bytes, off: int, timeout: float) -> str:
    """Send one write and wait up to ``timeout``: "ok", an errno, or "blocked"."""
    cookie = h.aio_pwrite(data, off)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h.poll(50)
        try:
            if h.aio_command_completed(cookie):
                return "ok"
        except nbd.Error as e:
            return e.errno or "error"
    return "blocked"


def test_outage_current_behaviour(upstream, serve, tmp_path, figures):
    img, up, s, p = start(upstream, serve, tmp_path)
    mid1, mid2 = midpoints(p)
    h = connect(s.uri)
    model = bytearray(DISK)
    first = pattern_bytes(1 << 32, 0, MiB)
    h.pwrite(first, 0)
    h.flush()
    model[:MiB] = first
    kill(up)
    seen = {"read miss": try_op(lambda: h.pread(64 * KiB, 20 * MiB)),
            "flush (nothing dirty)": try_op(h.flush),
            "FUA write": try_op(lambda: h.pwrite(b"F" * 4096, 30 * MiB, nbd.CMD_FLAG_FUA)),
            "read hit": try_op(lambda: h.pread(64 * KiB, 0))}
    model[30 * MiB:30 * MiB + 4096] = b"F" * 4096     # in the cache despite the error
    writer = connect(s.uri)
    acked = 0
    state = "ok"
    off = 2 * MiB
    while state == "ok" and off < 16 * MiB:
        data = pattern_bytes((2 << 32) + off, off, 64 * KiB)
        state = aio_write(writer, data, off, timeout=2.0)
        model[off:off + 64 * KiB] = data
        if state == "ok":
            acked += 64 * KiB
        off += 64 * KiB
    seen["write past mid2"] = state
    seen["flush during outage"] = try_op(h.flush)
    up2 = upstream("file", str(img), name="outage-up")
    seen["flush after restart"] = try_op(h.flush)      # reconnects: no wait needed
    on_disk = read_file(img, DISK)
    at_risk = sum(1 for o in range(0, DISK, 4096)
                  if on_disk[o:o + 4096] != model[o:o + 4096])
    # SIGTERM while a writer sits in bd_wait: does nbdkit get to its cleanup?
    del writer, h
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.proc.wait(5)
        exit_state = f"exited rc={s.proc.returncode} in {time.monotonic() - t0:.1f} s"
    except subprocess.TimeoutExpired:
        exit_state = "still running 5 s after SIGTERM (killed)"
        kill(s)
    on_disk = read_file(img, DISK)
    lost = sum(1 for o in range(0, DISK, 4096) if on_disk[o:o + 4096] != model[o:o + 4096])
    up2.stop()
    name = "outage: upstream killed, restarted"
    figures.add(name, "acked into the cache during the outage",
                f"{acked // KiB} KiB", f"mid2={mid2 // KiB} KiB, hidirty="
                f"{p['hidirtybufspace'] // KiB} KiB", acked <= p["hidirtybufspace"])
    figures.add(name, "guest-visible results", ", ".join(f"{k}={v}" for k, v in seen.items()))
    figures.add(name, "4K sectors acked but not on the upstream after restart", at_risk)
    figures.add(name, "SIGTERM afterwards", exit_state)
    figures.add(name, "4K sectors lost at exit", lost)
    assert seen["read hit"] == "ok"
    assert seen["read miss"] == "EIO" and seen["FUA write"] == "EIO"
    assert seen["flush during outage"] == "EIO"
    assert seen["write past mid2"] == "blocked", "a write past mid2 was not held in bd_wait"
    assert p["lodirtybufspace"] <= acked <= p["hidirtybufspace"], \
        "writes were not acknowledged up to about hidirtybufspace"
    assert seen["flush after restart"] == "ok", "the backend did not reconnect"
    assert at_risk == 0 and lost == 0


class Workload:
    """Random 64K writes, reads checked against the model, and a flush every tenth
    request, on one connection to nbdcache, in a thread the test owns (synchronous
    requests block through the outage).  Records every request's errno and the
    longest time one took."""

    def __init__(self, uri: str, seed: int) -> None:
        self.h = connect(uri)
        self.rng = random.Random(seed)
        self.model = bytearray(DISK)
        self.unsure: set[int] = set()       # 64K chunks a failed write may have changed
        self.ops = self.flushes_ok = 0
        self.errors: dict[str, int] = {}
        self.wrong_reads = 0
        self.longest = 0.0
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="outage-workload")

    def _one(self, n: int) -> None:
        off = self.rng.randrange(DISK // (64 * KiB)) * 64 * KiB
        kind = "flush" if n % 10 == 9 else self.rng.choice(["write", "write", "read"])
        t0 = time.monotonic()
        try:
            if kind == "write":
                data = pattern_bytes((5 << 32) + n, off, 64 * KiB)
                self.unsure.add(off)
                self.h.pwrite(data, off)
                self.model[off:off + 64 * KiB] = data
                self.unsure.discard(off)
            elif kind == "read":
                got = self.h.pread(64 * KiB, off)
                if off not in self.unsure and got != self.model[off:off + 64 * KiB]:
                    self.wrong_reads += 1
            else:
                self.h.flush()
                self.flushes_ok += 1
        except nbd.Error as e:
            key = f"{kind}:{e.errno or 'error'}"
            self.errors[key] = self.errors.get(key, 0) + 1
        self.longest = max(self.longest, time.monotonic() - t0)
        self.ops += 1

    def _run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                self._one(n)
                n += 1
        except BaseException as e:              # handed to the test by finish()
            self.failure = e

    def wait_ops(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.ops < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ops >= n

    def finish(self, timeout: float) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"a request still waits {timeout} s after the end"
        if self.failure is not None:
            raise self.failure


def test_outage_backend_reconnects(upstream, serve, tmp_path, figures):
    img, up, s, p = start(upstream, serve, tmp_path, retry_timeout=30)
    w = Workload(s.uri, seed=7)
    w.thread.start()
    try:
        assert w.wait_ops(40, 20) and w.flushes_ok, "the workload did not get going"
        ops_before = w.ops
        kill(up)
        t_kill = time.monotonic()
        time.sleep(1.0)                          # the outage: requests wait meanwhile
        ops_during = w.ops - ops_before
        upstream("file", str(img), name="outage-up")
        outage = time.monotonic() - t_kill
        ops_up = w.ops
        recovered = w.wait_ops(ops_up + 40, 20)
    finally:
        w.finish(30)
    final = [try_op(w.h.flush)]                 # a list: reported as the figure below
    w.h.shutdown()
    on_disk = read_file(img, DISK)
    lost = sum(1 for o in range(0, DISK, 4096) if (o // (64 * KiB)) * 64 * KiB not in w.unsure
               and on_disk[o:o + 4096] != w.model[o:o + 4096])
    log = s.stderr()
    name = "outage: upstream restarted within retry_timeout"
    figures.add(name, "outage (kill to restart)", f"{outage:.2f} s",
                "backend.retry_timeout 30 s")
    figures.add(name, "requests: before / completed during / after",
                f"{ops_before} / {ops_during} / {w.ops - ops_up}")
    figures.add(name, "longest request as the guest saw it", f"{w.longest:.2f} s")
    figures.add(name, "guest-visible errors", ", ".join(
        f"{k} x{v}" for k, v in sorted(w.errors.items())) or "none",
        "none", not w.errors)
    figures.add(name, "backend.disconnected / reconnected events",
                f"{log.count('backend.disconnected')} / {log.count('backend.reconnected')}")
    figures.add(name, "final flush", " then ".join(final))
    figures.add(name, "wrong reads", w.wrong_reads, 0, w.wrong_reads == 0)
    figures.add(name, "4K sectors acked but not on the upstream", lost, 0, lost == 0)
    assert recovered, "the workload made no progress after the upstream came back"
    assert not w.errors, f"guest-visible errors across an outage within retry_timeout: " \
        f"{w.errors}"
    assert final == ["ok"], f"FLUSH still fails after the upstream came back: {final}"
    assert w.wrong_reads == 0 and lost == 0
    assert log.count("backend.reconnected") == 1, "reconnection not logged once"
