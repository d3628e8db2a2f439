"""Helpers for tests/deploy: loopback upstreams, `nbdcache serve`, documented command blocks.

Every process started here is bounded: nbdkit upstreams run with
``--exit-with-parent``, ``nbdcache serve`` gets SIGTERM from the kernel when
the test process dies (``PR_SET_PDEATHSIG``), scripts run under a deadline,
and each runs in a process group of its own that ``stop()`` (or the script
runner) always ends.  Ports are free ones on 127.0.0.1, chosen by the kernel.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: What systemd gives a service when the unit sets no PATH (systemd.exec(5)).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
#: The shell environment the docs assume: the project's virtualenv activated.
DOC_PATH = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the test process goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class StartError(RuntimeError):
    """A server exited, or did not become ready, before its deadline."""


class Proc:
    """A process in a group of its own, with stdout and stderr in ``log``."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, die_with_parent: bool = False) -> None:
        self.cmd = cmd
        self.log = log
        self._logf = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if die_with_parent else None)

    def output(self) -> str:
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_text(errors="replace")

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise StartError(f"{what}: exited with status {self.proc.returncode}:\n"
                                 f"{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise StartError(f"{what}: not ready after {timeout:g} s:\n{self.output()}")
            time.sleep(0.05)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM the main process only; return its status, or None if still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the whole process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the group.  Always ends it."""
        rc = self.terminate(timeout)
        self.kill()                 # anything left in the group (or an overrun)
        self._logf.close()
        return rc


class Upstream(Proc):
    """``nbdkit`` serving ``args`` on a free loopback TCP port (``--exit-with-parent``)."""

    def __init__(self, log: Path, *args: str, port: int | None = None,
                 pre: tuple[str, ...] = ()) -> None:
        for attempt in range(3):
            self.port = port or free_port()
            super().__init__(["nbdkit", "--foreground", "--exit-with-parent",
                              "--ipaddr", "127.0.0.1", "--port", str(self.port), *pre, *args],
                             log)
            try:
                self.wait_ready(lambda: port_open(self.port), 20, "nbdkit upstream")
                return
            except StartError:
                in_use = "Address already in use" in self.output()
                self.stop(5)
                if not in_use or port or attempt == 2:
                    raise

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"


class Serve(Proc):
    """``python -m nbdcache serve --config FILE [ARGS]``; ready when ``sock`` exists."""

    def __init__(self, config: Path, sock: Path, log: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        super().__init__([sys.executable, "-m", "nbdcache", "serve", "--config", str(config),
                          *args], log, env=env, cwd=REPO, die_with_parent=True)
        self.sock = sock
        self.wait_ready(sock.is_socket, 30, "nbdcache serve")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


def nbd_connect(uri: str):
    """A libnbd handle connected to ``uri`` (local files in the URI allowed)."""
    import nbd
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    return h


# --------------------------------------------------------------------------- documents

def doc_block(path: Path, name: str) -> str:
    """The fenced code block that follows ``<!-- run: NAME -->`` in the Markdown ``path``."""
    text = path.read_text()
    m = re.search(r"<!-- run: " + re.escape(name) + r" -->\n```\w*\n(.*?)\n```", text, re.S)
    if m is None:
        raise AssertionError(f"{path}: no code block marked <!-- run: {name} -->")
    return m.group(1)


def heredoc(script: str, filename: str) -> str:
    """The body of ``cat > FILENAME <<'EOF' ... EOF`` in ``script``."""
    m = re.search(r"cat > " + re.escape(filename) + r" <<'EOF'\n(.*?\n)EOF\n", script, re.S)
    if m is None:
        raise AssertionError(f"no here-document for {filename}")
    return m.group(1)


def substitute(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in text, f"{old!r} does not occur in the block"
        text = text.replace(old, new)
    return text


def run_script(script: str, cwd: Path, timeout: float, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """Run ``script`` with ``bash -eu -o pipefail`` in a process group of its own.

    Background jobs the script leaves behind (a failed walkthrough leaves its
    servers) are killed with the group, whether the script ended or timed out.
    """
    env = dict(os.environ if env is None else env)
    proc = subprocess.Popen(["bash", "-eu", "-o", "pipefail", "-c", script], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_die_with_parent)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[test] script killed after {timeout:g} s"
        proc.returncode = -signal.SIGKILL
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def doc_env(**extra: str) -> dict[str, str]:
    """The environment the docs assume: the project's virtualenv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=DOC_PATH, VIRTUAL_ENV=str(VENV_BIN.parent), **extra)
    return env


def split_command(line: str) -> list[str]:
    """Split a systemd Exec*= or Dockerfile shell line into words (shell quoting)."""
    return shlex.split(line)
