"""Shutdown: SIGTERM (or SIGINT) with dirty data writes it all back, in bounded time.

The documented policy (``cache.flush_on_shutdown: true``, the default) is that a
clean shutdown writes back every dirty block before nbdkit exits.  Each test
leaves data dirty (a large cache, daemons that sleep: the image must not have
the data yet, or the test would prove nothing), disconnects its clients
(nbdkit waits for them before running the plugin's cleanup), sends the signal
and measures how long nbdkit takes to exit; then the image must hold the data.
With ``flush_on_shutdown: false`` the data is dropped, as documented.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
from reliakit import MiB, connect, make_image, nbdcache_yaml, pattern_bytes, read_file

DISK = 64 * MiB


def dirty_then_signal(s, img, dirty: int, sig: int, bound: float):
    """Write ``dirty`` bytes at random 1 MiB slots, check they are only in the cache,
    signal, wait; return (data map, seconds to exit, return code)."""
    h = connect(s.uri)
    rng = random.Random(dirty)
    slots = rng.sample(range(DISK // MiB), dirty // MiB)
    data = {}
    for k in slots:
        data[k] = pattern_bytes((5 << 32) | k, k * MiB, MiB)
        h.pwrite(data[k], k * MiB)
    on_disk = read_file(img, DISK)
    assert all(on_disk[k * MiB:(k + 1) * MiB] != d for k, d in data.items()), \
        "data reached the image before the signal: the test would prove nothing"
    h.shutdown()
    del h
    t0 = time.monotonic()
    s.proc.send_signal(sig)
    try:
        rc = s.proc.wait(bound)
    except subprocess.TimeoutExpired:
        rc = None
    return data, time.monotonic() - t0, rc


def missing(img, data: dict, size: int = DISK) -> int:
    on_disk = read_file(img, size)
    return sum(1 for k, d in data.items() if on_disk[k * MiB:(k + 1) * MiB] != d)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_flushes_dirty_data(serve, tmp_path, sig, figures):
    img = tmp_path / "disk.img"
    make_image(img, DISK)
    s = serve(nbdcache_yaml(backend={"path": str(img)},
                            cache={"ram": "64M", "daemon_interval": 60}), name="shutdown")
    data, seconds, rc = dirty_then_signal(s, img, 6 * MiB, sig, bound=10)
    lost = missing(img, data)
    name = f"shutdown: {signal.Signals(sig).name}, file backend"
    figures.add(name, "dirty at signal / exit time", f"6 MiB / {seconds:.2f} s", "<= 10 s",
                rc is not None and seconds <= 10)
    figures.add(name, "1 MiB slots missing afterwards", lost, 0, lost == 0)
    assert rc == 0, f"nbdkit exit status {rc}"
    assert lost == 0


def test_shutdown_flushes_to_a_slow_backend_in_bounded_time(upstream, serve, tmp_path, figures):
    img = tmp_path / "upstream.img"
    make_image(img, DISK)
    up = upstream("--filter=delay", "file", str(img), "delay-write=10ms", name="slow-up")
    s = serve(nbdcache_yaml(backend={"type": "nbd", "uri": up.uri, "connections": 2},
                            cache={"ram": "128M", "daemon_interval": 60, "max_io": "256K"}),
              name="shutdown-slow")
    data, seconds, rc = dirty_then_signal(s, img, 14 * MiB, signal.SIGTERM, bound=20)
    lost = missing(img, data)
    name = "shutdown: SIGTERM, NBD backend, 10 ms/write"
    figures.add(name, "dirty at signal / exit time", f"14 MiB / {seconds:.2f} s", "<= 20 s",
                rc is not None and seconds <= 20)
    figures.add(name, "1 MiB slots missing afterwards", lost, 0, lost == 0)
    assert rc == 0, f"nbdkit exit status {rc}"
    assert lost == 0


def test_shutdown_without_flush_on_shutdown_drops_dirty_data(serve, tmp_path, figures):
    img = tmp_path / "disk.img"
    make_image(img, DISK)
    s = serve(nbdcache_yaml(backend={"path": str(img)},
                            cache={"ram": "64M", "daemon_interval": 60,
                                   "flush_on_shutdown": False}), name="shutdown-noflush")
    data, seconds, rc = dirty_then_signal(s, img, 6 * MiB, signal.SIGTERM, bound=10)
    lost = missing(img, data)
    figures.add("shutdown: flush_on_shutdown=false", "1 MiB slots dropped (policy)",
                f"{lost} of {len(data)} in {seconds:.2f} s")
    assert rc == 0
    assert lost == len(data), "flush_on_shutdown: false still wrote the data back"
