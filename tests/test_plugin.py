"""The served disk through a real nbdkit and real clients (libnbd, qemu-img, qemu-io)."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import nbd
import pytest

MiB = 1024 * 1024


def file_config(tmp_path: Path, size: str = "64M", ram: str = "8M", extra: str = "") -> str:
    return (f"backend: {{path: {tmp_path / 'disk.img'}, size: {size}}}\n"
            f"cache: {{ram: {ram}}}\nlog: {{file: {tmp_path / 'log.jsonl'}}}\n{extra}")


def exercise(h: "nbd.NBD", size: int, rounds: int = 300, seed: int = 1) -> bytearray:
    """Random writes (unaligned, up to 3 MiB), reads, trims, zeroes and flushes, checked
    against a bytearray model after every read; returns the model."""
    rng = random.Random(seed)
    model = bytearray(size)
    for i in range(rounds):
        op = rng.random()
        off = rng.randrange(size)
        n = min(rng.choice([1, 511, 4096, 65536, 100_000, 3 * MiB + 17]), size - off)
        if op < 0.45:
            data = rng.randbytes(n)
            h.pwrite(data, off)
            model[off:off + n] = data
        elif op < 0.8:
            assert h.pread(n, off) == model[off:off + n], f"round {i}: read {off}+{n}"
        elif op < 0.87:
            h.zero(n, off)
            model[off:off + n] = bytes(n)
        elif op < 0.93:
            h.trim(n, off)
            model[off:off + n] = h.pread(n, off)   # trimmed data may read back as anything
        else:
            h.flush()
    h.flush()
    assert h.pread(size, 0) == model
    return model


def test_file_backend_round_trips(serve, tmp_path):
    s = serve(file_config(tmp_path))
    h = s.connect()
    assert h.get_size() == 64 * MiB
    assert h.can_multi_conn() and h.can_fua() and h.can_trim() and h.can_zero()
    model = exercise(h, 64 * MiB)
    h.shutdown()
    assert (tmp_path / "disk.img").read_bytes() == model     # flushed data is in the file


def test_nbd_backend_round_trips(upstream, serve, tmp_path):
    up = upstream("memory", "32M")
    s = serve(f"backend: {{type: nbd, uri: '{up.uri}'}}\ncache: {{ram: 4M}}\n")
    h = s.connect()
    assert h.get_size() == 32 * MiB
    model = exercise(h, 32 * MiB, seed=2)
    direct = up.connect()
    assert direct.pread(32 * MiB, 0) == model                  # the upstream holds it all
    direct.shutdown()


def test_multi_megabyte_and_unaligned(serve, tmp_path):
    s = serve(file_config(tmp_path, ram="2M"))
    h = s.connect()
    data = random.Random(3).randbytes(16 * MiB + 12345)
    h.pwrite(data, 777)
    assert h.pread(len(data), 777) == data
    assert h.pread(1, 776) == b"\0"


def test_bad_config_exits_nonzero_without_socket(tmp_path):
    from conftest import Server
    from nbdcache.cli import PLUGIN, plugin_env
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("cache: {ram: 12Q}\nbackend: {path: d.img, size: 1M}\n")
    sock = tmp_path / "bad.sock"
    r = subprocess.run(["nbdkit", "-f", "-U", str(sock), "python", str(PLUGIN),
                        f"config={cfg}"], env=plugin_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
    assert "cache.ram: got '12Q'" in r.stderr
    assert not sock.exists()
    # a backend that cannot be opened fails before the socket exists too
    cfg.write_text("backend: {path: /nonexistent-dir/d.img, size: 1M}\n")
    r = subprocess.run(["nbdkit", "-f", "-U", str(sock), "python", str(PLUGIN),
                        f"config={cfg}"], env=plugin_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "does not exist" in r.stderr and not sock.exists()
    assert Server  # the fixture class is importable for other tests


def test_qemu_img_and_qemu_io(serve, tmp_path):
    s = serve(file_config(tmp_path))
    opts = f"driver=nbd,server.type=unix,server.path={s.sock}"
    r = subprocess.run(["qemu-img", "info", "--image-opts", opts], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "64 MiB" in r.stdout
    r = subprocess.run(["qemu-io", "--image-opts", opts, "-c", "write -P 0xab 0 1M",
                        "-c", "read -P 0xab 0 1M", "-c", "flush",
                        "-c", "write -P 0xcd 1000 70000", "-c", "read -P 0xcd 1000 70000"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_serve_cli_with_quickstart_shape(tmp_path):
    """`nbdcache serve` with a config like the README's: private socket dir, clean SIGTERM."""
    import signal
    import sys
    import time
    cfg = tmp_path / "qs.yaml"
    cfg.write_text("backend: {path: var/q.img, size: 16M}\ncache: {ram: 4M}\n")
    (tmp_path / "var").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "nbdcache", "serve", "--config", str(cfg)],
                         stderr=subprocess.PIPE, text=True)
    sock = tmp_path / "var" / "run" / "nbdcache.sock"
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    try:
        assert sock.exists(), p.stderr.read() if p.poll() is not None else "no socket"
        assert (sock.parent.stat().st_mode & 0o777) == 0o700
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        h.pwrite(b"q" * 4096, 0)          # dirty, not flushed: SIGTERM must write it back
        h.shutdown()
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
    assert rc == 0
    assert (tmp_path / "var" / "q.img").read_bytes()[:4096] == b"q" * 4096


def run_nbdkit(cfg: Path, sock: Path, address_space: int | None = None
               ) -> subprocess.CompletedProcess:
    """nbdkit on config ``cfg`` (optionally with RLIMIT_AS), serving `true` if it starts."""
    import resource
    from nbdcache.cli import PLUGIN, plugin_env

    def limit() -> None:
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    return subprocess.run(["nbdkit", "-f", "-U", str(sock), "python", str(PLUGIN),
                           f"config={cfg}", "--run", "true"], env=plugin_env(),
                          capture_output=True, text=True, timeout=30, preexec_fn=limit)


GiB = 1024 * MiB


@pytest.mark.parametrize("text,address_space,message", [
    # the arena (one mmap of cache.ram) fails: ENOMEM under a 1 GiB address space
    ("backend: {type: memory, size: 16M}\ncache: {ram: 2G}\n", GiB,
     "cache.ram: got 2147483648 (2G), expected a size this process can allocate "
     "(Cannot allocate memory)"),
    # the memory backend's bytearray fails: MemoryError
    ("backend: {type: memory, size: 2G}\ncache: {ram: 16M}\n", GiB,
     "backend.size: got 2147483648, expected at most the memory this process can allocate "
     "for backend.type=memory"),
    # ftruncate fails with EFBIG: larger than any file ext4, xfs or tmpfs holds
    ("backend: {path: '{tmp}/huge.img', size: 100000T}\n", None,
     "backend.size: got 109951162777600000, expected at most the largest file the "
     "filesystem of '{tmp}/huge.img' can hold (File too large)"),
], ids=["arena-enomem", "memory-backend-enomem", "file-too-large"])
def test_startup_errors_name_the_key(tmp_path, text, address_space, message):
    from nbdcache.config import machine_memory
    if address_space and machine_memory() < 4 * GiB:
        pytest.skip("cache.ram 2G is refused by the config check on a machine under 4G")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text.replace("{tmp}", str(tmp_path)))
    sock = tmp_path / "c.sock"
    r = run_nbdkit(cfg, sock, address_space)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("nbdcache: error:")]
    assert r.returncode != 0 and not sock.exists()
    assert errors == ["nbdcache: error: " + message.replace("{tmp}", str(tmp_path))], r.stderr
    assert not (tmp_path / "huge.img").exists(), "a half-made image was left behind"


def test_write_zeroes_reads_back_zeroes_from_the_image(serve, tmp_path):
    s = serve(file_config(tmp_path, size="16M", ram="4M"))
    h = s.connect()
    h.pwrite(b"A" * (2 * MiB), 0)
    h.flush()
    h.zero(MiB, 0)                          # whole blocks: FileBackend.zero
    h.zero(1000, MiB + 24)                  # partial blocks: zeroes through the cache
    h.flush()
    want = bytes(MiB) + b"A" * 24 + bytes(1000) + b"A" * (MiB - 1024)
    assert h.pread(2 * MiB, 0) == want
    h.shutdown()
    assert (tmp_path / "disk.img").read_bytes()[:2 * MiB] == want


def test_file_backend_zero_uses_zero_range_else_writes_zeroes(tmp_path, monkeypatch):
    """ZERO_RANGE reads back zeroes; PUNCH_HOLE need not (an NBD TRIM on nbdfuse).  Where
    ZERO_RANGE is unsupported (FUSE) zeroes are written, and it is not tried again."""
    from nbdcache.backend import file as filemod
    b = filemod.FileBackend(str(tmp_path / "z.img"), size=4 * MiB)
    modes: list[int] = []
    real = filemod.fallocate

    def spy(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        real(fd, mode, offset, length)
    monkeypatch.setattr(filemod, "fallocate", spy)
    b.pwrite(b"A" * (4 * MiB), 0)
    b.zero(0, MiB)
    assert modes == [filemod.FALLOC_FL_ZERO_RANGE | filemod.FALLOC_FL_KEEP_SIZE]

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(filemod, "fallocate", unsupported)
    modes.clear()
    b.zero(MiB, MiB)
    b.zero(3 * MiB, 4096)
    assert len(modes) == 1                              # remembered after the first
    buf = bytearray(4 * MiB)
    b.pread(memoryview(buf), 0)
    assert buf == bytes(2 * MiB) + b"A" * MiB + bytes(4096) + b"A" * (MiB - 4096)
    assert os.path.getsize(tmp_path / "z.img") == 4 * MiB
    b.close()
