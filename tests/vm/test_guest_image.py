"""The test guest (vm-images/) booted by nbdcache.vm against a plain nbdkit.

These tests check the guest and its runner, not nbdcache: the server is
``nbdkit memory``.  Each server is started by its test, bounded by timeout(1)
and --exit-with-parent, and stopped (socket removed) afterwards.  A missing
QEMU, nbdkit or qboot skips; a failing image build fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nbdcache import vm
from nbdcache.runner import wait_listening

pytestmark = [pytest.mark.vm, pytest.mark.slow]

QBOOT = Path("/usr/share/qemu/qboot.rom")


def _require_tools() -> None:
    for tool in ("qemu-system-x86_64", "nbdkit", "timeout"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not QBOOT.exists():
        pytest.skip(f"{QBOOT} is missing (package qemu-system-data)")


class MemoryServer:
    """``nbdkit memory SIZE`` on a Unix socket, in a process group of its own."""

    def __init__(self, sock: Path, size: str) -> None:
        self.sock = sock
        if sock.exists():
            sock.unlink()
        self.proc = subprocess.Popen(
            ["timeout", "-k", "5", "900", "nbdkit", "-f", "--exit-with-parent",
             "-U", str(sock), "memory", size],
            stdin=subprocess.DEVNULL, start_new_session=True)
        why = wait_listening(self.proc, sock, 15)
        if why is not None:
            self.stop()
            raise RuntimeError(f"nbdkit {why}")

    def kill(self) -> None:
        """SIGKILL the server (and its timeout wrapper) like a crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.sock.exists():
            self.sock.unlink()


@pytest.fixture
def memory_server(tmp_path):
    """A factory: ``memory_server(size)`` starts a server, stopped after the test."""
    _require_tools()
    servers: list[MemoryServer] = []

    def start(size: str) -> MemoryServer:
        server = MemoryServer(tmp_path / f"nbd{len(servers)}.sock", size)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.timeout(900)
def test_build_image_is_cached_on_second_run():
    _require_tools()
    first = vm.build_image(progress=True)
    stamps = {p: p.stat().st_mtime_ns for p in (first.kernel, first.initrd)}
    started = time.monotonic()
    second = vm.build_image(progress=False)
    took = time.monotonic() - started
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert took < 5, f"a warm build took {took:.1f} s"


@pytest.mark.timeout(900)
def test_smoke_workload_on_256m_memory(memory_server, tmp_path):
    server = memory_server("256M")
    run = vm.run_guest(str(server.sock), "smoke", timeout=240, workdir=tmp_path / "vm")
    assert run.result["ok"] is True, run.result
    assert run.result["workload"] == "smoke"
    assert run.result["disk_mb"] == 256
    assert run.serial_log.exists()
    # The counters QEMU kept for the disk prove the data went to the server.
    assert run.blockstats["wr_bytes"] >= run.result["bytes"]
    assert run.blockstats["rd_bytes"] >= run.result["bytes"]
    assert run.blockstats["failed_wr_operations"] == 0
    assert run.blockstats["failed_rd_operations"] == 0


@pytest.mark.timeout(600)
def test_fs_workload_on_512m_memory(memory_server, tmp_path):
    server = memory_server("512M")
    run = vm.run_guest(str(server.sock), "fs", timeout=400, workdir=tmp_path / "vm")
    assert run.result["ok"] is True, run.result
    assert run.result["files"] >= 10
    assert run.result["bytes"] >= 64 * 1024 * 1024
    assert run.blockstats["wr_bytes"] >= run.result["bytes"]
    assert run.blockstats["flush_operations"] > 0
    assert run.blockstats["failed_wr_operations"] == 0


@pytest.mark.timeout(300)
def test_server_killed_mid_run_raises_guest_error(memory_server, tmp_path):
    server = memory_server("256M")
    workdir = tmp_path / "vm"
    serial_log = workdir / "serial-fio.log"
    killed = threading.Event()
    stop = threading.Event()

    def kill_once_guest_runs() -> None:
        # The guest prints "nbdcache-init: ... workload fio" before its first
        # I/O; kill the server shortly after, while fio is running.
        while not stop.is_set():
            if serial_log.exists() and b"workload fio" in serial_log.read_bytes():
                time.sleep(2)
                server.kill()
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once_guest_runs, name="server-killer")
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(vm.GuestError) as info:
            vm.run_guest(str(server.sock), "fio", timeout=150, workdir=workdir,
                         params={"runtime": 30}, reconnect_delay=1)
    finally:
        stop.set()
        killer.join(timeout=30)
    took = time.monotonic() - started
    assert killed.is_set(), "the guest never started its workload"
    assert "went away" in str(info.value)
    assert info.value.result is not None and info.value.result["ok"] is False
    assert took < 120, f"the failure took {took:.0f} s to surface"


@pytest.mark.timeout(120)
def test_missing_server_socket_raises_guest_error(tmp_path):
    _require_tools()
    with pytest.raises(vm.GuestError, match="no NBD server socket"):
        vm.run_guest(str(tmp_path / "absent.sock"), "smoke", timeout=30, workdir=tmp_path)


@pytest.mark.timeout(120)
def test_guest_without_result_in_time_raises_guest_error(memory_server, tmp_path):
    server = memory_server("512M")
    started = time.monotonic()
    with pytest.raises(vm.GuestError, match="printed no NBDCACHE-RESULT line") as info:
        vm.run_guest(str(server.sock), "fs", timeout=4, workdir=tmp_path / "vm")
    assert time.monotonic() - started < 30
    assert "no result within 4 s" in str(info.value)
