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
from typing import Any

from nbdcache import log as logmod
from nbdcache.backend import Backend, open_backend
from nbdcache.config import Config
from nbdcache.core.bufinit import bufinit
from nbdcache.core.cache import BufCache
from nbdcache.core.daemon import BufDaemons


class Engine:
    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.log = logmod.get("engine")
        self.backend = backend or open_backend(cfg)
        self.params = bufinit(cfg)
        self.cache = BufCache(
            self.params, self.backend,
            max_io=cfg["cache.max_io"], flushperqueue=cfg["cache.flushperqueue"],
            readahead=cfg["cache.readahead"], log=logmod.get("cache"),
            kick=self._kick,
        )
        self.daemons = BufDaemons(
            self.cache, interval=cfg["cache.daemon_interval"],
            io_threads=cfg["backend.io_threads"], log=logmod.get("daemon"),
            stats_interval=cfg["log.stats_interval"], on_stats=self.log_stats,
        )
        self.size = self.backend.size
        self.started = 0.0

    def _kick(self, hw: bool) -> None:
        self.daemons.kick(hw)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the daemons (nbdkit's after_fork).  Does not block for long."""
        self.daemons.start()
        self.started = time.monotonic()
        self.log.info("engine.start", backend=self.backend.description, **{
            k: v for k, v in self.params.items()})

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
        self.backend.close()
        self.log.info("engine.stop")

    def log_stats(self, final: bool = False) -> None:
        self.log.info("stats", final=final, **self.stats())

    def stats(self) -> dict[str, Any]:
        out = self.cache.counters()
        out["daemon_passes"] = self.daemons.passes[0]
        out["daemon_hw_passes"] = self.daemons.passes[1]
        out["uptime"] = round(time.monotonic() - self.started, 3) if self.started else 0.0
        return out

    # -- the data path -------------------------------------------------------------------

    def _check(self) -> None:
        if self.daemons.failed is not None:
            raise OSError(errno.EIO, f"a flush daemon failed: {self.daemons.failed!r}")

    def pread(self, buf: memoryview, offset: int) -> None:
        self.cache.pread(buf, offset)

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self.daemons.failed is not None:
            self._check()
        self.cache.pwrite(buf, offset, fua)

    def flush(self) -> None:
        self._check()
        self.cache.flush()

    def trim(self, offset: int, count: int, fua: bool = False) -> None:
        self._check()
        self.cache.discard(offset, count, zero=False, fua=fua)

    def zero(self, offset: int, count: int, fua: bool = False) -> None:
        self._check()
        self.cache.discard(offset, count, zero=True, fua=fua)

    def prefetch(self, offset: int, count: int) -> None:
        self.cache.prefetch(offset, count)
