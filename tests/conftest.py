"""Shared fixtures: real nbdkit servers on Unix sockets, bounded in time, always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent / "core"))
sys.path.insert(0, str(Path(__file__).parent))

from nbdcache.cli import PLUGIN, plugin_env  # noqa: E402
from nbdcache.runner import wait_listening  # noqa: E402


class Server:
    """An nbdkit process serving one export on a Unix socket."""

    def __init__(self, args: list[str], sock: Path, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.sock = sock
        self.handles: list = []
        self.log = log or sock.with_suffix(".stderr")
        if sock.exists():
            sock.unlink()
        self.cmd = ["nbdkit", "--foreground", "--unix", str(sock), *args]
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._logf, stderr=self._logf,
                                     start_new_session=True)
        why = wait_listening(self.proc, sock, 20)
        if why is not None:
            self.kill()
            raise RuntimeError(f"nbdkit {why}: {self.stderr()}")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stderr(self) -> str:
        self._logf.flush()
        return self.log.read_text()

    def connect(self):
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri)
        self.handles.append(h)
        return h

    def disconnect_all(self) -> None:
        import nbd
        for h in self.handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self.handles.clear()

    def stop(self, timeout: float = 30) -> int:
        """Disconnect our clients (nbdkit waits for connected clients before its cleanup),
        SIGTERM, then wait (cleanup flushes); SIGKILL if it overruns."""
        self.disconnect_all()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._logf.close()
        if self.sock.exists():
            self.sock.unlink()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that configures logging (nbdcache.log.configure, e.g. at warning) must not
    leak it: structlog.testing.capture_logs replaces the processors but not the level
    filter, so a later test would miss the events it captures."""
    import structlog
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(config_text or path, *overrides) -> Server running the nbdcache plugin."""
    servers: list[Server] = []

    def start(config: str | Path | None = None, *overrides: str, name: str = "nbdcache",
              extra: list[str] | None = None) -> Server:
        args = list(extra or []) + ["python", str(PLUGIN)]
        if config is not None:
            if isinstance(config, str):
                config = write_config(tmp_path / f"{name}.yaml", config)
            args.append(f"config={config}")
        args += list(overrides)
        s = Server(args, tmp_path / f"{name}.sock", env=plugin_env())
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator:
    """upstream(*nbdkit_args, name=...) -> Server: a plain nbdkit (memory, file, filters)."""
    servers: list[Server] = []

    def start(*args: str, name: str = "upstream") -> Server:
        s = Server(list(args), tmp_path / f"{name}.sock")
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
