"""Backend faults: a failing backend never makes a FLUSH lie, and nothing is lost once
the fault clears.

nbdcache's NBD backend talks to ``nbdkit --filter=error file IMAGE``; errors are
armed by a trigger file (``error-*-file``) at a rate of 1 %, 10 % or 100 %, with
EIO or ENOSPC, or toggled on and off during the run.  One connection runs a
sequential workload whose exact result is modelled in a bytearray.  After every
successful FLUSH (and every acknowledged FUA write) the test reads IMAGE
directly: any acknowledged byte missing there is a *false flush success*, which
must never happen.  Once the trigger is removed, a FLUSH must succeed and IMAGE
must equal the model.  The errno of every failed request is recorded; the
figures and docs/reliability.md list what a guest sees.
"""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path

import nbd
import pytest
from reliakit import KiB, MiB, make_image, nbdcache_yaml, pattern_bytes, read_file

REGION = 4 * MiB            # the workload's range: its dirty data stays below mid2
DISK = 16 * MiB


def start(upstream, serve, tmp: Path, error_args: list[str], ram: str = "16M",
          readahead: int = 4):
    img = tmp / "upstream.img"
    if not img.exists():
        make_image(img, DISK)
    up = upstream("--filter=error", "file", str(img), *error_args, name="fault-up")
    s = serve(nbdcache_yaml(backend={"type": "nbd", "uri": up.uri, "connections": 2},
                            cache={"ram": ram, "daemon_interval": 0.05,
                                   "readahead": readahead}), name="fault")
    return img, up, s


def bump(d: dict, key: str) -> None:
    d[key] = d.get(key, 0) + 1


def errnos(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "none"


def first_difference(a: bytes, b: bytes) -> int:
    for off in range(0, len(a), 4096):
        if a[off:off + 4096] != b[off:off + 4096]:
            return off
    return -1


def random_range(rng: random.Random, limit: int, max_len: int = 128 * KiB,
                 unaligned: float = 0.2) -> tuple[int, int]:
    n = rng.randrange(1, max_len // 512 + 1) * 512
    off = rng.randrange(0, limit - n + 1) // 512 * 512
    if rng.random() < unaligned:
        off = min(off + rng.randrange(1, 512), limit - 1)
        n = max(1, min(n - rng.randrange(0, 512), limit - off))
    return off, n


class Run:
    """One faulty workload against the model, with its counters."""

    def __init__(self, h, img: Path, rng: random.Random) -> None:
        self.h, self.img, self.rng = h, img, rng
        self.model = bytearray(REGION)
        self.wid = 0
        self.errors: dict[str, int] = {}
        self.flush_ok = self.flush_failed = self.fua_ok = 0
        self.false_flush = self.false_fua = self.stale_reads = 0
        self.recovered_flushes = 0          # a flush that succeeded after a failed one
        self.first_false = ""

    def write(self, fua: bool = False) -> None:
        off, n = random_range(self.rng, REGION)
        self.wid += 1
        data = pattern_bytes(self.wid, off, n)
        try:
            self.h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
        except nbd.Error as e:
            bump(self.errors, f"{'fua write' if fua else 'write'}: {e.errno}")
            # the data may be in the cache already: write it again so the model is exact
            self.h.pwrite(data, off)
            self.model[off:off + n] = data
            return
        self.model[off:off + n] = data
        if fua:
            self.fua_ok += 1
            on_disk = read_file(self.img, REGION)
            if on_disk[off:off + n] != data:
                self.false_fua += 1

    def zero(self) -> None:
        off, n = random_range(self.rng, REGION, max_len=512 * KiB)
        try:
            self.h.zero(n, off)
        except nbd.Error as e:
            bump(self.errors, f"zero: {e.errno}")
            self.h.zero(n, off)
        self.model[off:off + n] = bytes(n)

    def flush(self, failed_before: list[bool]) -> bool:
        try:
            self.h.flush()
        except nbd.Error as e:
            bump(self.errors, f"flush: {e.errno}")
            self.flush_failed += 1
            failed_before[0] = True
            return False
        self.flush_ok += 1
        if failed_before[0]:
            self.recovered_flushes += 1
            failed_before[0] = False
        on_disk = read_file(self.img, REGION)
        if on_disk != self.model:
            self.false_flush += 1
            if not self.first_false:
                self.first_false = f"offset {first_difference(on_disk, bytes(self.model))}"
        return True

    def read(self) -> None:
        off, n = random_range(self.rng, REGION)
        try:
            got = self.h.pread(n, off)
        except nbd.Error as e:
            bump(self.errors, f"read: {e.errno}")
            return
        if got != self.model[off:off + n]:
            self.stale_reads += 1


CASES = [("EIO", "1%"), ("EIO", "10%"), ("EIO", "100%"),
         ("ENOSPC", "1%"), ("ENOSPC", "10%"), ("ENOSPC", "100%"),
         ("EIO", "toggled")]


@pytest.mark.parametrize("err,rate", CASES, ids=[f"{e}-{r}" for e, r in CASES])
def test_fault_pwrite_no_false_flush_and_complete_after_clear(upstream, serve, tmp_path,
                                                              err, rate, long_mode, figures):
    trig = tmp_path / "fault-on"
    pct = "100%" if rate == "toggled" else rate
    img, up, s = start(upstream, serve, tmp_path,
                       [f"error-pwrite={err}", f"error-pwrite-rate={pct}",
                        f"error-pwrite-file={trig}"])
    h = s.connect()
    rng = random.Random(zlib.crc32(f"{err}{rate}".encode()))
    run = Run(h, img, rng)
    n_ops = 3000 if long_mode else 400
    trig.touch()
    failed_before = [False]
    for i in range(n_ops):
        if rate == "toggled" and i % 10 == 0:
            if trig.exists():
                trig.unlink()
            else:
                trig.touch()
        r = rng.random()
        if r < 0.62:
            run.write()
        elif r < 0.72:
            run.write(fua=True)
        elif r < 0.77:
            run.zero()
        elif r < 0.90:
            run.flush(failed_before)
        else:
            run.read()
    if trig.exists():
        trig.unlink()
    attempts = 0
    while attempts < 10:
        attempts += 1
        if run.flush(failed_before):
            break
        time.sleep(0.1)
    final = read_file(img, REGION)
    through = h.pread(REGION, 0)
    name = f"fault: pwrite {err} {rate}"
    figures.add(name, "flushes ok / failed (ok after a failure)",
                f"{run.flush_ok} / {run.flush_failed} ({run.recovered_flushes})")
    figures.add(name, "false flush + FUA successes", run.false_flush + run.false_fua, 0,
                run.false_flush + run.false_fua == 0)
    figures.add(name, "errors seen by the guest", errnos(run.errors))
    figures.add(name, "flushes to succeed after the fault cleared", attempts, 1, attempts == 1)
    figures.add(name, "data complete after clear", final == run.model, True,
                final == run.model)
    assert run.false_flush == 0, f"a FLUSH succeeded with acknowledged data missing at " \
                                 f"{run.first_false}"
    assert run.false_fua == 0, "a FUA write was acknowledged but is not on the backend"
    assert run.stale_reads == 0, "a read returned something other than the last write"
    assert attempts == 1, "the first FLUSH after the fault cleared failed"
    assert final == run.model, f"backend differs from the acknowledged writes at " \
                               f"{first_difference(final, bytes(run.model))}"
    assert through == run.model
    assert not any(k.startswith("write:") for k in run.errors), \
        f"a plain (write-back) write failed: {errnos(run.errors)}"
    if rate == "100%":
        assert run.flush_failed and all(k.startswith(("flush", "fua")) for k in run.errors)
    h.shutdown()


@pytest.mark.parametrize("rate", ["10%", "100%"])
def test_fault_pread_never_serves_wrong_data(upstream, serve, tmp_path, rate, long_mode,
                                             figures):
    trig = tmp_path / "fault-on"
    img = tmp_path / "upstream.img"
    make_image(img, DISK)
    seed_data = pattern_bytes(1 << 32, 0, REGION)
    with open(img, "r+b") as f:
        f.write(seed_data)
    _, up, s = start(upstream, serve, tmp_path,
                     ["error-pread=EIO", f"error-pread-rate={rate}", f"error-pread-file={trig}"],
                     ram="2M")
    h = s.connect()
    rng = random.Random(11)
    run = Run(h, img, rng)
    run.model[:] = seed_data
    n_ops = 3000 if long_mode else 200
    trig.touch()
    rmw_errors: dict[str, int] = {}
    failed_before = [False]
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.6:
            run.read()
        elif r < 0.9:
            off, n = random_range(rng, REGION, unaligned=0.5)
            run.wid += 1
            data = pattern_bytes(run.wid, off, n)
            try:
                h.pwrite(data, off)
            except nbd.Error as e:
                bump(rmw_errors, f"unaligned write: {e.errno}")
                trig.unlink()
                h.pwrite(data, off)             # the fill succeeds now
                trig.touch()
            run.model[off:off + n] = data
        else:
            run.flush(failed_before)
    trig.unlink()
    assert run.flush(failed_before)
    final_read = h.pread(REGION, 0)
    name = f"fault: pread EIO {rate}"
    figures.add(name, "reads failed (errno)", errnos(run.errors))
    figures.add(name, "writes failed by a read-modify-write fill", errnos(rmw_errors))
    figures.add(name, "wrong data served", run.stale_reads, 0, run.stale_reads == 0)
    figures.add(name, "false flush successes", run.false_flush, 0, run.false_flush == 0)
    assert run.stale_reads == 0, "a read returned data other than the last write"
    assert run.false_flush == 0
    assert final_read == run.model
    assert read_file(img, REGION) == run.model
    assert set(k.split(": ")[1] for k in run.errors) <= {"EIO"}
    h.shutdown()


def test_fault_retry_writes_back_without_a_flush_once_cleared(upstream, serve, tmp_path,
                                                              figures):
    """Write-back that failed is retried by the daemons (back-off up to 1 s): after the
    fault clears the data reaches the backend with no guest action."""
    trig = tmp_path / "fault-on"
    img, up, s = start(upstream, serve, tmp_path,
                       ["error-pwrite=EIO", "error-pwrite-rate=100%",
                        f"error-pwrite-file={trig}"])
    h = s.connect()
    trig.touch()
    data = pattern_bytes(7 << 32, 0, 6 * MiB)       # above lodirtybufspace/2: daemons run
    h.pwrite(data, 0)
    time.sleep(1.0)                                  # the daemons fail and back off
    assert read_file(img, 6 * MiB) != data
    trig.unlink()
    t0 = time.monotonic()
    written = 0
    while time.monotonic() - t0 < 15:
        on_disk = read_file(img, 6 * MiB)
        written = sum(1 for o in range(0, 6 * MiB, 64 * KiB)
                      if on_disk[o:o + 64 * KiB] == data[o:o + 64 * KiB])
        if written * 64 * KiB >= 2 * MiB:
            break
        time.sleep(0.05)
    latency = time.monotonic() - t0
    figures.add("fault: retry after the fault clears", "daemon write-back resumed after",
                f"{latency:.2f} s ({written} blocks)", "<= 3 s", latency <= 3)
    assert written * 64 * KiB >= 2 * MiB, "the daemons did not retry the failed write-back"
    assert latency <= 3
    h.flush()
    assert read_file(img, 6 * MiB) == data
    h.shutdown()


def test_fault_errno_matrix(upstream, serve, tmp_path, figures):
    """Measure which errno each guest request gets from a backend that fails every
    write (EIO, ENOSPC) or every read (EIO); the table in docs/reliability.md."""
    trig = tmp_path / "fault-on"
    seen = {}
    for err in ("EIO", "ENOSPC"):
        img, up, s = start(upstream, serve, tmp_path,
                           [f"error={err}", "error-rate=100%", f"error-file={trig}"])
        h = s.connect()
        h.pwrite(b"c" * 65536, 0)                     # cached before the fault
        trig.touch()
        row = {}
        for what, fn in (
            ("write", lambda: h.pwrite(b"x" * 65536, 1 * MiB)),
            ("read hit", lambda: h.pread(65536, 0)),
            ("read miss", lambda: h.pread(65536, 8 * MiB)),
            ("unaligned write (fill)", lambda: h.pwrite(b"y" * 100, 9 * MiB + 7)),
            ("FUA write", lambda: h.pwrite(b"z" * 65536, 2 * MiB, nbd.CMD_FLAG_FUA)),
            ("flush", lambda: h.flush()),
            ("write_zeroes", lambda: h.zero(1 * MiB, 4 * MiB)),
            ("trim", lambda: h.trim(1 * MiB, 5 * MiB)),
        ):
            try:
                fn()
                row[what] = "ok"
            except nbd.Error as e:
                row[what] = e.errno
        trig.unlink()
        h.flush()
        h.shutdown()
        s.stop()
        up.stop()
        seen[err] = row
        figures.add(f"fault: errno matrix, backend {err}", "guest sees",
                    ", ".join(f"{k}={v}" for k, v in row.items()))
    for err, row in seen.items():
        assert row["write"] == "ok" and row["read hit"] == "ok", row
        assert row["read miss"] != "ok" and row["flush"] != "ok" and row["FUA write"] != "ok"
    assert seen["EIO"]["flush"] == "EIO" and seen["EIO"]["read miss"] == "EIO"


def test_fault_enospc_reaches_the_guest_as_enospc(upstream, serve, tmp_path):
    """Regression: NbdBackend once built OSError from nbd.Error.errno (the name, 'ENOSPC')
    instead of errnum; plugin._fail's set_error raised TypeError and the guest got EIO,
    which turns QEMU's werror=enospc (pause the VM) into an I/O error in the guest."""
    trig = tmp_path / "fault-on"
    img, up, s = start(upstream, serve, tmp_path,
                       ["error-pwrite=ENOSPC", "error-pwrite-rate=100%",
                        f"error-pwrite-file={trig}"])
    h = s.connect()
    trig.touch()
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"z" * 65536, 0, nbd.CMD_FLAG_FUA)
    trig.unlink()
    h.flush()
    h.shutdown()
    s.stop()
    assert "TypeError" not in s.log.read_text(), "plugin._fail raised TypeError"
    assert e.value.errno == "ENOSPC", f"the backend said ENOSPC, the guest got {e.value.errno}"
