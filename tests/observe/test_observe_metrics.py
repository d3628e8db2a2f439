"""nbdcache.metrics: Prometheus text over HTTP from 127.0.0.1, parsed by prometheus_client."""

from __future__ import annotations

import socket
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import REGISTRY  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from nbdcache import config  # noqa: E402
from nbdcache import log as logmod  # noqa: E402
from nbdcache.engine import Engine  # noqa: E402
from nbdcache.histogram import LatencySet  # noqa: E402
from nbdcache.metrics import PrometheusExporter  # noqa: E402
from nbdcache.statistics import BY_NAME  # noqa: E402


@pytest.fixture
def engine(tmp_path):
    logmod.configure("warning", str(tmp_path / "log.jsonl"))
    cfg = config.load(None, {"backend.type": "memory", "backend.size": "64M",
                             "cache.ram": "8M"})
    e = Engine(cfg)
    e.start()
    yield e
    e.stop()


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_every_statistic_is_exposed_with_its_type_and_help(engine):
    engine.pwrite(memoryview(b"z" * 65536), 0)
    engine.pread(memoryview(bytearray(4096)), 0)
    ex = PrometheusExporter(engine, 0)
    ex.start()
    try:
        fams = scrape(ex.port)
    finally:
        ex.stop()
    for name, value in engine.stats().items():
        st = BY_NAME[name]
        fam = fams[f"nbdcache_{name}"]
        assert fam.type == st.kind, name
        assert fam.documentation.startswith(st.help), name
    assert fams["nbdcache_hits"].samples[0].name == "nbdcache_hits_total"
    assert fams["nbdcache_hits"].samples[0].value == 1
    assert fams["nbdcache_writes"].samples[0].value == 1
    assert fams["nbdcache_dirtybufspace"].samples[0].value == 65536
    assert not any(n.startswith("nbdcache_") for n in REGISTRY._names_to_collectors)


def test_histograms_become_prometheus_histograms(engine):
    lat = LatencySet()
    for ns in (1500, 3000, 2_000_000):
        lat.read_hit.record(ns)

    class WithLatency:
        def stats(self):
            return {**engine.stats(), **lat.snapshot()}

    ex = PrometheusExporter(WithLatency(), 0)
    ex.start()
    try:
        fams = scrape(ex.port)
    finally:
        ex.stop()
    fam = fams["nbdcache_latency_read_hit"]
    assert fam.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert samples[("nbdcache_latency_read_hit_count", None)] == 3
    assert samples[("nbdcache_latency_read_hit_sum", None)] == pytest.approx(0.0020045)
    assert samples[("nbdcache_latency_read_hit_bucket", "+Inf")] == 3
    buckets = [v for (n, le), v in samples.items() if n.endswith("_bucket")]
    assert buckets == sorted(buckets)                    # cumulative
    assert fams["nbdcache_latency_write"].type == "histogram"


def test_swap_statistics_including_a_gauge_named_total(engine):
    class WithSwap:
        def stats(self):
            return {**engine.stats(), "swap_slots_total": 1000, "swap_slots_used": 10,
                    "swap_full": False, "swap_pageouts": 3}

    ex = PrometheusExporter(WithSwap(), 0)
    ex.start()
    try:
        fams = scrape(ex.port)
    finally:
        ex.stop()
    assert fams["nbdcache_swap_slots_total"].type == "gauge"
    assert fams["nbdcache_swap_slots_total"].samples[0].value == 1000
    assert fams["nbdcache_swap_full"].samples[0].value == 0
    assert fams["nbdcache_swap_pageouts"].samples[0].name == "nbdcache_swap_pageouts_total"


def test_binds_loopback_only_and_frees_the_port(engine):
    ex = PrometheusExporter(engine, 0)
    ex.start()
    port = ex.port
    try:
        assert ex._httpd.server_address[0] == "127.0.0.1"
    finally:
        ex.stop()
    with socket.socket() as s:                          # the port is free again
        s.bind(("127.0.0.1", port))
