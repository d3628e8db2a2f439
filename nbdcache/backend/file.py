"""A raw image file or block device.

Positional I/O (``preadv``/``pwritev`` straight to and from the caller's
buffers), ``fdatasync`` on flush, ``BLKDISCARD`` / ``BLKZEROOUT`` on block
devices.  On a file, trim punches a hole where the filesystem allows
(``fallocate(PUNCH_HOLE|KEEP_SIZE)``; advisory, like TRIM), and zero uses
``fallocate(ZERO_RANGE|KEEP_SIZE)``, which must read back zeroes; where that is
unsupported (FUSE, some filesystems) zero writes zeroes.  A punched hole is not
trusted to read back zeroes: on a file of an nbdfuse mount it is an NBD TRIM,
which the server may ignore.  A missing image is created sparse at the
configured size.

Errors opening the image are OSError or ValueError whose message starts with
the key at fault (``backend.path`` or ``backend.size``).
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
            self._create(path, size)
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
        self._zero_range = True       # BLKZEROOUT or fallocate(ZERO_RANGE) until unsupported

    def _create(self, path: str, size: int) -> None:
        """Size the image just created (sparse); on failure remove it and raise OSError
        naming backend.size."""
        try:
            os.ftruncate(self.fd, size)
        except (OSError, OverflowError) as e:
            os.close(self.fd)
            os.unlink(path)
            code = getattr(e, "errno", None) or errno.EFBIG
            why = getattr(e, "strerror", None) or str(e)
            raise OSError(code, f"backend.size: got {size}, expected at most the largest "
                          f"file the filesystem of {path!r} can hold ({why})") from None
        self.size = size

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
        """Make the range read back zeroes: BLKZEROOUT on a block device,
        fallocate(ZERO_RANGE) on a file, written zeroes where that fails as unsupported
        (remembered: later calls write zeroes at once) or invalid.  May block."""
        if self._zero_range:
            try:
                if self.is_block:
                    fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, count))
                else:
                    fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset,
                              count)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY,
                                   errno.EINVAL):
                    raise
                if e.errno != errno.EINVAL:     # EINVAL may be this range's alone
                    self._zero_range = False
        self.write_zeroes(offset, count)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
