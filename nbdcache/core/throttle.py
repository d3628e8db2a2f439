"""Dirty-space and running-I/O accounting, and the throttles built on it.

Theory of operation (vfs_bio.c L216–513)
----------------------------------------
Two quantities drive everything:

* ``dirtykvaspace``: ``block_size`` for every ``B_DELWRI`` buffer (the kernel
  counts the 64 KiB KVA reservation of each dirty buffer; here it is the
  memory a dirty buffer pins).  ``dirtybufspace`` counts the bytes of dirty
  sectors and is a statistic only, as in the kernel.
* ``runningbufspace``: bytes of write-back in flight to the backend.

From ``total = runningbufspace + dirtykvaspace`` and the watermarks:

* ``bd_heatup`` (called on every clean→dirty transition) kicks the daemons
  through ``bd_speedup`` once ``total >= mid1`` and returns how far ``total``
  is past ``mid2``;
* a guest write that finds an excess calls ``bd_wait(excess)``: it takes a
  ticket on the progress counter ``bd_wake_index`` (the user-space
  ``bd_wake_ary``) and sleeps until write-back has retired about ``excess``
  bytes, then keeps waiting while ``total > hidirtybufspace``;
* ``bd_signal(bytes)`` advances the progress counter one step per
  ``block_size`` on every write-back completion (``runningbufwakeup``) and
  every dirty→clean transition (``bundirty``): a successful write advances it
  twice, as in the kernel;
* the daemons call ``waitrunningbufspace`` (``aiowait_running``) before each
  pass: it blocks while more than 4/6 of ``hirunningspace`` is in flight, and
  a newcomer also waits while another waiter is queued (fairness).

Locking: every method is called with the engine lock held; waits release it.
Waiters on the progress counter are nbdkit threads (``threading.Condition``);
waiters on running space are the daemons (asyncio), woken through their loop.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Mapping

from nbdcache.core.bufinit import midpoints


class Throttle:
    def __init__(self, lock: threading.Lock, params: Mapping[str, int],
                 kick: Callable[[bool], None], clock: Callable[[], float]) -> None:
        self.lock = lock
        self.clock = clock
        self.block_size = params["block_size"]
        self.nbuf = params["nbuf"]
        self.hidirtybufspace = params["hidirtybufspace"]
        self.lodirtybufspace = params["lodirtybufspace"]
        self.hirunningspace = params["hirunningspace"]
        self._kick = kick                   # wakes buf_daemon (False) or buf_daemon_hw (True)
        self._mids_key: tuple[int, int] | None = None
        self._mids_val = (0, 0)
        # counters (sysctl names)
        self.dirtybufcount = 0
        self.dirtybufcounthw = 0
        self.dirtykvaspace = 0
        self.dirtybufspace = 0
        self.dirtybufspacehw = 0
        self.runningbufspace = 0
        self.runningbufcount = 0
        self.runningbufreq = 0
        self.bd_request = 0
        self.bd_request_hw = 0
        self.bd_wake_index = 0
        self._wake_waiters = 0
        self._cv_wake = threading.Condition(lock)
        self._running_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        # statistics
        self.bd_wait_blocks = 0
        self.bd_wait_seconds = 0.0
        self.bd_speedup_kicks = 0
        self.waitrunningbufspace_blocks = 0

    # -- predicates ------------------------------------------------------------------

    def buf_dirty_count_severe(self) -> bool:
        """True when dirty+running reached hidirtybufspace or half the buffers are dirty."""
        return (self.runningbufspace + self.dirtykvaspace >= self.hidirtybufspace
                or self.dirtybufcount >= self.nbuf // 2)

    def buf_runningbufspace_severe(self) -> bool:
        return self.runningbufspace >= self.hirunningspace * 4 // 6

    def buf_daemon_limit(self, limit: int) -> bool:
        return (self.runningbufspace + self.dirtykvaspace > limit
                or self.dirtybufcount - self.dirtybufcounthw >= self.nbuf // 2)

    def buf_daemon_hw_limit(self, limit: int) -> bool:
        return (self.runningbufspace + self.dirtykvaspace > limit
                or self.dirtybufcounthw >= self.nbuf // 2)

    # -- kicking the daemons -----------------------------------------------------------

    def bd_speedup(self) -> None:
        """Wake the daemons if dirty space passed lodirtybufspace (L388–407). Never blocks."""
        if self.dirtykvaspace < self.lodirtybufspace and self.dirtybufcount < self.nbuf // 2:
            return
        if self.bd_request == 0 and (self.dirtykvaspace > self.lodirtybufspace // 2 or
                                     self.dirtybufcount - self.dirtybufcounthw
                                     >= self.nbuf // 2):
            self.bd_request = 1
            self.bd_speedup_kicks += 1
            self._kick(False)
        if self.bd_request_hw == 0 and self.dirtybufcounthw and (
                self.dirtykvaspace > self.lodirtybufspace // 2 or
                self.dirtybufcounthw >= self.nbuf // 2):
            self.bd_request_hw = 1
            self._kick(True)

    def _mids(self) -> tuple[int, int]:
        """(mid1, mid2), recomputed only when a mark changed (they are live tunables)."""
        key = (self.lodirtybufspace, self.hidirtybufspace)
        if key != self._mids_key:
            self._mids_key, self._mids_val = key, midpoints(self._marks())
        return self._mids_val

    def bd_heatup(self) -> int:
        """Kick the daemons past mid1; return the bytes past mid2 (L418–435). Never blocks."""
        mid1, mid2 = self._mids()
        total = self.runningbufspace + self.dirtykvaspace
        if total >= mid1 or self.dirtybufcount >= self.nbuf // 2:
            self.bd_speedup()
            if total >= mid2:
                return total - mid2
        return 0

    def mid1(self) -> int:
        """The first mid-point: past it the daemons are kicked (and swap takes dirty spill)."""
        return self._mids()[0]

    def _marks(self) -> dict[str, int]:
        return {"lodirtybufspace": self.lodirtybufspace, "hidirtybufspace": self.hidirtybufspace}

    # -- the progress ticket -------------------------------------------------------------

    def bd_wait(self, totalspace: int) -> None:
        """Block until write-back retired ~totalspace bytes and dirty+running <= hidirty.

        Called by guest writers (never by the daemons) with the engine lock
        held; the lock is released while sleeping.  Each sleep is bounded by one
        second, after which the condition is re-evaluated (L446–488).
        """
        started = None
        while totalspace > 0:
            self.bd_heatup()
            i = self.bd_wake_index
            total = self.runningbufspace + self.dirtykvaspace
            if totalspace > total:
                totalspace = total
            count = min(totalspace // self.block_size, 8192)
            target = i + count
            if started is None:
                started = self.clock()
                self.bd_wait_blocks += 1
            self._wake_waiters += 1
            try:
                self._cv_wake.wait_for(lambda: self.bd_wake_index > target, timeout=1.0)
            finally:
                self._wake_waiters -= 1
            totalspace = self.runningbufspace + self.dirtykvaspace - self.hidirtybufspace
        if started is not None:
            self.bd_wait_seconds += self.clock() - started

    def bd_signal(self, totalspace: int) -> None:
        """Advance the progress counter one step per block_size of retired bytes (L497–513)."""
        if totalspace > 0:
            steps = -(-totalspace // self.block_size)
            self.bd_wake_index += min(steps, 16384)
            if self._wake_waiters:
                self._cv_wake.notify_all()

    # -- running write-back ----------------------------------------------------------------

    def bsetrunningbufspace(self, nbytes: int) -> None:
        self.runningbufspace += nbytes
        self.runningbufcount += 1

    def runningbufwakeup(self, nbytes: int) -> None:
        """A write-back of ``nbytes`` completed: release it and wake waiters (L255–282)."""
        self.runningbufspace -= nbytes
        self.runningbufcount -= 1
        if self.runningbufreq:
            self.runningbufreq = 0
            self._wake_running()
        self.bd_signal(nbytes)

    def _wake_running(self) -> None:
        waiters, self._running_waiters = self._running_waiters, []
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    async def waitrunningbufspace(self) -> None:
        """Daemon side: wait while running > 4/6 hirunningspace or others wait (L322–334).

        The kernel can leave ``runningbufreq`` set when its last completion
        raced the increment; here a waiter whose one-second sleep ends with
        nothing in flight clears the stale request word instead of sleeping on.
        """
        loop = asyncio.get_running_loop()
        while True:
            with self.lock:
                limit = self.hirunningspace * 4 // 6
                if not (self.runningbufspace > limit or self.runningbufreq):
                    return
                flags = self.runningbufreq
                self.runningbufreq += 1
                if not (self.runningbufspace > limit or flags):
                    continue
                ev = asyncio.Event()
                self._running_waiters.append((loop, ev))
                self.waitrunningbufspace_blocks += 1
            try:
                await asyncio.wait_for(ev.wait(), 1.0)
            except asyncio.TimeoutError:
                with self.lock:
                    if self.runningbufcount == 0:
                        self.runningbufreq = 0
