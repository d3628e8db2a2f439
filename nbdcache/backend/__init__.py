"""The disk behind the cache: one small interface, three implementations.

A backend is used from many threads at once (nbdkit workers filling misses,
the I/O pool writing back clusters).  Every method may block; none takes the
engine lock.  Errors are ``OSError`` with the errno the guest should see.

``pread`` fills the whole buffer or raises; ``pwrite`` writes all of it or
raises.  ``flush`` makes every completed write durable.  ``trim`` is advisory
(the range may read back anything); ``zero`` makes the range read back zeroes.
"""

from __future__ import annotations

import abc
from typing import Any

_ZEROES = bytes(1024 * 1024)


class Backend(abc.ABC):
    size: int
    can_trim: bool = True
    can_zero: bool = True
    can_fua: bool = False
    description: str = ""

    @abc.abstractmethod
    def pread(self, buf: memoryview, offset: int) -> None: ...

    @abc.abstractmethod
    def pwrite(self, buf: memoryview | bytes, offset: int) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None: ...

    @abc.abstractmethod
    def trim(self, offset: int, count: int) -> None: ...

    @abc.abstractmethod
    def zero(self, offset: int, count: int) -> None: ...

    def write_zeroes(self, offset: int, count: int) -> None:
        """Zero a range by writing zeroes: the fallback where no cheaper way exists."""
        end = offset + count
        zeroes = memoryview(_ZEROES)
        while offset < end:
            n = min(len(_ZEROES), end - offset)
            self.pwrite(zeroes[:n], offset)
            offset += n

    def close(self) -> None:
        """Release the device; may block until in-flight I/O ends."""


def open_backend(cfg: Any) -> Backend:
    """Open the backend a validated Config describes; raises OSError/ValueError naming it."""
    kind = cfg["backend.type"]
    if kind == "file":
        from nbdcache.backend.file import FileBackend
        return FileBackend(cfg["backend.path"], size=cfg["backend.size"],
                           create=cfg["backend.create"])
    if kind == "nbd":
        from nbdcache.backend.nbd import NbdBackend
        return NbdBackend(cfg["backend.uri"], connections=cfg["backend.connections"],
                          retry_timeout=cfg["backend.retry_timeout"])
    from nbdcache.backend.memory import MemoryBackend
    return MemoryBackend(cfg["backend.size"])
