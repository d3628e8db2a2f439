"""Serve a cached disk and boot the test guest on it: `nbdcache vm` and `make run`.

``ServedDisk`` runs nbdkit with the plugin as a child process on a Unix socket
(bounded start, SIGTERM stop so the plugin's cleanup writes back every dirty
block); ``run_vm`` boots the guest (``nbdcache.vm.run_guest``) on it and
reports the guest's verdict beside the cache's statistics, which it reads from
the server's JSON log (the final ``stats`` event written at close).
``demo`` is ``make run``: the built-in default disk under ``var/``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from nbdcache import config as configmod
from nbdcache.cli import SOURCE_ROOT, nbdkit_command, plugin_env

MiB = 1024 * 1024
VAR = SOURCE_ROOT / "var"

DEMO_CONFIG = """\
# The built-in default disk of `make run` (written by nbdcache demo; edit freely).
# A 2 GiB sparse image cached in 32 MiB of RAM, so that the guest's file-system
# workload (about 100 MiB of files) forces eviction and write-back, with a 256 MiB
# swap file that evicted blocks spill to (the verify pass reads them back from it).
backend:
  path: demo.img
  size: 2G
cache:
  ram: 32M
swap:
  devices:
    - {path: demo-swap.img, size: 256M}
server:
  socket: run/demo.sock
log:
  file: demo.log
  stats_interval: 1s
"""


def say(msg: str, out: TextIO | None = None) -> None:
    print(f"[nbdcache] {msg}", file=out or sys.stderr, flush=True)


class ServerError(RuntimeError):
    """The nbdcache server did not start or did not stop cleanly."""


def wait_listening(proc: subprocess.Popen, sock: Path, timeout: float) -> str | None:
    """Wait until the server ``proc`` accepts connections on the Unix socket ``sock``.

    The socket file appears at bind(), before listen(), so a connect is the test.
    Returns None once a connect succeeds, else why not: the process exited, or
    ``timeout`` seconds passed (the caller reports it with the server's stderr and
    kills the process).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}"
        if sock.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(sock))
                return None
            except (ConnectionRefusedError, FileNotFoundError):
                pass
            finally:
                probe.close()
        if time.monotonic() > deadline:
            return f"did not accept connections on {sock} within {timeout:g} s"
        time.sleep(0.02)


class ServedDisk:
    """nbdkit serving the cached disk described by a config file, as a child process."""

    def __init__(self, config_path: Path, overrides: dict[str, str] | None = None,
                 start_timeout: float = 30) -> None:
        self.overrides = dict(overrides or {})
        self.cfg = configmod.load(config_path, self.overrides)
        from nbdcache.cli import default_socket
        self.socket = Path(self.cfg["server.socket"] or default_socket(self.cfg))
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket.parent, 0o700)
        if self.socket.exists():
            self.socket.unlink()
        self.log_path = Path(self.cfg["log.file"]) if self.cfg["log.file"] else None
        self.stderr_path = self.socket.with_suffix(".stderr")
        cmd = nbdkit_command(self.cfg, str(config_path), self.overrides, str(self.socket), None)
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(cmd, env=plugin_env(), stdout=self._stderr,
                                     stderr=self._stderr, start_new_session=True)
        why = wait_listening(self.proc, self.socket, start_timeout)
        if why is not None:
            self.kill()
            raise ServerError(f"the server {why}:\n" + self.stderr_path.read_text()[-2000:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the plugin flushes), wait up to ``timeout``, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerError(f"the server did not stop within {timeout:.0f} s; killed")
        self._stderr.close()
        if self.socket.exists():
            self.socket.unlink()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The structlog events of this server's log (all, or those named ``name``)."""
        if not self.log_path or not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if name is None or e.get("event") == name:
                out.append(e)
        return out


def summarize(stats: dict[str, Any]) -> list[str]:
    """Human lines for the statistics a demo run shows."""
    def mib(n: float) -> str:
        return f"{n / MiB:.1f} MiB"
    lines = [
        f"cache hits {stats['hits']}, misses {stats['misses']} (hit ratio "
        f"{stats['hit_ratio']:.2f}), read-ahead {stats['readahead_issued']} issued / "
        f"{stats['readahead_hits']} hit",
        f"write-back {mib(stats['writeback_bytes'])} in {stats['writeback_clusters']} clusters "
        f"(mean {stats['writeback_mean_cluster_bufs']:.1f} buffers of "
        f"{stats['block_size'] // 1024}K), {stats['flushes']} flushes, "
        f"{stats['writeback_errors']} write-back errors",
        f"throttle: bd_wait blocked {stats['bd_wait_blocks']} writes for "
        f"{stats['bd_wait_seconds']:.2f} s, getnewbuf waited {stats['getnewbuf_waits']} times, "
        f"{stats['recycled']} buffers recycled",
    ]
    if "swap_slots_used" in stats:
        lines.append(
            f"swap: {stats['swap_pageout_blocks']} blocks paged out in "
            f"{stats['swap_pageout_runs']} runs (mean {stats['swap_pageout_mean_cluster']}), "
            f"{stats['swap_pagein_blocks']} paged in in {stats['swap_pagein_runs']} runs "
            f"(mean {stats['swap_pagein_mean_cluster']}); {stats['swap_hits']} misses served "
            f"from swap (swap hit ratio {stats['swap_hit_ratio']:.2f}); dirty spill "
            f"{stats['swap_spill_dirty']}, drained {stats['swap_drained']}; "
            f"{stats['swap_slots_used']} of {stats['swap_slots_total']} slots in use")
    else:
        lines.append("swap: off")
    return lines


def run_vm(config_path: Path, workload: str, overrides: dict[str, str] | None = None,
           timeout: float = 600, workdir: Path | None = None) -> int:
    """Serve ``config_path``, run ``workload`` in the guest, print verdict and stats."""
    from nbdcache.vm import GuestError, build_image, run_guest
    workdir = workdir or (VAR / "vm")
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    cfg = configmod.load(config_path, overrides)
    if not cfg["log.file"]:
        overrides["log.file"] = str(workdir / "server.log")
    say("building the guest image if needed (vm-images/build.sh; the first build downloads "
        "a kernel and compiles fio, ~30 s)")
    build_image(progress=True)
    say(f"serving {config_path} ...")
    disk = ServedDisk(config_path, overrides)
    say(f"serving on {disk.socket}; booting the guest with the '{workload}' workload (TCG)")
    rc = 0
    run = None
    try:
        run = run_guest(str(disk.socket), workload, timeout=timeout, workdir=workdir,
                        check=False)
    except GuestError as e:
        say(f"guest run failed: {e}")
        rc = 1
    finally:
        try:
            disk.stop()
        except ServerError as e:
            say(str(e))
            rc = rc or 1
    finals = [e for e in disk.events("stats") if e.get("final")]
    if run is not None:
        ok = bool(run.result.get("ok"))
        rc = rc or (0 if ok else 1)
        figures = {k: v for k, v in run.result.items() if k not in ("workload", "ok", "error")}
        say(f"guest verdict: {'PASS' if ok else 'FAIL'} {workload} in {run.seconds:.1f} s "
            f"{json.dumps(figures)}" + (f" error: {run.result.get('error')}" if not ok else ""))
        bs = run.blockstats
        if bs:
            say(f"QEMU saw {bs.get('rd_operations', 0)} reads ({mib_(bs.get('rd_bytes', 0))}), "
                f"{bs.get('wr_operations', 0)} writes ({mib_(bs.get('wr_bytes', 0))}), "
                f"{bs.get('flush_operations', 0)} flushes, "
                f"{bs.get('failed_rd_operations', 0) + bs.get('failed_wr_operations', 0)} failed")
    if finals:
        for line in summarize(finals[-1]):
            say(line)
    else:
        say("no statistics: the server log has no final stats event")
        rc = rc or 1
    return rc


def mib_(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def demo() -> int:
    """`make run`: the default disk under var/, the fs workload, verdict and statistics."""
    VAR.mkdir(exist_ok=True)
    cfg = VAR / "demo.yaml"
    if not cfg.exists() or (cfg.read_text().startswith(DEMO_CONFIG.splitlines()[0])
                            and "swap:" not in cfg.read_text()):
        cfg.write_text(DEMO_CONFIG)         # new, or an unedited one from before swap
        say(f"wrote the default configuration {cfg}")
    log = VAR / "demo.log"
    if log.exists():
        log.unlink()                         # one run per log: the plot shows this run
    t0 = time.monotonic()
    rc = run_vm(cfg, "fs", workdir=VAR / "vm")
    png = VAR / "demo-run.png"
    try:
        from nbdcache.plot import plot
        plot(log, png)
        say(f"plot of the run (bufspace, dirty and running space against their marks, "
            f"throughput, hit ratio): {png}")
    except Exception as e:  # noqa: BLE001 - the plot is a bonus; the verdict stands
        say(f"no plot: {e}")
    say(f"done in {time.monotonic() - t0:.1f} s; server log {log}")
    return rc
