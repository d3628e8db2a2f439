"""A volatile disk in a bytearray: the plain model for tests and a benchmark target."""

from __future__ import annotations

import errno
import threading

from nbdcache.backend import Backend


class MemoryBackend(Backend):
    """Writes land in RAM; ``flush`` is a no-op.  Thread-safe through one lock."""

    def __init__(self, size: int) -> None:
        """Allocate ``size`` bytes; raises OSError(ENOMEM) naming backend.size when the
        process cannot have them."""
        self.size = size
        try:
            self.data = bytearray(size)
        except (MemoryError, OverflowError):
            raise OSError(errno.ENOMEM, f"backend.size: got {size}, expected at most the "
                          "memory this process can allocate for backend.type=memory") from None
        self._lock = threading.Lock()
        self.description = f"memory ({size} bytes)"
        self.writes: list[tuple[int, int]] = []   # (offset, length) of every pwrite
        self.flushes = 0

    def pread(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        with self._lock:
            self.data[offset:offset + len(buf)] = buf
            self.writes.append((offset, len(buf)))

    def flush(self) -> None:
        with self._lock:
            self.flushes += 1

    def trim(self, offset: int, count: int) -> None:
        self.zero(offset, count)

    def zero(self, offset: int, count: int) -> None:
        with self._lock:
            self.data[offset:offset + count] = bytes(count)
