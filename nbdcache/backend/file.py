"""A raw image file or block device.

Positional I/O (``preadv``/``pwritev`` straight to and from the caller's
buffers), ``fdatasync`` on flush, hole punching on trim and zero where the
filesystem allows (``fallocate(PUNCH_HOLE|KEEP_SIZE)``), ``BLKDISCARD`` /
``BLKZEROOUT`` on block devices, and written zeroes where neither works.
A missing image is created sparse at the configured size.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from nbdcache.backend import Backend

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FileBackend(Backend):
    def __init__(self, path: str, size: int | None = None, create: bool = True) -> None:
        self.path = path
        exists = os.path.exists(path)
        if not exists and not create:
            raise FileNotFoundError(errno.ENOENT, f"backend.path {path!r} does not exist "
                                    "and backend.create is false")
        if not exists and not size:
            raise ValueError(f"backend.path {path!r} does not exist; set backend.size to "
                             "create it")
        if not exists:
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise FileNotFoundError(errno.ENOENT, f"backend.path {path!r}: directory "
                                        f"{parent!r} does not exist")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"backend.path {path!r}: {e.strerror}") from None
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if self.is_block:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("Q", buf)[0]
        elif not exists:
            os.ftruncate(self.fd, size)
            self.size = size
        else:
            self.size = st.st_size
        if size and size != self.size:
            os.close(self.fd)
            raise ValueError(f"backend.size is {size} but {path!r} holds {self.size} bytes; "
                             "remove backend.size or resize the image")
        if self.size == 0:
            os.close(self.fd)
            raise ValueError(f"backend.path {path!r} is empty; set backend.size or remove it")
        self.description = f"{'block device' if self.is_block else 'file'} {path}"
        self._punch = not self.is_block

    def pread(self, buf: memoryview, offset: int) -> None:
        done, n = 0, len(buf)
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:            # past EOF of a file that shrank: reads as zeroes
                buf[done:] = bytes(n - done)
                return
            done += got

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        mv = memoryview(buf)
        done, n = 0, len(mv)
        while done < n:
            done += os.pwritev(self.fd, [mv[done:]], offset + done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, count: int) -> None:
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, count))
            elif self._punch:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            self._punch = False      # advisory: a filesystem without holes just keeps data

    def zero(self, offset: int, count: int) -> None:
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, count))
                return
            if self._punch:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
                return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            self._punch = False
        self.write_zeroes(offset, count)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
