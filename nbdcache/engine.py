"""The engine: one per export, shared by every connection.

It puts a validated configuration together: the backend, the buffer cache
sized by ``bufinit()``, and the daemons that write back.  nbdkit's callbacks
(``nbdcache.plugin``) call only the methods here.  Construction opens the
backend and allocates the arena but starts no thread (it runs before nbdkit
forks); ``start()`` runs from ``after_fork`` and ``stop()`` from ``cleanup``.

Because every connection shares the one cache, a write acknowledged on one
connection is seen by a read on any other, and a flush on any connection
writes back everything: ``can_multi_conn`` is honest.
"""

from __future__ import annotations

import errno
import time
from time import perf_counter_ns
from typing import Any

from nbdcache import log as logmod
from nbdcache.backend import Backend, open_backend
from nbdcache.config import Config
from nbdcache.core.bufinit import bufinit
from nbdcache.core.cache import BufCache
from nbdcache.core.daemon import BufDaemons
from nbdcache.histogram import LatencySet


def open_swap(cfg: Config, block_size: int) -> Any:
    """Open the swap devices and the pager a validated Config describes.

    Raises ConfigError naming ``swap.devices`` (and the device) on a bad path,
    size or setting; no swap file is left half-made by a failed startup.
    """
    from nbdcache.config import ConfigError
    from nbdcache.swap.device import SwapDevice, SwapDeviceError
    from nbdcache.swap.pager import SwapPager
    devices = []
    try:
        for i, d in enumerate(cfg["swap.devices"]):
            try:
                devices.append(SwapDevice(d["path"], d["size"], d["create"], block_size))
            except (OSError, SwapDeviceError) as e:
                raise ConfigError(f"swap.devices[{i}] ({d['path']}): {e}") from None
        try:
            return SwapPager(devices, block_size, dmmax=cfg["swap.dmmax"],
                             nsw_cluster_max=cfg["swap.cluster_max"],
                             swap_async_max=cfg["swap.swap_async_max"],
                             nswap_lowat=cfg["swap.nswap_lowat"],
                             nswap_hiwat=cfg["swap.nswap_hiwat"], log=logmod.get("swap"))
        except ValueError as e:
            raise ConfigError(f"swap.devices: {e}") from None
    except BaseException:
        for d in devices:
            d.close()
        raise


class Engine:
    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.log = logmod.get("engine")
        self.backend = backend or open_backend(cfg)
        self.params = bufinit(cfg)
        if hasattr(self.backend, "set_journal_max"):
            # unflushed write-back kept for replay (NBD): as much as may be in flight
            self.backend.set_journal_max(self.params["hirunningspace"])
        self.pager = open_swap(cfg, self.params["block_size"]) if cfg["swap.devices"] else None
        self.cache = BufCache(
            self.params, self.backend,
            max_io=cfg["cache.max_io"], flushperqueue=cfg["cache.flushperqueue"],
            readahead=cfg["cache.readahead"], log=logmod.get("cache"),
            kick=self._kick, pager=self.pager, spill=cfg["swap.spill"],
            kick_swap=self._kick_swap,
        )
        self.daemons = BufDaemons(
            self.cache, interval=cfg["cache.daemon_interval"],
            io_threads=cfg["backend.io_threads"], log=logmod.get("daemon"),
            stats_interval=cfg["log.stats_interval"], on_stats=self.log_stats,
        )
        self.size = self.backend.size
        self.started = 0.0
        self.observers: list = []
        self.latency = LatencySet()

    def _kick(self, hw: bool) -> None:
        self.daemons.kick(hw)

    def _kick_swap(self) -> None:
        self.daemons.kick_swap()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the daemons (nbdkit's after_fork).  Does not block for long."""
        self.daemons.start()
        self.started = time.monotonic()
        self.log.info("engine.start", backend=self.backend.description, **{
            k: v for k, v in self.params.items()})
        from nbdcache.control import start_observers
        self.observers = start_observers(self)     # control socket, Prometheus: if configured

    def stop(self) -> None:
        """Flush if configured, stop the daemons, close the backend (nbdkit's cleanup)."""
        if self.cfg["cache.flush_on_shutdown"]:
            t0 = time.monotonic()
            try:
                self.cache.flush()
                self.log.info("shutdown.flush", seconds=round(time.monotonic() - t0, 3))
            except OSError as e:
                self.log.error("shutdown.flush_failed", error=str(e),
                               dirty=self.cache.throttle.dirtybufcount)
        self.daemons.stop()
        self.log_stats(final=True)
        from nbdcache.control import stop_observers
        stop_observers(self.observers)
        self.backend.close()
        if self.pager is not None:
            self.pager.close()
        self.log.info("engine.stop")

    def log_stats(self, final: bool = False) -> None:
        self.log.info("stats", final=final, **self.stats())

    def stats(self) -> dict[str, Any]:
        out = self.cache.counters()
        out["daemon_passes"] = self.daemons.passes[0]
        out["daemon_hw_passes"] = self.daemons.passes[1]
        out["uptime"] = round(time.monotonic() - self.started, 3) if self.started else 0.0
        out.update(self.latency.snapshot())
        return out

    # -- live tunables ------------------------------------------------------------------

    def tunables(self) -> dict[str, Any]:
        """Current values of every live tunable, by dotted key."""
        c, t = self.cache, self.cache.throttle
        return {
            "cache.hidirtybufspace": t.hidirtybufspace,
            "cache.lodirtybufspace": t.lodirtybufspace,
            "cache.hirunningspace": t.hirunningspace,
            "cache.flushperqueue": c.flushperqueue,
            "cache.max_io": c.max_io,
            "cache.readahead": c.readahead,
            "cache.daemon_interval": self.daemons.interval,
            "log.stats_interval": self.daemons.stats_interval,
            "backend.retry_timeout": getattr(self.backend, "retry_timeout",
                                             self.cfg["backend.retry_timeout"]),
            **({} if self.pager is None else {
                "swap.spill": c.spill,
                "swap.swap_async_max": self.pager.swap_async_max,
                "swap.nswap_lowat": self.pager.nswap_lowat,
                "swap.nswap_hiwat": self.pager.nswap_hiwat,
            }),
        }

    def set_tunable(self, key: str, raw: Any) -> tuple[Any, Any]:
        """Change a live tunable with the startup validation; return (old, new).

        Raises ConfigError naming the key and the problem; nothing changes then.
        Lo/high pairs are checked together against the current other half.
        """
        from nbdcache.config import BY_KEY, LIVE, ConfigError, check_pairs, parse_value
        t = BY_KEY.get(key)
        value = parse_value(key, raw)           # unknown keys and bad values raise here
        if t.mutability != LIVE:
            raise ConfigError(f"{key}: can only be set at startup (in the YAML file or with "
                              "--set); restart the server to change it")
        if value is None:
            raise ConfigError(f"{key}: a value is required")
        current = self.tunables()
        if key not in current:
            raise ConfigError(f"{key}: not adjustable on this server")
        old = current[key]
        c, th = self.cache, self.cache.throttle
        with c.lock:
            params = dict(self.params)
            params.update({k.split(".")[1]: v for k, v in current.items()
                           if k.split(".")[1] in params})
            short = key.split(".")[1]
            if short in params:
                params[short] = value
                check_pairs(params)
            if key == "cache.max_io" and (value < c.block_size or value % c.block_size):
                raise ConfigError(f"{key}: got {raw!r}, expected a multiple of "
                                  f"cache.block_size ({c.block_size})")
            if short in ("hidirtybufspace", "lodirtybufspace", "hirunningspace"):
                setattr(th, short, value)
                self.params[short] = value
            elif short in ("flushperqueue", "max_io", "readahead"):
                setattr(c, short, value)
            elif key == "cache.daemon_interval":
                self.daemons.interval = value
            elif key == "log.stats_interval":
                self.daemons.stats_interval = value
            elif key == "backend.retry_timeout":
                self.backend.retry_timeout = value
            elif key == "swap.spill":
                c.spill = value
            elif key == "swap.swap_async_max":
                value = self.pager.set_swap_async_max(value)
            elif key in ("swap.nswap_lowat", "swap.nswap_hiwat"):
                lo, hi = self.pager.nswap_lowat, self.pager.nswap_hiwat
                lo, hi = (value, hi) if key.endswith("lowat") else (lo, value)
                try:
                    self.pager.set_watermarks(lo, hi)
                except ValueError as e:
                    raise ConfigError(f"{key}: got {raw!r}, expected {e}") from None
            th.bd_speedup()                     # a lowered mark takes effect at once
        self.log.info("tunable.set", key=key, old=old, new=value)
        return old, value

    # -- the data path -------------------------------------------------------------------

    def _check(self) -> None:
        if self.daemons.failed is not None:
            raise OSError(errno.EIO, f"a flush daemon failed: {self.daemons.failed!r}")

    # Latency is recorded outside the engine lock: a concurrent miss can move a hit into the
    # miss histogram; the counts stay exact.

    def pread(self, buf: memoryview, offset: int) -> None:
        st = self.cache.stats
        t0, misses = perf_counter_ns(), st.misses
        self.cache.pread(buf, offset)
        lat = self.latency
        (lat.read_hit if st.misses == misses else lat.read_miss).record(perf_counter_ns() - t0)

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self.daemons.failed is not None:
            self._check()
        t0 = perf_counter_ns()
        self.cache.pwrite(buf, offset, fua)
        self.latency.write.record(perf_counter_ns() - t0)

    def flush(self) -> None:
        self._check()
        t0 = perf_counter_ns()
        self.cache.flush()
        self.latency.flush.record(perf_counter_ns() - t0)

    def trim(self, offset: int, count: int, fua: bool = False) -> None:
        self._check()
        t0 = perf_counter_ns()
        self.cache.discard(offset, count, zero=False, fua=fua)
        self.latency.trim.record(perf_counter_ns() - t0)

    def zero(self, offset: int, count: int, fua: bool = False) -> None:
        self._check()
        t0 = perf_counter_ns()
        self.cache.discard(offset, count, zero=True, fua=fua)
        self.latency.zero.record(perf_counter_ns() - t0)

    def prefetch(self, offset: int, count: int) -> None:
        self.cache.prefetch(offset, count)
