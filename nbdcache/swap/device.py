"""Swap devices: a file or block device divided into slots of ``block_size`` bytes.

Theory of operation
-------------------
A swap device is scratch space: slot *s* is the byte range ``[s*block_size,
(s+1)*block_size)``.  The pager (``nbdcache.swap.pager``) addresses a device
only by *device-local* slot numbers and only in whole runs of slots; the
interleaving of several devices into one swap address space (the kernel's
``vm_swap.c`` translation of ``BLK2DEVIDX``) is the pager's business.

``SwapDevice`` is the real thing: positional I/O (``os.preadv``/``os.pwritev``)
straight to and from the caller's buffer, so any number of threads may do I/O
on one device at once.  A transfer is complete or raises ``OSError``: short
transfers are retried, and a read that meets end-of-file (a file truncated
behind our back) raises ``EIO`` rather than inventing zeroes.  A missing file
is created sparse at ``size``; swap contents are meaningless across runs (the
pager's metadata is RAM-only), so nothing is ever read back from a previous
run.

``MemorySwapDevice`` keeps the slots in a ``bytearray`` for tests, with
switches that make reads or writes of chosen slots (or all) fail with ``EIO``,
and counters and an I/O log that tests read instead of sleeping.

Locking: none.  Devices hold no shared mutable state besides the file
descriptor; the pager calls ``pread``/``pwrite`` from its ``*_io`` methods
WITHOUT the engine lock, and they block for the duration of the I/O.
``close`` must not race with I/O (the owner closes after draining).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

BLKGETSIZE64 = 0x80081272


class SwapDeviceError(ValueError):
    """A swap device cannot be opened as configured (bad size, block size or path)."""


def _check_block_size(block_size: int) -> None:
    if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 512
            or block_size & (block_size - 1)):
        raise SwapDeviceError(f"swap block size must be a power of two >= 512, "
                              f"not {block_size!r}")


class _SlotIO:
    """Range checks shared by both devices."""

    nslots: int
    block_size: int
    description: str

    def _extent(self, buf: memoryview | bytes | bytearray, slot: int) -> tuple[int, int]:
        """(offset, length) of a whole-slot transfer of ``buf`` at ``slot``; ValueError if bad."""
        n = len(buf)
        bs = self.block_size
        if n == 0 or n % bs:
            raise ValueError(f"{self.description}: transfer of {n} bytes is not a whole "
                             f"number of {bs}-byte slots")
        count = n // bs
        if not isinstance(slot, int) or slot < 0 or slot + count > self.nslots:
            raise ValueError(f"{self.description}: slots {slot!r}+{count} outside "
                             f"0..{self.nslots - 1}")
        return slot * bs, n


class SwapDevice(_SlotIO):
    """A swap file or block device of ``nslots`` slots of ``block_size`` bytes.

    ``size`` is the byte size for a new file (required then); for an existing
    file it must match the file's size if given, so that a typo cannot silently
    shrink or grow someone's image.  A block device's size is its own.  Bytes
    past the last whole slot are unused.  Every error names the path.  Opening
    does not block beyond the ``open``/``ftruncate`` system calls.
    """

    def __init__(self, path: str, size: int | None, create: bool, block_size: int) -> None:
        _check_block_size(block_size)
        self.path = path
        self.block_size = block_size
        self.fd = -1
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                                 or size < 0):
            raise SwapDeviceError(f"swap device {path!r}: size must be a byte count, "
                                  f"not {size!r}")
        exists = os.path.exists(path)
        if not exists:
            if not create:
                raise FileNotFoundError(errno.ENOENT, f"swap device {path!r} does not exist "
                                        "and create is false")
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise FileNotFoundError(errno.ENOENT, f"swap device {path!r}: directory "
                                        f"{parent!r} does not exist")
            if not size:
                raise SwapDeviceError(f"swap device {path!r} does not exist; give its size "
                                      "to create it")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OSError(e.errno, f"swap device {path!r}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if self.is_block:
                raw = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
                self.size = struct.unpack("Q", raw)[0]
            elif not stat.S_ISREG(st.st_mode):
                raise SwapDeviceError(f"swap device {path!r} is neither a regular file "
                                      "nor a block device")
            elif not exists:
                os.ftruncate(self.fd, size)     # sparse: no space until written
                self.size = size
            else:
                self.size = st.st_size
                if size and size != self.size:
                    raise SwapDeviceError(f"swap device {path!r} holds {self.size} bytes, "
                                          f"not the configured {size}; fix the size or "
                                          "remove the file")
            self.nslots = self.size // block_size
            if self.nslots < 1:
                raise SwapDeviceError(f"swap device {path!r} ({self.size} bytes) is smaller "
                                      f"than one {block_size}-byte slot")
        except OSError as e:
            self.close()
            raise OSError(e.errno, f"swap device {path!r}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise
        kind = "block device" if self.is_block else "file"
        self.description = f"swap {kind} {path}"

    def pread(self, buf: memoryview, slot: int) -> None:
        """Fill ``buf`` (whole slots) from ``slot`` on.  Blocks; OSError on failure."""
        offset, n = self._extent(buf, slot)
        mv = memoryview(buf)
        done = 0
        while done < n:
            got = os.preadv(self.fd, [mv[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"{self.description}: end of file at byte "
                                         f"{offset + done} reading slot {slot}")
            done += got

    def pwrite(self, buf: memoryview | bytes | bytearray, slot: int) -> None:
        """Write ``buf`` (whole slots) at ``slot``.  Blocks; OSError on failure."""
        offset, n = self._extent(buf, slot)
        mv = memoryview(buf)
        done = 0
        while done < n:
            put = os.pwritev(self.fd, [mv[done:]], offset + done)
            if put == 0:
                raise OSError(errno.EIO, f"{self.description}: wrote nothing at byte "
                                         f"{offset + done}")
            done += put

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<SwapDevice {self.path!r} nslots={self.nslots} block_size={self.block_size}>"


class MemorySwapDevice(_SlotIO):
    """An in-memory swap device for tests, with injectable EIO.

    ``fail_write_slots``/``fail_read_slots``: a transfer touching any of these
    slots raises ``OSError(EIO)`` and transfers nothing; ``fail_all_writes``/
    ``fail_all_reads`` fail every transfer.  ``reads``/``writes`` count
    completed transfers and ``log`` records ``(op, slot, nslots)`` of each.
    """

    def __init__(self, nslots: int, block_size: int, name: str = "mem") -> None:
        _check_block_size(block_size)
        if not isinstance(nslots, int) or nslots < 1:
            raise SwapDeviceError(f"a swap device needs at least one slot, not {nslots!r}")
        self.nslots = nslots
        self.block_size = block_size
        self.path = name
        self.description = f"memory swap device {name}"
        self.mem = bytearray(nslots * block_size)
        self.fail_write_slots: set[int] = set()
        self.fail_read_slots: set[int] = set()
        self.fail_all_writes = False
        self.fail_all_reads = False
        self.reads = 0
        self.writes = 0
        self.log: list[tuple[str, int, int]] = []
        self.closed = False

    def _fail(self, op: str, slot: int, count: int, every: bool, bad: set[int]) -> None:
        if every or any(s in bad for s in range(slot, slot + count)):
            raise OSError(errno.EIO, f"{self.description}: injected {op} error at "
                                     f"slots {slot}+{count}")

    def pread(self, buf: memoryview, slot: int) -> None:
        offset, n = self._extent(buf, slot)
        self._fail("read", slot, n // self.block_size, self.fail_all_reads,
                   self.fail_read_slots)
        memoryview(buf)[:] = self.mem[offset:offset + n]
        self.reads += 1
        self.log.append(("read", slot, n // self.block_size))

    def pwrite(self, buf: memoryview | bytes | bytearray, slot: int) -> None:
        offset, n = self._extent(buf, slot)
        self._fail("write", slot, n // self.block_size, self.fail_all_writes,
                   self.fail_write_slots)
        self.mem[offset:offset + n] = buf
        self.writes += 1
        self.log.append(("write", slot, n // self.block_size))

    def slot_bytes(self, slot: int) -> bytes:
        """The stored contents of one slot (tests)."""
        bs = self.block_size
        return bytes(self.mem[slot * bs:(slot + 1) * bs])

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<MemorySwapDevice {self.path} nslots={self.nslots}>"
