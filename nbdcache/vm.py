"""Boot the nbdcache test guest against an NBD server and collect its result.

Theory of operation
    The guest (``vm-images/``: a Debian cloud kernel and a busybox initramfs
    built by ``vm-images/build.sh``) runs one workload against its only disk,
    ``/dev/vda``, which QEMU serves from the NBD server on a Unix socket.  The
    guest prints one line ``NBDCACHE-RESULT {json}`` on its serial console and
    then waits (``nbdcache.hold``) for a line on the console before it powers
    off.  ``run_guest`` therefore:

      1. builds the image if needed (``build_image``; a warm build is ~0.1 s);
      2. starts QEMU under ``timeout`` (a backstop should this process die) in
         its own process group, serial console on a pipe, QMP on a socket;
      3. reads the serial output until the result line, QEMU's exit or the
         deadline, copying every byte to the serial log;
      4. with the guest still up, fetches ``query-blockstats`` over QMP;
      5. answers the guest's hold with a newline, waits for QEMU to exit after
         the guest's ``poweroff -f``, then falls back to QMP ``quit`` and last
         to SIGKILL of the process group.

    Every wait has a deadline: nothing here can hang.  A guest that never
    reports, a QEMU that dies, a workload that fails or an NBD server that
    went away all end in ``GuestError``, whose message names what happened
    and ends with the tail of the serial log.

    Ownership: ``run_guest`` owns the QEMU process and the QMP connection and
    releases both before it returns or raises.  Nothing runs in the background.

    The QEMU command line is the one ``vm-images/boot.sh`` builds; keep the
    two alike.  Acceleration is TCG unless the CPU has vmx/svm and KVM is not
    ``kvm_pvm`` (a software hypervisor under which the Debian kernel fails).
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

VM_IMAGES = Path(__file__).resolve().parent.parent / "vm-images"
WORKLOADS = ("smoke", "fs", "fio", "fsync")
RESULT_MARK = b"NBDCACHE-RESULT "
DISK_NODE = "nbd0"
DISK_ID = "disk0"
SERIAL_TAIL_LINES = 25

# Seconds the guest waits for our go-ahead after its result line, so that
# query-blockstats sees the guest still running.
GUEST_HOLD_S = 30
# Seconds QEMU waits for the NBD server at start (open-timeout).
NBD_OPEN_TIMEOUT_S = 10
# After the go-ahead: wait for the guest's poweroff, then for QMP quit.
POWEROFF_WAIT_S = 15
QUIT_WAIT_S = 5


class GuestError(Exception):
    """The guest run failed; the message says how and ends with the serial tail.

    ``result`` is the guest's result dict when it printed one (a failed
    workload), else None.  ``serial_log`` is the path of the full log.
    """

    def __init__(self, message: str, *, serial_tail: str = "",
                 result: dict | None = None, serial_log: Path | None = None) -> None:
        text = message
        if serial_tail:
            text += "\n--- last lines of the serial console (and QEMU messages) ---\n" + serial_tail
        super().__init__(text)
        self.reason = message
        self.serial_tail = serial_tail
        self.result = result
        self.serial_log = serial_log


@dataclass(frozen=True)
class ImagePaths:
    """Where the guest image lives; ``kernel`` and ``initrd`` exist once built."""

    root: Path
    build_script: Path
    cache: Path
    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class GuestRun:
    """What one guest run produced.

    ``result`` is the guest's NBDCACHE-RESULT object, ``blockstats`` the
    ``stats`` member of QMP ``query-blockstats`` for the guest's disk taken
    after the result and before shutdown, ``seconds`` the time from QEMU's
    start to the result line.
    """

    result: dict
    blockstats: dict
    serial_log: Path
    seconds: float


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _default_log() -> Any:
    try:
        import structlog
    except ImportError:
        return _NullLog()
    return structlog.get_logger().bind(component="vm")


def image_paths() -> ImagePaths:
    """The image's paths (no I/O; the files may not exist yet)."""
    cache = Path(os.environ.get("NBDCACHE_VM_CACHE", VM_IMAGES / "cache"))
    return ImagePaths(root=VM_IMAGES, build_script=VM_IMAGES / "build.sh", cache=cache,
                      kernel=cache / "vmlinuz", initrd=cache / "initramfs.img")


def build_image(progress: bool = True) -> ImagePaths:
    """Run ``vm-images/build.sh``, which skips every step already done.

    Blocks until the build ends: ~0.1 s warm, a minute or so cold (kernel
    download, static fio compile).  With ``progress`` its output is copied
    line by line to stderr.  Raises GuestError naming the failure.
    """
    paths = image_paths()
    tail: collections.deque[str] = collections.deque(maxlen=SERIAL_TAIL_LINES)
    proc = subprocess.Popen(["bash", str(paths.build_script)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if progress:
                sys.stderr.write(line)
                sys.stderr.flush()
    if proc.returncode != 0:
        raise GuestError(f"vm-images/build.sh failed with exit status {proc.returncode}:\n"
                         + "\n".join(tail))
    if not (paths.kernel.is_file() and paths.initrd.is_file()):
        raise GuestError(f"vm-images/build.sh succeeded but left no {paths.kernel} "
                         f"or {paths.initrd}")
    return paths


def choose_accel() -> str:
    """``kvm`` only with real hardware virtualisation, else multi-threaded TCG."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    words = set(cpuinfo.split())
    if (("vmx" in words or "svm" in words) and not Path("/sys/module/kvm_pvm").exists()
            and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        return "kvm"
    return "tcg,thread=multi"


def qemu_command(paths: ImagePaths, socket_path: str, workload: str, *, mem_mb: int,
                 qmp_path: str | None, guest_timeout: int, hold: int = 0,
                 reconnect_delay: int = 5, params: Mapping[str, object] | None = None,
                 accel: str | None = None) -> list[str]:
    """The QEMU argv for one guest run (the same as vm-images/boot.sh's)."""
    append = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4", "mitigations=off",
              f"nbdcache.workload={workload}", f"nbdcache.timeout={guest_timeout}",
              f"nbdcache.hold={hold}"]
    for key, value in (params or {}).items():
        if any(c.isspace() for c in f"{key}{value}"):
            raise ValueError(f"guest parameter {key}={value!r} contains white space")
        append.append(f"nbdcache.{key}={value}")
    blockdev = {"driver": "nbd", "node-name": DISK_NODE,
                "server": {"type": "unix", "path": socket_path},
                "discard": "unmap", "reconnect-delay": reconnect_delay,
                "open-timeout": NBD_OPEN_TIMEOUT_S}
    argv = ["qemu-system-x86_64",
            "-accel", accel or choose_accel(), "-machine", "q35", "-cpu", "max", "-smp", "1",
            "-m", str(mem_mb), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-bios", "/usr/share/qemu/qboot.rom",
            "-kernel", str(paths.kernel), "-initrd", str(paths.initrd),
            "-append", " ".join(append),
            "-blockdev", json.dumps(blockdev, separators=(",", ":")),
            "-device", f"virtio-blk-pci,id={DISK_ID},drive={DISK_NODE},write-cache=on,"
                       "rerror=report,werror=report",
            "-serial", "stdio"]
    if qmp_path:
        argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    return argv


class QMPError(GuestError):
    """QMP failed: no socket, no answer in time, or an error reply."""


class QMPClient:
    """A minimal QMP client: one command at a time, asynchronous events skipped.

    Every call blocks for at most its timeout.  Not thread-safe.
    """

    def __init__(self, path: str, deadline: float, alive=lambda: True) -> None:
        """Poll for the socket ``path`` until ``deadline`` (time.monotonic),
        connect, and negotiate capabilities.  ``alive()`` false stops the poll."""
        self._buf = b""
        while not os.path.exists(path):
            if time.monotonic() > deadline or not alive():
                raise QMPError(f"QMP socket {path} did not appear")
            time.sleep(0.02)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(max(0.1, deadline - time.monotonic()))
            self._sock.connect(path)
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise QMPError(f"unexpected QMP greeting {greeting!r}")
            self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self._sock.close()
            raise

    def _read_message(self, deadline: float) -> dict:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPError("QMP: no answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except (socket.timeout, OSError) as exc:
                raise QMPError(f"QMP: {exc or 'no answer in time'}") from exc
            if not chunk:
                raise QMPError("QMP: QEMU closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None,
                timeout: float = 10.0) -> Any:
        """Run one command and return its ``return`` member; raises QMPError."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        deadline = time.monotonic() + timeout
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"QMP {command}: {exc}") from exc
        while True:
            reply = self._read_message(deadline)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QMPError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    def close(self) -> None:
        self._sock.close()


class _Serial:
    """The guest's serial console: QEMU's stdout, copied to a log file."""

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        assert proc.stdout is not None
        self._proc = proc
        self._fd = proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._log = open(log_path, "wb")
        self._partial = b""
        self._eof = False
        self.tail: collections.deque[str] = collections.deque(maxlen=SERIAL_TAIL_LINES)

    def tail_text(self) -> str:
        lines = list(self.tail)
        if self._partial:
            lines.append(self._partial.decode(errors="replace"))
        return "\n".join(lines)

    def _pump(self, timeout: float) -> list[bytes]:
        """Wait up to ``timeout`` for output; return the complete lines read."""
        if self._eof:
            time.sleep(min(timeout, 0.05))
            return []
        if not self._sel.select(max(0.0, timeout)):
            return []
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            self._eof = True
            return []
        self._log.write(chunk)
        self._log.flush()
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self.tail.append(line.rstrip(b"\r").decode(errors="replace"))
        return lines

    def wait_result(self, deadline: float) -> bytes | None:
        """Read until the result line (returned), QEMU's exit or ``deadline`` (None)."""
        while time.monotonic() < deadline:
            for line in self._pump(min(0.2, deadline - time.monotonic())):
                at = line.find(RESULT_MARK)
                if at >= 0:
                    return line[at + len(RESULT_MARK):].rstrip(b"\r")
            if self._eof and self._proc.poll() is not None:
                return None
        return None

    def drain(self, deadline: float) -> None:
        """Copy what is left to the log until EOF or ``deadline``."""
        while not self._eof and time.monotonic() < deadline:
            self._pump(min(0.2, deadline - time.monotonic()))
        if self._partial:
            self.tail.append(self._partial.decode(errors="replace"))
            self._partial = b""

    def close(self) -> None:
        self._sel.close()
        self._log.close()


def _server_state(socket_path: str) -> str:
    """A few words on whether the NBD server still accepts connections."""
    try:
        mode = os.stat(socket_path).st_mode
    except FileNotFoundError:
        return f"the NBD server socket {socket_path} is gone (server went away)"
    if not stat.S_ISSOCK(mode):
        return f"{socket_path} is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(socket_path)
    except OSError as exc:
        return f"the NBD server at {socket_path} refuses connections ({exc.strerror}): it went away"
    finally:
        probe.close()
    return f"the NBD server at {socket_path} still accepts connections"


def _parse_result(raw: bytes) -> dict:
    text = raw.decode(errors="replace")
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON object in {text!r}")
    result = json.loads(text[start:end + 1])
    if not isinstance(result, dict) or "ok" not in result:
        raise ValueError(f"result is not an object with 'ok': {text!r}")
    return result


def _disk_stats(blockstats: list) -> dict:
    for entry in blockstats:
        if entry.get("node-name") == DISK_NODE or DISK_ID in entry.get("qdev", ""):
            return dict(entry.get("stats", {}))
    return {}


def _stop_qemu(proc: subprocess.Popen, qmp: QMPClient | None, log: Any) -> None:
    """Let the guest power off; then QMP quit; then SIGKILL the process group."""
    if proc.stdin is not None:
        try:
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        except OSError:
            pass
    try:
        proc.wait(timeout=POWEROFF_WAIT_S)
        return
    except subprocess.TimeoutExpired:
        log.warning("vm.shutdown.poweroff_timeout", seconds=POWEROFF_WAIT_S)
    if qmp is not None:
        try:
            qmp.execute("quit", timeout=QUIT_WAIT_S)
        except QMPError:
            pass
        try:
            proc.wait(timeout=QUIT_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            log.warning("vm.shutdown.quit_timeout", seconds=QUIT_WAIT_S)
    _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_guest(socket_path: str, workload: str, *, timeout: float = 300, mem_mb: int = 512,
              workdir: Path, log: Any = None, params: Mapping[str, object] | None = None,
              reconnect_delay: int = 5, check: bool = True) -> GuestRun:
    """Boot the guest on the NBD server at ``socket_path`` and run ``workload``.

    Blocks for the whole run, at most ``timeout`` seconds plus ~25 s of
    shutdown.  ``workdir`` receives the serial log (``serial-WORKLOAD.log``)
    and, when its path is short enough, the QMP socket.  ``params`` become
    ``nbdcache.KEY=VALUE`` on the guest's command line (``size_mb``,
    ``runtime``).  ``reconnect_delay`` is how long QEMU retries a lost NBD
    connection before failing the guest's I/O.  ``log`` is a structlog-style
    logger.  With ``check`` (the default) a result with ``"ok": false`` raises
    GuestError (the result is in ``exc.result``); without it, it is returned.
    """
    log = log or _default_log()
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    serial_log = workdir / f"serial-{workload}.log"
    try:
        if not stat.S_ISSOCK(os.stat(socket_path).st_mode):
            raise GuestError(f"{socket_path} is not a Unix socket")
    except FileNotFoundError:
        raise GuestError(f"no NBD server socket at {socket_path}") from None

    paths = build_image(progress=True)

    qmp_dir = workdir
    private_qmp_dir = None
    if len(str(workdir / "qmp.sock")) > 100:         # sun_path holds 108 bytes
        private_qmp_dir = tempfile.mkdtemp(prefix="nbdcache-qmp-")
        qmp_dir = Path(private_qmp_dir)
    qmp_path = str(qmp_dir / "qmp.sock")
    if os.path.exists(qmp_path):
        os.unlink(qmp_path)

    guest_timeout = max(5, int(timeout - min(20.0, timeout * 0.2)))
    accel = choose_accel()
    argv = qemu_command(paths, socket_path, workload, mem_mb=mem_mb, qmp_path=qmp_path,
                        guest_timeout=guest_timeout, hold=GUEST_HOLD_S,
                        reconnect_delay=reconnect_delay, params=params, accel=accel)
    # timeout(1) is a backstop should this process die; it also makes QEMU a
    # process group of its own, killed as a whole.
    argv = ["timeout", "-k", "5", str(int(timeout) + 60)] + argv
    log.info("vm.boot", workload=workload, socket=socket_path, accel=accel,
             serial_log=str(serial_log))
    started = time.monotonic()
    deadline = started + timeout
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    serial = _Serial(proc, serial_log)
    qmp: QMPClient | None = None

    def error(message: str, result: dict | None = None) -> GuestError:
        serial.drain(min(deadline, time.monotonic() + 2))
        return GuestError(message, serial_tail=serial.tail_text(), result=result,
                          serial_log=serial_log)

    try:
        try:
            qmp = QMPClient(qmp_path, min(deadline, time.monotonic() + NBD_OPEN_TIMEOUT_S + 20),
                            alive=lambda: proc.poll() is None)
        except QMPError as exc:
            try:
                proc.wait(timeout=2)        # QEMU may be exiting: say so, not "QMP failed"
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is not None:
                raise error(f"QEMU exited with status {proc.returncode} while starting; "
                            f"{_server_state(socket_path)}") from None
            raise error(f"no QMP connection to QEMU: {exc.reason}") from None

        raw = serial.wait_result(deadline)
        seconds = time.monotonic() - started
        if raw is None:
            if proc.poll() is not None:
                what = f"QEMU exited with status {proc.returncode}"
            else:
                what = f"no result within {timeout:g} s"
            raise error(f"guest workload {workload} printed no NBDCACHE-RESULT line ({what}); "
                        f"{_server_state(socket_path)}")
        try:
            result = _parse_result(raw)
        except ValueError as exc:
            raise error(f"malformed NBDCACHE-RESULT line: {exc}") from None
        try:
            blockstats = _disk_stats(qmp.execute("query-blockstats"))
        except QMPError as exc:
            log.warning("vm.blockstats.failed", error=exc.reason)
            blockstats = {}
        log.info("vm.result", workload=workload, ok=result.get("ok"),
                 seconds=round(seconds, 2), error=result.get("error", ""))
        _stop_qemu(proc, qmp, log)
        serial.drain(time.monotonic() + 2)
        if check and result.get("ok") is not True:
            raise error(f"guest workload {workload} failed: {result.get('error') or 'no reason'}; "
                        f"{_server_state(socket_path)}", result=result)
        return GuestRun(result=result, blockstats=blockstats, serial_log=serial_log,
                        seconds=seconds)
    finally:
        if qmp is not None:
            qmp.close()
        _kill(proc)
        if proc.stdin is not None:
            proc.stdin.close()
        serial.close()
        if proc.stdout is not None:
            proc.stdout.close()
        for leftover in (qmp_path,):
            if os.path.exists(leftover):
                os.unlink(leftover)
        if private_qmp_dir:
            os.rmdir(private_qmp_dir)
        log.info("vm.exit", workload=workload, status=proc.returncode)
