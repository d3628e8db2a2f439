"""Prometheus text metrics on 127.0.0.1: every statistic as ``nbdcache_<name>``.

Theory of operation
-------------------
A :class:`PrometheusExporter` owns one ``prometheus_client`` HTTP server bound to
the loopback address only, and a fresh ``CollectorRegistry`` holding one
collector (the process-wide default registry is never touched, so tests and a
host process stay unpolluted).  On every scrape the collector calls
``Engine.stats()`` once and turns each value into a metric family typed and
described by ``nbdcache.statistics``:

* a *counter* becomes a Prometheus counter (exposed as ``nbdcache_<name>_total``);
* a *gauge*, or a numeric statistic the table lacks, becomes a gauge (flags
  and booleans as 0/1);
* a *histogram* snapshot (``nbdcache.histogram``) becomes a Prometheus
  histogram with cumulative ``le`` buckets in seconds, ``_sum`` and ``_count``.

The unit is stated in the help text, not as an OpenMetrics unit, because the
metric names keep the statistic names (``nbdcache_bufspace``, not
``nbdcache_bufspace_bytes``).

Ownership: started by ``Engine.start()`` through
``nbdcache.control.start_observers`` when ``server.prometheus_port`` is set,
stopped by ``Engine.stop()``.  A scrape takes the engine lock briefly, inside
``Engine.stats()``; nothing here holds it.
"""

from __future__ import annotations

from typing import Any, Iterator

from nbdcache import log as logmod
from nbdcache.histogram import Histogram, is_snapshot
from nbdcache.statistics import lookup

PREFIX = "nbdcache_"
LOOPBACK = "127.0.0.1"


class StatsCollector:
    """A prometheus_client collector reading ``engine.stats()`` on every collect()."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString
        for name, value in self.engine.stats().items():
            st = lookup(name)
            help_ = (f"{st.help} Unit: {st.unit}." if st else
                     "Not in nbdcache.statistics (see docs/statistics.md).")
            metric = PREFIX + name
            if is_snapshot(value):
                h = Histogram.from_snapshot(value)
                yield HistogramMetricFamily(
                    metric, help_,
                    buckets=[(floatToGoString(u), c) for u, c in h.cumulative()],
                    sum_value=h.sum_ns / 1e9)
            elif isinstance(value, (bool, int, float)):
                if st is not None and st.kind == "counter":
                    yield CounterMetricFamily(metric, help_, value=float(value))
                else:
                    yield GaugeMetricFamily(metric, help_, value=float(value))

    def describe(self) -> list[Any]:
        return []                           # no engine call at registration time


class PrometheusExporter:
    """Serve the engine's statistics at ``http://127.0.0.1:PORT/metrics``.

    ``port`` 0 picks a free port (tests); ``self.port`` is the bound port after
    ``start()``.
    """

    def __init__(self, engine: Any, port: int, log: Any = None) -> None:
        self.engine = engine
        self.port = port
        self.log = log or logmod.get("metrics")
        self._httpd: Any = None
        self._thread: Any = None

    def start(self) -> None:
        """Bind 127.0.0.1:port and serve from a daemon thread.  Raises OSError if the port is
        taken.  Call after fork."""
        from prometheus_client import CollectorRegistry, start_http_server
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(self.engine))
        started = start_http_server(self.port, addr=LOOPBACK, registry=registry)
        if not started:
            raise RuntimeError("prometheus_client >= 0.17 is needed (start_http_server must "
                               "return its server)")
        self._httpd, self._thread = started
        self.port = self._httpd.server_port
        self.log.info("metrics.start", address=f"http://{LOOPBACK}:{self.port}/metrics")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the port.  Blocks up to about half a second (the server's
        poll interval)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)
        self._httpd = self._thread = None
        self.log.info("metrics.stop", port=self.port)
