"""Helpers for driving the cache policy without nbdkit: a fake clock, a recording
submit, a backend that can be told to fail."""

from __future__ import annotations

import errno
from concurrent.futures import Future
from typing import Any, Callable

from nbdcache.backend.memory import MemoryBackend
from nbdcache.core.bufinit import bufinit
from nbdcache.core.cache import BufCache

KiB = 1024
MiB = 1024 * KiB


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


class FaultyBackend(MemoryBackend):
    """A memory disk whose writes, reads or flushes fail while the switch is on."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.fail_writes = False
        self.fail_reads = False
        self.fail_flush = False

    def pwrite(self, buf: Any, offset: int) -> None:
        if self.fail_writes:
            raise OSError(errno.EIO, "injected write error")
        super().pwrite(buf, offset)

    def pread(self, buf: memoryview, offset: int) -> None:
        if self.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        super().pread(buf, offset)

    def flush(self) -> None:
        if self.fail_flush:
            raise OSError(errno.EIO, "injected flush error")
        super().flush()


class Deferred:
    """A submit() that queues calls until the test runs them: I/O completes on demand."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple, Future]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Future:
        f: Future = Future()
        self.pending.append((fn, args, f))
        return f

    def run_all(self) -> int:
        n = 0
        while self.pending:
            fn, args, f = self.pending.pop(0)
            f.set_result(fn(*args))
            n += 1
        return n


def make_cache(ram: int = 1 * MiB, block_size: int = 64 * KiB, disk: int = 8 * MiB,
               backend: MemoryBackend | None = None, **kw: Any) -> BufCache:
    params = bufinit({"cache.ram": ram, "cache.block_size": block_size})
    if isinstance(kw.get("submit"), Deferred):
        # I/O completes only when the test says so: guest writes must not wait for it.
        kw.setdefault("hidirtybufspace", 1 << 40)
        kw.setdefault("lodirtybufspace", 1 << 39)
    for k in ("hidirtybufspace", "lodirtybufspace", "hirunningspace", "hibufspace",
              "lobufspace"):
        if k in kw:
            params[k] = kw.pop(k)
    kw.setdefault("clock", FakeClock())
    kw.setdefault("readahead", 0)
    return BufCache(params, backend or FaultyBackend(disk), **kw)
