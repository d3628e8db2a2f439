"""The servers the benchmarks measure, each an nbdkit process on a Unix socket.

Theory of operation
-------------------
A *target* is a named recipe (:class:`TargetSpec`) for one nbdkit command
line: nbdcache (the Python plugin ``nbdcache/plugin.py`` with a generated
YAML config), the Python floor (``bench/floor_plugin.py``), nbdkit's C
``memory`` and ``file`` plugins, the incumbent ``--filter=cache
cache=writeback``, and, for the slow-backend cases, an *upstream* ``nbdkit
memory`` behind ``--filter=delay`` that nbdcache reaches through its NBD
backend and the C side through the ``nbd`` plugin (cached or passthrough).

:meth:`TargetSpec.start` turns a recipe into a running :class:`Server` in a
work directory the caller owns (the harness uses one temporary directory per
suite).  Every path put on a command line is absolute, every server runs in
the foreground in its own session, and :meth:`Server.stop` ends it with
SIGTERM (SIGKILL after a deadline): nothing outlives the harness.

Ownership: the caller of ``start()`` owns the server and must ``stop()`` it;
:func:`stop_all` stops several at once (nbdkit takes ~1.5 s to exit, so
stopping a suite's servers one by one would waste seconds per suite).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Union

import yaml

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nbdcache import config as configmod  # noqa: E402
from nbdcache.cli import PLUGIN, plugin_env  # noqa: E402
from nbdcache.runner import wait_listening  # noqa: E402

FLOOR_PLUGIN = BENCH_DIR / "floor_plugin.py"
MiB = 1024 * 1024
GiB = 1024 * MiB

#: Roles: how the report groups targets.  Ratios are always nbdcache against a peer.
NBDCACHE, PEER, UPSTREAM = "nbdcache", "peer", "upstream"


class TargetError(RuntimeError):
    """A server did not start, or its configuration was refused; the message says why."""


class Server:
    """One nbdkit process serving one export on a Unix socket (as tests/conftest.py's)."""

    def __init__(self, name: str, cmd: list[str], sock: Path, env: dict[str, str] | None = None,
                 start_timeout: float = 30, info: dict[str, Any] | None = None) -> None:
        self.name = name
        self.sock = sock
        self.info = dict(info or {})
        self.stderr_path = sock.with_suffix(".stderr")
        if sock.exists():
            sock.unlink()
        self.cmd = ["nbdkit", "--foreground", "--unix", str(sock), *cmd]
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._stderr, stderr=self._stderr,
                                     start_new_session=True)
        why = wait_listening(self.proc, sock, start_timeout)
        if why is not None:
            self.kill()
            self._stderr.close()
            raise TargetError(f"{name}: nbdkit {why}: {self.stderr()[-2000:]}")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def status(self) -> dict[str, int]:
        """Memory figures of the nbdkit process in KiB (VmRSS, VmHWM) from /proc."""
        out = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        except (OSError, ValueError, IndexError):
            pass
        return out

    def signal_stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM (nbdcache flushes in its cleanup), wait, SIGKILL after ``timeout``."""
        self.signal_stop()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if not self._stderr.closed:
            self._stderr.close()
        if self.sock.exists():
            self.sock.unlink()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def stop_all(servers: list[Server], timeout: float = 120) -> None:
    """SIGTERM every server first, then wait for each (they exit concurrently)."""
    for s in servers:
        s.signal_stop()
    for s in servers:
        s.stop(timeout)


# --------------------------------------------------------------------------- recipes

@dataclasses.dataclass
class TargetSpec:
    """How to start one target.  ``build(workdir)`` returns (nbdkit args, env, info)."""

    name: str
    role: str                       # NBDCACHE | PEER | UPSTREAM
    label: str                      # one line for the report
    build: Callable[[Path], tuple[list[str], dict[str, str] | None, dict[str, Any]]]

    def start(self, workdir: Path) -> Server:
        args, env, info = self.build(workdir)
        return Server(self.name, args, workdir / f"{self.name}.sock", env=env, info=info)


def _c_env(workdir: Path) -> dict[str, str]:
    """The C targets' environment: the cache filter keeps its (unlinked) cache file in TMPDIR."""
    env = dict(os.environ)
    env["TMPDIR"] = str(workdir)
    return env


def _sz(n: int) -> str:
    return configmod.format_size(n)


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


Settings = Union[dict[str, Any], Callable[[Path], dict[str, Any]]]


def _resolve(value: Any, workdir: Path) -> dict[str, Any]:
    return dict(value(workdir) if callable(value) else (value or {}))


def nbdcache(name: str, backend: Settings, *, thread_model: str, ram: int,
             threads: int | None = None, settings: Settings | None = None,
             label: str = "") -> TargetSpec:
    """nbdcache with ``backend`` (dotted ``backend.*`` keys, or a function of the
    work directory returning them; a file backend's ``backend.path`` is made
    inside the work directory), ``cache.ram`` and further ``settings``.

    The generated config also sets a JSON ``log.file``: its final ``stats``
    event (hit ratio, mean write-back cluster) is read after the suite.
    """
    def build(workdir: Path):
        flat = _resolve(backend, workdir)
        if flat.get("backend.type") == "file":
            flat["backend.path"] = str(workdir / f"{name}.img")
        flat.update({
            "cache.ram": configmod.format_size(ram),
            "server.thread_model": thread_model,
            "log.file": str(workdir / f"{name}.log.jsonl"),
        })
        flat.update(_resolve(settings, workdir))
        cfg_path = workdir / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(_nest(flat), sort_keys=True))
        try:
            cfg = configmod.load(cfg_path)
        except configmod.ConfigError as e:
            raise TargetError(f"{name}: the generated config is refused: {e}") from None
        nthreads = threads or cfg["server.threads"]
        args = ["--threads", str(nthreads), "python", str(PLUGIN), f"config={cfg_path}"]
        info = {"config": flat, "threads": nthreads, "ram": cfg["cache.ram"],
                "log": flat["log.file"]}
        return args, plugin_env(), info
    btype = "NBD" if callable(backend) else backend.get("backend.type")
    return TargetSpec(name, NBDCACHE, label or f"nbdcache ({btype} backend, {thread_model})",
                      build)


def floor(name: str, *, thread_model: str, size: int, threads: int | None = None) -> TargetSpec:
    """The Python floor: a plugin that only copies to and from a bytearray."""
    def build(workdir: Path):
        nthreads = threads or configmod.BY_KEY["server.threads"].default
        args = ["--threads", str(nthreads), "python", str(FLOOR_PLUGIN), f"size={_sz(size)}",
                f"threads={thread_model}"]
        return args, plugin_env(), {"threads": nthreads}
    return TargetSpec(name, PEER, f"Python floor (bytearray copy, {thread_model})", build)


def nbdkit_memory(name: str, *, size: int) -> TargetSpec:
    def build(workdir: Path):
        return ["memory", _sz(size)], _c_env(workdir), {}
    return TargetSpec(name, PEER, "nbdkit memory (C)", build)


def nbdkit_file(name: str, *, size: int) -> TargetSpec:
    def build(workdir: Path):
        img = _sparse(workdir / f"{name}.img", size)
        return ["file", str(img)], _c_env(workdir), {}
    return TargetSpec(name, PEER, "nbdkit file (C)", build)


def cache_filter_file(name: str, *, size: int) -> TargetSpec:
    def build(workdir: Path):
        img = _sparse(workdir / f"{name}.img", size)
        return ["--filter=cache", "file", str(img), "cache=writeback"], _c_env(workdir), {}
    return TargetSpec(name, PEER, "nbdkit --filter=cache cache=writeback over file (C)", build)


# -- the slow-backend cases: an upstream and what is put in front of it

def upstream(name: str, *, size: int, delay_read: str | None = None,
             delay_write: str | None = None, log: bool = True) -> TargetSpec:
    """``nbdkit --filter=log --filter=delay memory SIZE delay-...``: the slow backend.

    The log filter (outermost, so it sees the requests as the caches send them)
    writes one line per request to ``info["logfile"]``; the harness counts the
    writes and their sizes between two offsets of that file.  Without delays
    the delay filter is left out.
    """
    def build(workdir: Path):
        args = []
        info: dict[str, Any] = {"delay_read": delay_read, "delay_write": delay_write}
        if log:
            info["logfile"] = str(workdir / f"{name}.requests.log")
            args.append("--filter=log")
        if delay_read or delay_write:
            args.append("--filter=delay")
        args += ["memory", _sz(size)]
        if delay_read:
            args.append(f"delay-read={delay_read}")
        if delay_write:
            args.append(f"delay-write={delay_write}")
        if log:
            args.append(f"logfile={info['logfile']}")
        return args, _c_env(workdir), info
    what = ", ".join(f"{k} {v}" for k, v in (("read", delay_read), ("write", delay_write)) if v)
    return TargetSpec(name, UPSTREAM, "upstream nbdkit memory" + (
        f" behind --filter=delay ({what})" if what else " (no delay)"), build)


def socket_of(workdir: Path, upstream_name: str) -> Path:
    return workdir / f"{upstream_name}.sock"


def nbdcache_over(name: str, upstream_name: str, *, thread_model: str, ram: int,
                  threads: int | None = None, settings: Settings | None = None,
                  label: str = "") -> TargetSpec:
    """nbdcache whose NBD backend is the upstream started earlier in the same work dir."""
    def backend(workdir: Path) -> dict[str, Any]:
        # As many backend connections as the deepest queue measured (QD16): each carries
        # one request at a time, so fewer would cap concurrent misses (4 -> ~4 per ms).
        return {"backend.type": "nbd", "backend.connections": 16,
                "backend.uri": f"nbd+unix:///?socket={socket_of(workdir, upstream_name)}"}
    return nbdcache(name, backend, thread_model=thread_model, ram=ram, threads=threads,
                    settings=settings, label=label)


def cache_filter_over(name: str, upstream_name: str) -> TargetSpec:
    def build(workdir: Path):
        sock = socket_of(workdir, upstream_name)
        return (["--filter=cache", "nbd", f"socket={sock}", "cache=writeback"],
                _c_env(workdir), {})
    return TargetSpec(name, PEER, "nbdkit --filter=cache cache=writeback over nbd (C)", build)


def passthrough_over(name: str, upstream_name: str) -> TargetSpec:
    def build(workdir: Path):
        sock = socket_of(workdir, upstream_name)
        return ["nbd", f"socket={sock}"], _c_env(workdir), {}
    return TargetSpec(name, PEER, "nbdkit nbd passthrough, uncached (C)", build)


def swap_available() -> bool:
    """Whether this tree's nbdcache has swap devices."""
    return "swap.devices" in configmod.BY_KEY


def swap_settings(size: int, devices: int = 2) -> Callable[[Path], dict[str, Any]]:
    """The config keys that give nbdcache ``devices`` swap files of ``size`` bytes in all
    (created sparse in the work directory)."""
    def settings(workdir: Path) -> dict[str, Any]:
        each = configmod.format_size(size // devices)
        return {"swap.devices": [{"path": str(workdir / f"swap{i}.img"), "size": each}
                                 for i in range(devices)]}
    return settings
