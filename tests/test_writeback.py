"""Write-back through a real nbdkit: delayed writes, back-pressure, failing backends,
several connections sharing one cache."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import nbd
import pytest

MiB = 1024 * 1024


def final_stats(log: Path) -> dict:
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    finals = [e for e in events if e.get("event") == "stats" and e.get("final")]
    assert finals, "no final stats event in the log"
    return finals[-1]


def test_data_reaches_the_file_only_on_flush(serve, tmp_path):
    img = tmp_path / "disk.img"
    s = serve(f"backend: {{path: {img}, size: 64M}}\ncache: {{ram: 16M}}\n")
    h = s.connect()
    h.pwrite(b"W" * 65536, 1 * MiB)
    assert h.pread(65536, 1 * MiB) == b"W" * 65536
    time.sleep(1.5)                                  # a daemon poll passes: below lodirty/2
    with open(img, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(65536) == bytes(65536), "written back before FLUSH"
    h.flush()
    with open(img, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(65536) == b"W" * 65536, "not on the backing file after FLUSH"


def test_daemons_write_back_without_flush(serve, tmp_path):
    img = tmp_path / "disk.img"
    # 16M RAM: lodirtybufspace/2 is ~2M; 8 MiB of dirty data must be trimmed by the daemons
    s = serve(f"backend: {{path: {img}, size: 64M}}\ncache: {{ram: 16M}}\n")
    h = s.connect()
    data = random.Random(5).randbytes(8 * MiB)
    h.pwrite(data, 0)
    deadline = time.monotonic() + 10
    written = 0
    while time.monotonic() < deadline:
        with open(img, "rb") as f:
            got = f.read(8 * MiB)
        written = sum(1 for k in range(0, 8 * MiB, 65536) if got[k:k + 65536] == data[k:k + 65536])
        if written * 65536 >= 8 * MiB - 4 * MiB:
            break
        time.sleep(0.1)
    assert written * 65536 >= 4 * MiB, f"only {written} blocks written back by the daemons"


def test_small_cache_keeps_serving_a_larger_write_stream(serve, tmp_path):
    img, log = tmp_path / "disk.img", tmp_path / "log.jsonl"
    s = serve(f"backend: {{path: {img}, size: 128M}}\ncache: {{ram: 2M}}\n"
              f"log: {{file: {log}}}\n")
    h = s.connect()
    rng = random.Random(6)
    chunks = [rng.randbytes(MiB) for _ in range(64)]
    for i, c in enumerate(chunks):
        h.pwrite(c, i * MiB)                         # 64 MiB through a 2 MiB cache: no error
    for i, c in enumerate(chunks):
        assert h.pread(MiB, i * MiB) == c
    h.shutdown()
    s.stop()
    st = final_stats(log)
    assert st["writeback_bytes"] >= 62 * MiB
    assert st["writeback_mean_cluster_bufs"] > 1     # adjacent blocks clustered
    assert st["bd_wait_blocks"] + st["getnewbuf_waits"] > 0   # back-pressure, not errors


def test_failing_backend_fails_flush_then_recovers(upstream, serve, tmp_path):
    trigger = tmp_path / "fail-writes"
    up = upstream("--filter=error", "memory", "16M", "error-pwrite-rate=100%",
                  f"error-pwrite-file={trigger}", "error-pwrite=EIO")
    s = serve(f"backend: {{type: nbd, uri: '{up.uri}', connections: 2}}\n"
              "cache: {ram: 4M, daemon_interval: 0.2}\n")
    h = s.connect()
    rng = random.Random(7)
    model = bytearray(16 * MiB)
    for _ in range(50):
        off, n = rng.randrange(15 * MiB), rng.randrange(1, 200_000)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    trigger.touch()
    with pytest.raises(nbd.Error) as e:
        h.flush()
    assert e.value.errno == "EIO"
    time.sleep(0.5)                                  # daemon retries fail too
    with pytest.raises(nbd.Error):
        h.flush()
    assert h.pread(16 * MiB, 0) == model             # nothing acknowledged is lost
    trigger.unlink()
    h.flush()
    direct = up.connect()
    assert direct.pread(16 * MiB, 0) == model
    direct.shutdown()


def test_write_on_one_connection_flush_on_another_read_on_a_third(serve, tmp_path):
    img = tmp_path / "disk.img"
    s = serve(f"backend: {{path: {img}, size: 32M}}\ncache: {{ram: 8M}}\n")
    a, b, c = s.connect(), s.connect(), s.connect()
    assert a.can_multi_conn()
    a.pwrite(b"M" * 100_000, 12345)
    b.flush()
    assert c.pread(100_000, 12345) == b"M" * 100_000
    with open(img, "rb") as f:
        f.seek(12345)
        assert f.read(100_000) == b"M" * 100_000     # b's flush covered a's write
