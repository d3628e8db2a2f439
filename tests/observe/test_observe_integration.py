"""Statistics, live tunables, Prometheus and plots through a real nbdkit and libnbd.

Everything but the plot test needs the engine to start the observers
(``nbdcache.control.start_observers`` in ``Engine.start()``) and, for the
``python -m nbdcache`` test, ``cli_observe.add_parsers`` in ``nbdcache.cli``.
Counters, not sleeps, prove behaviour: waits poll a counter or a file with a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbdcache.control import ControlClient, ControlError

KiB = 1024
MiB = 1024 * KiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(tmp_path: Path, extra: str = "", stats_interval: str = "0") -> str:
    return (
        "backend: {type: memory, size: 64M}\n"
        "cache: {ram: 8M, daemon_interval: 60}\n"
        f"log: {{file: {tmp_path / 'log.jsonl'}, stats_interval: {stats_interval}}}\n"
        f"server:\n  control_socket: {tmp_path / 'ctl' / 's.ctl'}\n{extra}"
    )


def wait_for(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def control(tmp_path: Path) -> ControlClient:
    path = tmp_path / "ctl" / "s.ctl"
    wait_for(path.exists, f"the control socket {path} (is Engine.start() wired to "
             "start_observers?)", timeout=5.0)
    return ControlClient(path)


def log_events(tmp_path: Path, event: str) -> list[dict]:
    out = []
    for line in (tmp_path / "log.jsonl").read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == event:
            out.append(ev)
    return out


def test_stats_move_with_known_io(serve, tmp_path):
    s = serve(config_text(tmp_path))
    c = control(tmp_path)
    mode = os.stat(c.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ctl").st_mode) == 0o700
    h = s.connect()
    base = c.stats()

    h.pwrite(b"a" * (256 * KiB), 0)                     # 4 buffers, below every mark
    st = c.stats()
    assert st["writes"] == base["writes"] + 1
    assert st["dirtybufspace"] == st["dirtykvaspace"] == 256 * KiB
    assert st["dirtybufcount"] == 4 and st["queue_dirty"] == 4

    h.pread(256 * KiB, 0)                               # what was written is cached
    st2 = c.stats()
    assert st2["hits"] == st["hits"] + 4 and st2["misses"] == st["misses"]

    h.pread(64 * KiB, 4 * MiB)                          # never touched: a miss ...
    st3 = c.stats()
    assert st3["misses"] == st2["misses"] + 1 and st3["backend_reads"] > st2["backend_reads"]
    h.pread(64 * KiB, 4 * MiB)                          # ... and then a hit
    st4 = c.stats()
    assert st4["hits"] == st3["hits"] + 1 and st4["misses"] == st3["misses"]

    h.flush()
    st5 = c.stats()
    assert st5["dirtybufspace"] == st5["dirtykvaspace"] == st5["dirtybufcount"] == 0
    assert st5["flushes"] == st4["flushes"] + 1
    assert st5["writeback_bytes"] >= 256 * KiB
    h.shutdown()
    s.stop()
    assert not Path(c.path).exists()                    # removed at cleanup


def test_lowering_hidirtybufspace_makes_writers_wait(serve, tmp_path):
    s = serve(config_text(tmp_path))
    c = control(tmp_path)
    h = s.connect()
    chunk = b"w" * MiB          # one request dirties 16 buffers before bd_heatup looks

    for i in range(2):                                  # 2M dirty: below mid1 (about 2.8M)
        h.pwrite(chunk, i * MiB)
    st = c.stats()
    assert st["bd_wait_blocks"] == 0 and st["dirtykvaspace"] == 2 * MiB
    h.flush()

    assert c.set("cache.lodirtybufspace", "128K") == (st["lodirtybufspace"], 128 * KiB)
    assert c.set("cache.hidirtybufspace", "256K") == (st["hidirtybufspace"], 256 * KiB)
    assert c.tunables()["cache.hidirtybufspace"] == 256 * KiB
    assert c.stats()["hidirtybufspace"] == 256 * KiB

    for i in range(2):                                  # the same burst, elsewhere: now
        h.pwrite(chunk, 8 * MiB + i * MiB)              # past mid2 (224K), so bd_wait
    st = c.stats()
    assert st["bd_wait_blocks"] > 0
    assert st["bd_speedup_kicks"] > 0 and st["writeback_clusters"] > 0
    h.flush()
    assert [ev["key"] for ev in log_events(tmp_path, "tunable.set")] == \
        ["cache.lodirtybufspace", "cache.hidirtybufspace"]


@pytest.mark.parametrize("key, value, message", [
    ("cache.ram", "1G", "cache.ram: can only be set at startup"),
    ("cache.block_size", "4K", "cache.block_size: can only be set at startup"),
    ("cache.hidirtybufspace", "banana", "cache.hidirtybufspace: got 'banana', expected a size"),
    ("cache.lodirtybufspace", "100M", "expected less than cache.hidirtybufspace"),
    ("cache.hidirtybufspace", "1G", "expected at most cache.hibufspace"),
    ("cache.max_io", "100K", "expected a multiple of cache.block_size"),
    ("cache.readahead", "1000", "expected at most 256"),
    ("cache.flushperquue", "1", "did you mean cache.flushperqueue"),
])
def test_refused_values_change_nothing(serve, tmp_path, key, value, message):
    serve(config_text(tmp_path))
    c = control(tmp_path)
    before_t, before_s = c.tunables(), c.stats()
    with pytest.raises(ControlError) as e:
        c.set(key, value)
    assert message in str(e.value)
    assert c.tunables() == before_t
    after = c.stats()
    for k in ("hidirtybufspace", "lodirtybufspace", "hirunningspace", "max_io", "readahead",
              "flushperqueue", "nbuf", "block_size", "maxbufspace"):
        assert after[k] == before_s[k], k
    assert log_events(tmp_path, "tunable.set") == []


def test_prometheus_endpoint_parses(serve, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    port = free_port()
    s = serve(config_text(tmp_path, f"  prometheus_port: {port}\n"))
    control(tmp_path)
    h = s.connect()
    h.pwrite(b"p" * (128 * KiB), 0)
    h.pread(128 * KiB, 0)
    url = f"http://127.0.0.1:{port}/metrics"
    text = wait_for(lambda: _fetch(url), f"{url}").decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["nbdcache_writes"].type == "counter"
    assert fams["nbdcache_writes"].samples[0].value == 1
    assert fams["nbdcache_hits"].samples[0].value == 2
    assert fams["nbdcache_dirtybufspace"].type == "gauge"
    assert fams["nbdcache_dirtybufspace"].samples[0].value == 128 * KiB
    for f in fams.values():
        assert f.name.startswith("nbdcache_") and f.documentation


def test_latency_histograms_count_every_request(serve, tmp_path):
    port = free_port()
    s = serve(config_text(tmp_path, f"  prometheus_port: {port}\n"))
    c = control(tmp_path)
    h = s.connect()
    for i in range(3):
        h.pwrite(b"l" * (64 * KiB), i * 64 * KiB)
    h.pread(64 * KiB, 0)                                # cached: a hit
    h.pread(64 * KiB, 0)
    h.pread(64 * KiB, 32 * MiB)                         # never touched: a miss
    h.flush()
    st = c.stats()
    assert st["latency_write"]["count"] == 3
    assert st["latency_read_hit"]["count"] == 2 and st["latency_read_miss"]["count"] == 1
    assert st["latency_flush"]["count"] == 1
    assert 0 < st["latency_write"]["p50"] <= st["latency_write"]["p99"]
    from prometheus_client.parser import text_string_to_metric_families
    text = wait_for(lambda: _fetch(f"http://127.0.0.1:{port}/metrics"), "metrics").decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["nbdcache_latency_write"].type == "histogram"
    counts = {s.name: s.value for s in fams["nbdcache_latency_read_hit"].samples}
    assert counts["nbdcache_latency_read_hit_count"] == 2


def _fetch(url: str) -> bytes | None:
    import urllib.error
    import urllib.request
    try:
        return urllib.request.urlopen(url, timeout=5).read()
    except (urllib.error.URLError, ConnectionError):
        return None


def test_the_log_of_a_real_run_plots(serve, tmp_path):
    from nbdcache.plot import load, plot
    s = serve(config_text(tmp_path, stats_interval="0.2"))
    h = s.connect()
    i = 0
    log = tmp_path / "log.jsonl"

    def enough_samples() -> bool:
        nonlocal i
        h.pwrite(bytes([i % 256]) * (64 * KiB), (i % 512) * 64 * KiB)
        h.pread(64 * KiB, ((i * 7) % 1024) * 64 * KiB)
        if i % 16 == 0:
            h.flush()
        i += 1
        return log.exists() and len(log_events(tmp_path, "stats")) >= 6

    wait_for(enough_samples, "six stats events in the log", timeout=30)
    h.shutdown()
    s.stop()
    samples = load(log)
    assert samples[-1][1].get("final") is True
    assert [t for t, _ in samples] == sorted(t for t, _ in samples)
    out = plot(log, tmp_path / "run.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_nbdcache_stats_and_set_commands(serve, tmp_path):
    from nbdcache.cli import plugin_env
    cfg_text = config_text(tmp_path)
    s = serve(cfg_text)
    control(tmp_path)
    cfg = tmp_path / "nbdcache.yaml"                    # the file serve() wrote
    assert cfg.read_text() == cfg_text
    h = s.connect()
    h.pwrite(b"c" * (64 * KiB), 0)

    def nbdcache(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nbdcache", *args], env=plugin_env(),
                              capture_output=True, text=True, timeout=60)

    r = nbdcache("stats", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["dirtybufspace"] == 64 * KiB
    r = nbdcache("stats", "--config", str(cfg), "--watch", "0.1", "--count", "2")
    assert r.returncode == 0 and "dirtykvaspace" in r.stdout and "/s" in r.stdout
    r = nbdcache("set", "cache.readahead=2", "--config", str(cfg))
    assert (r.returncode, r.stdout) == (0, "cache.readahead: 4 -> 2\n")
    r = nbdcache("set", "cache.ram=1G", "--config", str(cfg))
    assert r.returncode == 2 and "can only be set at startup" in r.stderr
