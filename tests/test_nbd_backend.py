"""NbdBackend against a real nbdkit upstream on a Unix socket: reconnection after the
upstream is killed and restarted, giving up after ``retry_timeout``, server errors
passed through without retries, and the journal: writes a lost server dropped before
any FLUSH covered them are written again by the next flush.  Flush commands on the
wire are counted with nbdkit's log filter.

The upstream is started from the test's main thread only: nbdkit's
--exit-with-parent is tied to the thread that forked it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import structlog

from nbdcache.backend.nbd import NbdBackend

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("nbdkit") is None,
                                 reason="nbdkit is not installed")]

KiB, MiB = 1024, 1024 * 1024
DISK = "64M"


def kill(server) -> None:
    """SIGKILL the upstream (no cleanup runs) and reap it; its socket is removed."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    server.stop()


def read(b: NbdBackend, n: int, offset: int) -> bytes:
    buf = bytearray(n)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def flushes(logfile: Path) -> int:
    """FLUSH requests the upstream received (nbdkit-log-filter lines)."""
    if not logfile.exists():
        return 0
    return sum(1 for line in logfile.read_text().splitlines() if " Flush id=" in line)


@pytest.fixture
def backends():
    opened: list[NbdBackend] = []

    def make(uri: str, **kw) -> NbdBackend:
        b = NbdBackend(uri, **kw)
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.check()
        b.close()


def test_nbd_backend_reconnect_after_restart(upstream, backends, tmp_path):
    img = tmp_path / "up.img"
    img.write_bytes(bytes(4 * MiB))
    up = upstream("--exit-with-parent", "file", str(img), name="up")
    with structlog.testing.capture_logs() as logs:
        b = backends(up.uri, connections=2, retry_timeout=20)
        b.pwrite(b"a" * 64 * KiB, 0)
        b.flush()
        kill(up)
        results: dict[int, object] = {}

        def work(k: int) -> None:
            try:
                assert read(b, 64 * KiB, 0) == b"a" * 64 * KiB
                b.pwrite(bytes([k + 1]) * 4096, (k + 1) * MiB)
                results[k] = "ok"
            except Exception as e:          # reported by the main thread
                results[k] = e

        workers = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in workers:
            t.start()
        deadline = time.monotonic() + 10
        while b.outages == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.outages == 1, "no request noticed the dead upstream"
        upstream("--exit-with-parent", "file", str(img), name="up")
        for t in workers:
            t.join(20)
        assert results == {0: "ok", 1: "ok"}
        b.flush()                               # nothing acknowledged was lost
    assert b.outages == 1 and b.reconnects >= 1
    assert len(events(logs, "backend.disconnected")) == 1
    [rec] = events(logs, "backend.reconnected")
    assert rec["uri"] == up.uri and rec["attempts"] >= 1 and rec["outage"] > 0
    data = img.read_bytes()
    assert data[MiB:MiB + 4096] == b"\x01" * 4096 and data[2 * MiB:2 * MiB + 4096] == b"\x02" * 4096


def test_nbd_backend_gives_up_after_retry_timeout(upstream, backends):
    up = upstream("--exit-with-parent", "memory", DISK, name="up")
    with structlog.testing.capture_logs() as logs:
        b = backends(up.uri, connections=2, retry_timeout=0.5)
        read(b, 4096, 0)
        kill(up)
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            read(b, 4096, 0)
        took = time.monotonic() - t0
        assert e.value.errno == errno.EIO
        assert up.uri in str(e.value) and "unreachable for 0.5 s" in str(e.value)
        assert 0.5 <= took < 3, took
        # The outage is known to be longer than retry_timeout: one attempt, then EIO.
        t0 = time.monotonic()
        with pytest.raises(OSError):
            b.pwrite(b"x" * 4096, 0)
        assert time.monotonic() - t0 < 0.5
        upstream("--exit-with-parent", "memory", DISK, name="up")
        time.sleep(0.6)                         # the upstream is back, nobody knows yet
        held = b._borrow()                      # connection 0: the read goes to 1, dead
        try:                                    # since the kill: it is replaced at once
            assert read(b, 4096, 0) == bytes(4096)
        finally:
            b._release(held)
        assert read(b, 4096, 0) == bytes(4096)   # connection 0 finds it back too
    assert len(events(logs, "backend.unavailable")) == 1
    assert len(events(logs, "backend.reconnected")) == 1


def test_nbd_backend_silent_upstream_does_not_hang_a_reconnect(upstream, backends):
    """An address that accepts connections but never answers the handshake: each
    connection attempt is bounded, so the request still fails near retry_timeout."""
    up = upstream("--exit-with-parent", "memory", DISK, name="up")
    b = backends(up.uri, connections=1, retry_timeout=1.5)
    kill(up)
    mute = socket.socket(socket.AF_UNIX)
    try:
        mute.bind(str(up.sock))
        mute.listen(8)                          # never accepted: no greeting ever comes
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            read(b, 4096, 0)
        assert e.value.errno == errno.EIO and up.uri in str(e.value)
        assert time.monotonic() - t0 < 5
    finally:
        mute.close()
        up.sock.unlink()


def test_nbd_backend_export_changed_is_not_retried(upstream, backends):
    up = upstream("--exit-with-parent", "memory", DISK, name="up")
    b = backends(up.uri, connections=1, retry_timeout=30)
    kill(up)
    upstream("--exit-with-parent", "memory", "32M", name="up")
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        read(b, 4096, 0)
    assert e.value.errno == errno.EIO and "size changed" in str(e.value)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("code", ["EIO", "ENOSPC"])
def test_nbd_backend_server_error_not_retried(upstream, backends, code):
    up = upstream("--exit-with-parent", "--filter=error", "memory", DISK, f"error={code}",
                  "error-rate=100%", name="up")
    b = backends(up.uri, connections=2, retry_timeout=30)
    for op in (lambda: read(b, 4096, 0), lambda: b.pwrite(b"x" * 4096, 0)):
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == getattr(errno, code)
        assert time.monotonic() - t0 < 2
    assert b.outages == 0 and b.reconnects == 0


def test_nbd_backend_flush_replays_writes_a_lost_server_dropped(upstream, backends, tmp_path):
    """The upstream (a memory disk) is killed with three acknowledged, unflushed writes and
    restarted empty: the next flush writes them again before its FLUSH, so they are on
    the new server.  (The write flushed before the kill is gone with the old server: no
    client can bring back what a server lost after a successful FLUSH.)"""
    log = tmp_path / "flush.log"
    args = ("--exit-with-parent", "--filter=log", "memory", DISK, f"logfile={log}")
    up = upstream(*args, name="up")
    b = backends(up.uri, connections=2, retry_timeout=10)
    b.pwrite(b"a" * 4096, 0)
    b.flush()
    assert b.journaled == 0
    for k in range(3):
        b.pwrite(bytes([k + 1]) * 4096, (k + 1) * 4096)
    assert b.journaled == 3
    kill(up)
    up = upstream(*args, name="up")            # a new, empty memory disk
    b.flush()
    assert b.journaled == 0 and b.replays == 1 and b.replayed == 3
    for k in range(3):
        assert read(b, 4096, (k + 1) * 4096) == bytes([k + 1]) * 4096
    assert read(b, 4096, 0) == bytes(4096)      # flushed to the old server, lost with it
    writes = [line for line in log.read_text().splitlines() if " Write id=" in line]
    assert len(writes) == 3, writes             # the new server got the replay only
    b.check()


FAILING_FLUSH_PLUGIN = """
import errno, os
import nbdkit
API_VERSION = 2
disk = bytearray(1 << 20)
trigger = None
def config(key, value):
    global trigger
    trigger = value
def open(readonly):
    return 1
def get_size(h):
    return len(disk)
def can_flush(h):
    return True
def can_multi_conn(h):
    return True
def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]
def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf
def flush(h, flags):
    if os.path.exists(trigger):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("flush fails while the trigger file exists")
"""


def test_nbd_backend_failed_flush_replays_before_the_next(upstream, backends, tmp_path):
    """A FLUSH the server fails may have dropped writes (as a disk's failed fsync does):
    the next flush writes the journal again first."""
    trigger = tmp_path / "trigger"
    log = tmp_path / "flush.log"
    plugin = tmp_path / "failing_flush.py"      # nbdkit's error filter cannot fail FLUSH
    plugin.write_text(FAILING_FLUSH_PLUGIN)
    up = upstream("--exit-with-parent", "--filter=log", "python", str(plugin),
                  f"trigger={trigger}", f"logfile={log}", name="up")
    b = backends(up.uri, connections=1, retry_timeout=10)
    b.pwrite(b"x" * 4096, 8192)
    trigger.touch()
    with pytest.raises(OSError) as e:
        b.flush()
    assert e.value.errno == errno.EIO
    assert b.journaled == 1
    trigger.unlink()
    b.flush()
    assert b.journaled == 0 and b.replays == 1
    writes = [line for line in log.read_text().splitlines() if " Write id=" in line]
    assert len(writes) == 2                     # the write, then its replay
    b.check()


def test_nbd_backend_journal_is_bounded(upstream, backends, tmp_path):
    """Without flushes from the caller, the journal flushes by itself past journal_max."""
    log = tmp_path / "flush.log"
    up = upstream("--exit-with-parent", "--filter=log", "memory", DISK, f"logfile={log}",
                  name="up")
    b = backends(up.uri, connections=2, journal_max=64 * KiB)
    for k in range(64):
        b.pwrite(bytes([k]) * 4096, k * 4096)
        assert b._jbytes <= 64 * KiB + 4096
    assert b.auto_flushes >= 3 and flushes(log) == b.auto_flushes
    b.check()


def test_nbd_backend_flush_counts(upstream, backends, tmp_path):
    """Multi-conn: one FLUSH covers writes on both connections.  Without multi-conn: one
    FLUSH per connection.  A FLUSH is sent even when nothing was written since the last."""
    for mode, want in (("auto", 1), ("disable", 2)):
        log = tmp_path / f"flush-{mode}.log"
        up = upstream("--exit-with-parent", "--filter=log", "--filter=multi-conn", "memory",
                      DISK, f"logfile={log}", f"multi-conn-mode={mode}", name=f"up-{mode}")
        b = backends(up.uri, connections=2)
        assert b.multi_conn == (mode == "auto")
        held = b._borrow()                      # put one write on each connection
        b.pwrite(b"1" * 4096, 0)
        b._release(held)
        b.pwrite(b"0" * 4096, 4096)
        assert b.journaled == 2
        b.flush()
        assert flushes(log) == want, mode
        b.flush()
        assert flushes(log) == 2 * want, f"{mode}: the second FLUSH was not sent"


def test_nbd_backend_multi_conn_flush_needs_the_same_server(upstream, backends):
    """A write acknowledged on connection 1 by the old server is not covered by a
    multi-conn FLUSH on connection 0 once that reconnected to a new server: the flush
    writes it again."""
    up = upstream("--exit-with-parent", "memory", DISK, name="up")
    b = backends(up.uri, connections=2, retry_timeout=10)
    assert b.multi_conn
    held = b._borrow()
    b.pwrite(b"1" * 4096, 0)                    # on connection 1
    b._release(held)
    kill(up)
    upstream("--exit-with-parent", "memory", DISK, name="up")
    read(b, 4096, 0)                            # connection 0 reconnects
    b.flush()
    assert b.replays == 1
    assert read(b, 4096, 0) == b"1" * 4096


def test_nbd_backend_closed(upstream, backends):
    up = upstream("--exit-with-parent", "memory", DISK, name="up")
    b = backends(up.uri, connections=1, retry_timeout=10)
    b.close()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        read(b, 4096, 0)
    assert e.value.errno == errno.EIO and "closed" in str(e.value)
    assert time.monotonic() - t0 < 1 and b.outages == 0


def test_nbd_backend_concurrent_requests_across_restarts(upstream, backends, tmp_path):
    """Four threads write, read back and flush their own regions over two connections
    while the upstream is killed and restarted three times: no request fails, flushes
    included, and nothing acknowledged is lost."""
    img = tmp_path / "up.img"
    img.write_bytes(bytes(4 * MiB))
    up = upstream("--exit-with-parent", "file", str(img), name="up")
    b = backends(up.uri, connections=2, retry_timeout=20)
    models = [bytearray(MiB) for _ in range(4)]
    ops = [0] * 4
    failures: list[BaseException] = []
    stop = threading.Event()

    def work(k: int) -> None:
        base, n = k * MiB, 0
        try:
            while not stop.is_set():
                off = (n * 7 % 256) * 4096
                if n % 8 == 7:
                    b.flush()
                elif n % 2:
                    assert read(b, 4096, base + off) == models[k][off:off + 4096]
                else:
                    data = bytes([n % 251 + 1]) * 4096
                    b.pwrite(data, base + off)
                    models[k][off:off + 4096] = data
                n += 1
                ops[k] = n
        except BaseException as e:              # reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            target = sum(ops) + 40
            deadline = time.monotonic() + 20
            while sum(ops) < target and not failures and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sum(ops) >= target, f"no progress: {ops}"
            kill(up)
            time.sleep(0.2)
            up = upstream("--exit-with-parent", "file", str(img), name="up")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    assert not failures, failures[0]
    b.check()
    b.flush()
    data = img.read_bytes()
    for k in range(4):
        assert data[k * MiB:(k + 1) * MiB] == models[k], f"thread {k}'s region differs"
    assert b.outages >= 1


def test_engine_bounds_the_journal_by_hirunningspace(upstream):
    """Write-back kept for replay is bounded like write-back in flight."""
    from nbdcache import config as configmod
    from nbdcache.engine import Engine
    up = upstream("--exit-with-parent", "memory", DISK, name="up")
    cfg = configmod.load(None, {"backend.type": "nbd", "backend.uri": up.uri,
                                "cache.ram": "32M", "cache.hirunningspace": "3M"})
    e = Engine(cfg)
    try:
        assert e.backend.journal_max == 3 * MiB
    finally:
        e.backend.close()
