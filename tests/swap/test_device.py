"""nbdcache.swap.device: swap files (created sparse, sized, errors naming the path) and
the in-memory test device with injected EIO."""

from __future__ import annotations

import errno
import os

import pytest

from nbdcache.swap.device import MemorySwapDevice, SwapDevice, SwapDeviceError

BS = 4096


def pattern(n_slots: int, seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(n_slots * BS))


def test_device_file_created_sparse(tmp_path):
    path = tmp_path / "swap0"
    dev = SwapDevice(str(path), 64 * BS + 100, True, BS)
    try:
        assert path.stat().st_size == 64 * BS + 100
        assert dev.nslots == 64                     # the tail past the last slot is unused
        assert path.stat().st_blocks * 512 < 64 * BS     # sparse: nothing written yet
        assert "swap0" in dev.description
    finally:
        dev.close()
    dev.close()                                     # idempotent


def test_device_round_trip_and_offsets(tmp_path):
    path = tmp_path / "swap"
    dev = SwapDevice(str(path), 16 * BS, True, BS)
    data = pattern(3, 7)
    dev.pwrite(memoryview(data), 5)
    out = bytearray(3 * BS)
    dev.pread(memoryview(out), 5)
    assert out == data
    one = bytearray(BS)
    dev.pread(memoryview(one), 6)
    assert one == data[BS:2 * BS]
    dev.close()
    raw = path.read_bytes()
    assert raw[5 * BS:8 * BS] == data
    assert raw[:5 * BS] == bytes(5 * BS)


def test_device_existing_file_keeps_size(tmp_path):
    path = tmp_path / "swap"
    path.write_bytes(bytes(8 * BS))
    dev = SwapDevice(str(path), None, False, BS)
    assert dev.nslots == 8
    dev.close()
    dev = SwapDevice(str(path), 8 * BS, True, BS)   # a matching size is fine
    dev.close()


def test_device_errors_name_the_path(tmp_path):
    missing_dir = tmp_path / "nope" / "swap"
    with pytest.raises(FileNotFoundError, match="nope"):
        SwapDevice(str(missing_dir), BS * 4, True, BS)
    new = tmp_path / "new-swap"
    with pytest.raises(SwapDeviceError, match="new-swap.*size"):
        SwapDevice(str(new), None, True, BS)
    with pytest.raises(FileNotFoundError, match="new-swap"):
        SwapDevice(str(new), BS * 4, False, BS)
    assert not new.exists()
    with pytest.raises(OSError, match=str(tmp_path.name)) as ei:
        SwapDevice(str(tmp_path), None, False, BS)   # a directory cannot be opened read-write
    assert ei.value.errno == errno.EISDIR
    small = tmp_path / "small"
    with pytest.raises(SwapDeviceError, match="small.*smaller than one"):
        SwapDevice(str(small), 100, True, BS)
    sized = tmp_path / "sized"
    sized.write_bytes(bytes(4 * BS))
    with pytest.raises(SwapDeviceError, match="sized.*holds 16384"):
        SwapDevice(str(sized), 8 * BS, True, BS)
    with pytest.raises(SwapDeviceError, match="block size"):
        SwapDevice(str(sized), None, False, 1000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_device_unwritable_file_named(tmp_path):
    path = tmp_path / "ro-swap"
    path.write_bytes(bytes(4 * BS))
    path.chmod(0o400)
    with pytest.raises(PermissionError, match="ro-swap"):
        SwapDevice(str(path), None, False, BS)


def test_device_rejects_partial_and_out_of_range(tmp_path):
    dev = SwapDevice(str(tmp_path / "s"), 4 * BS, True, BS)
    with pytest.raises(ValueError, match="whole number"):
        dev.pwrite(bytes(BS + 1), 0)
    with pytest.raises(ValueError, match="outside"):
        dev.pwrite(bytes(2 * BS), 3)
    with pytest.raises(ValueError, match="outside"):
        dev.pread(memoryview(bytearray(BS)), -1)
    dev.close()


def test_device_truncated_file_reads_eio(tmp_path):
    path = tmp_path / "s"
    dev = SwapDevice(str(path), 4 * BS, True, BS)
    os.truncate(path, BS)                           # someone shrank it behind our back
    with pytest.raises(OSError) as ei:
        dev.pread(memoryview(bytearray(BS)), 2)
    assert ei.value.errno == errno.EIO
    dev.close()


def test_device_memory_injected_errors():
    dev = MemorySwapDevice(8, BS)
    data = pattern(2, 1)
    dev.pwrite(data, 2)
    assert dev.slot_bytes(3) == data[BS:]
    dev.fail_write_slots = {5}
    with pytest.raises(OSError) as ei:
        dev.pwrite(pattern(2, 9), 4)
    assert ei.value.errno == errno.EIO
    assert dev.slot_bytes(4) == bytes(BS)           # a failed write transfers nothing
    dev.fail_read_slots = {3}
    with pytest.raises(OSError):
        dev.pread(memoryview(bytearray(BS)), 3)
    out = bytearray(BS)
    dev.pread(memoryview(out), 2)
    assert out == data[:BS]
    dev.fail_all_reads = True
    with pytest.raises(OSError):
        dev.pread(memoryview(out), 0)
    assert dev.log == [("write", 2, 2), ("read", 2, 1)]
    assert (dev.reads, dev.writes) == (1, 1)
    with pytest.raises(SwapDeviceError):
        MemorySwapDevice(0, BS)
