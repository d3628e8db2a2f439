"""The flush daemons and the thread that runs them.

Theory of operation (vfs_bio.c L2228–2316)
------------------------------------------
``buf_daemon`` flushes the DIRTY queue and ``buf_daemon_hw`` the DIRTY_HW
queue; both run ``buf_daemon1``::

    loop:
        waitrunningbufspace()                 # wait while > 4/6 hirunningspace in flight
        limit = lodirtybufspace / 2           # the two daemons split the low mark
        while limit_fn(limit):                # dirty + running above it
            if flushbufqueues(queue) == 0: break
            if runningbufspace < hirunningspace: continue
            waitrunningbufspace()
        sleep until kicked (bd_speedup) or daemon_interval (1 s) passes

With swap, ``buf_daemon_hw`` also drains dirty swap copies to the backend
(``BufCache.swap_drain``) and a third task, ``swap_daemon`` (the part of
``vm_pageout`` that feeds the swap pager), spills dirty buffers and copies
clean ones to swap (``BufCache.swap_pass``); both run their I/O on the pool.

They are asyncio tasks on one event loop running in a thread the engine owns:
``start()`` (from nbdkit's ``after_fork``) creates the loop thread and the I/O
thread pool that carries out write-back and read-ahead, ``stop()`` (from
``cleanup``) stops them and waits.  The daemons never block the loop: queue
scans take the engine lock briefly and I/O goes to the pool.  A daemon that
raises is recorded in ``failed``; the engine then fails every request with EIO
instead of silently serving without write-back.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from nbdcache.core.buf import QUEUE_DIRTY, QUEUE_DIRTY_HW
from nbdcache.core.cache import BufCache


class BufDaemons:
    def __init__(self, cache: BufCache, *, interval: float = 1.0, io_threads: int = 4,
                 log: Any = None, stats_interval: float = 0.0,
                 on_stats: Callable[[], None] | None = None) -> None:
        self.cache = cache
        self.interval = interval
        self.io_threads = io_threads
        self.log = log
        self.stats_interval = stats_interval
        self.on_stats = on_stats
        self.failed: BaseException | None = None
        self.passes = [0, 0]               # buf_daemon1 wake-ups: normal, hw
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._events: list[asyncio.Event] = []
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    # -- ownership -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the I/O pool and the loop thread with both daemons.  Call after fork."""
        self.pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="nbdcache-io")
        self.cache.submit = self.pool.submit
        self._thread = threading.Thread(target=self._run, name="nbdcache-loop", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the daemons, then drain the I/O pool.  Blocks up to ``timeout``."""
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.loop = None

    def kick(self, hw: bool) -> None:
        """bd_speedup's wakeup.  Called with the engine lock held; never blocks."""
        loop = self.loop
        if loop is not None and self._events:
            loop.call_soon_threadsafe(self._events[int(hw)].set)

    def kick_swap(self) -> None:
        """Wake the swap daemon (getnewbuf recycles blocks swap has no copy of)."""
        loop = self.loop
        if loop is not None and self._events:
            loop.call_soon_threadsafe(self._events[2].set)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._events = [asyncio.Event(), asyncio.Event(), asyncio.Event()]
        self._stop = asyncio.Event()
        t = self.cache.throttle
        tasks = [
            asyncio.create_task(self._guard("buf_daemon", self.buf_daemon1(
                QUEUE_DIRTY, t.buf_daemon_limit, hw=False))),
            asyncio.create_task(self._guard("buf_daemon_hw", self.buf_daemon1(
                QUEUE_DIRTY_HW, t.buf_daemon_hw_limit, hw=True))),
        ]
        if self.cache.pager is not None:
            tasks.append(asyncio.create_task(self._guard("swap_daemon", self.swap_daemon())))
        if self.on_stats is not None:
            tasks.append(asyncio.create_task(self._guard("stats", self._stats_loop())))
        self._ready.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _guard(self, name: str, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - recorded, logged and surfaced to requests
            self.failed = e
            if self.log:
                self.log.error("daemon.failed", daemon=name, error=repr(e))

    # -- the daemons ---------------------------------------------------------------------

    async def buf_daemon1(self, qindex: int, limit_fn: Callable[[int], bool], hw: bool) -> None:
        cache = self.cache
        t = cache.throttle
        lock = cache.lock
        event = self._events[int(hw)]
        while True:
            await t.waitrunningbufspace()
            self.passes[int(hw)] += 1
            while True:
                with lock:
                    go = limit_fn(t.lodirtybufspace // 2)
                if not go:
                    break
                if cache.flushbufqueues(qindex) == 0:
                    break
                with lock:
                    below = t.runningbufspace < t.hirunningspace
                if below:
                    await asyncio.sleep(0)
                    continue
                await t.waitrunningbufspace()
            if hw and cache.pager is not None and cache.pager.ndirty:
                # Dirty data spilled to swap goes to the backend while pressure is low.
                drained = await asyncio.get_running_loop().run_in_executor(
                    self.pool, cache.swap_drain)
                if drained:
                    with lock:
                        t.bd_request_hw = 1
            with lock:
                if hw:
                    req, t.bd_request_hw = t.bd_request_hw, 0
                else:
                    req, t.bd_request = t.bd_request, 0
            if not req:
                try:
                    await asyncio.wait_for(event.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
            event.clear()

    async def swap_daemon(self) -> None:
        """The pageout daemon's part: dirty spill when the guest is about to wait for a
        saturated backend, and the swapcache copy of clean buffers about to be recycled.
        Runs its passes on the I/O pool (they do swap I/O); repeats at once while a pass
        finds work, else sleeps until kicked or 100 ms."""
        event = self._events[2]
        loop = asyncio.get_running_loop()
        while True:
            n = await loop.run_in_executor(self.pool, self.cache.swap_pass)
            if n:
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(event.wait(), min(self.interval, 0.1))
            except asyncio.TimeoutError:
                pass
            event.clear()

    async def _stats_loop(self) -> None:
        while True:
            interval = self.stats_interval
            await asyncio.sleep(interval if interval > 0 else 1.0)
            if interval > 0 and self.on_stats is not None:
                self.on_stats()
