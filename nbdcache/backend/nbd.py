"""A remote NBD export through libnbd (``nbd://``, ``nbd+unix://``, ``nbds://``).

libnbd runs one synchronous command at a time per handle, so the backend opens
``connections`` handles and lends them to callers from a pool: misses and
write-back clusters proceed in parallel up to that count.  The export's size
and capabilities are read at connect time and respected: no trim or zero is
sent to a server that does not offer them (zero falls back to written zeroes),
and a flush goes to every handle unless the server advertises multi-conn.
"""

from __future__ import annotations

import errno
import queue
import threading

import nbd

from nbdcache.backend import Backend



def _chunks(offset: int, count: int, step: int = 1 << 30):
    """NBD lengths are 32-bit: split a large trim or zero into 1 GiB requests."""
    end = offset + count
    while offset < end:
        yield offset, min(step, end - offset)
        offset += step


# Errors a server may return that mean the same to our client; anything else (libnbd's own
# EINVAL/ENOTCONN for a dead connection, ...) is an I/O error of the backend: EIO.
_PASS_THROUGH = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EPERM, errno.ENOMEM,
                 errno.EFBIG, errno.EROFS}


def _oserror(e: "nbd.Error", what: str) -> OSError:
    code = getattr(e, "errnum", None)                # .errno is the name, .errnum the number
    if code not in _PASS_THROUGH:
        code = errno.EIO
    return OSError(code, f"{what}: {e.string}")


class NbdBackend(Backend):
    def __init__(self, uri: str, connections: int = 4) -> None:
        self.uri = uri
        self._handles: list[nbd.NBD] = []
        self._pool: queue.SimpleQueue[nbd.NBD] = queue.SimpleQueue()
        try:
            first = self._connect()
            self.size = first.get_size()
            self.read_only = bool(first.is_read_only())
            self.can_trim = bool(first.can_trim())
            self.can_zero = bool(first.can_zero())
            self.can_fua = bool(first.can_fua())
            self.can_flush = bool(first.can_flush())
            self.multi_conn = bool(first.can_multi_conn())
            for _ in range(connections - 1):
                self._connect()
        except nbd.Error as e:
            self.close()
            raise _oserror(e, f"backend.uri {uri!r}") from None
        if self.read_only:
            self.close()
            raise OSError(errno.EROFS, f"backend.uri {uri!r}: the export is read-only")
        self.description = f"nbd {uri} ({self.size} bytes, {connections} connections)"
        self._flush_lock = threading.Lock()

    def _connect(self) -> "nbd.NBD":
        h = nbd.NBD()
        h.set_handle_name("nbdcache-backend")
        h.set_uri_allow_local_file(True)         # ?tls-certificates=DIR for nbds:// URIs
        h.connect_uri(self.uri)
        self._handles.append(h)
        self._pool.put(h)
        return h

    def _run(self, what: str, fn, *args):
        h = self._pool.get()
        try:
            return fn(h, *args)
        except nbd.Error as e:
            raise _oserror(e, f"backend {what}") from None
        finally:
            self._pool.put(h)

    def pread(self, buf: memoryview, offset: int) -> None:
        def go(h: "nbd.NBD", buf: memoryview, offset: int) -> None:
            buf[:] = h.pread(len(buf), offset)
        self._run("pread", go, buf, offset)

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        self._run("pwrite", lambda h, b, o: h.pwrite(b, o), bytes(buf), offset)

    def flush(self) -> None:
        if not self.can_flush:
            return
        with self._flush_lock:
            if self.multi_conn:
                self._run("flush", lambda h: h.flush())
                return
            # Without multi-conn a flush only covers its own connection: take every handle.
            taken = [self._pool.get() for _ in self._handles]
            try:
                for h in taken:
                    h.flush()
            except nbd.Error as e:
                raise _oserror(e, "backend flush") from None
            finally:
                for h in taken:
                    self._pool.put(h)

    def trim(self, offset: int, count: int) -> None:
        if self.can_trim:
            for o, c in _chunks(offset, count):
                self._run("trim", lambda h, c, o: h.trim(c, o), c, o)

    def zero(self, offset: int, count: int) -> None:
        if self.can_zero:
            for o, c in _chunks(offset, count):
                self._run("zero", lambda h, c, o: h.zero(c, o), c, o)
            return
        self.write_zeroes(offset, count)

    def close(self) -> None:
        for h in self._handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self._handles.clear()
