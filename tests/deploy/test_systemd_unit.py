"""deploy/nbdcache.service: parsed, verified by systemd-analyze, and its commands run.

systemd is not PID 1 here, so the unit cannot be started as a service.
Instead: the unit is parsed (systemd's syntax: repeated keys, quoting) and its
required settings checked; ``systemd-analyze verify`` loads a copy whose
/opt/nbdcache paths point at this checkout; ``systemd-analyze security
--offline`` scores the sandbox; ExecStartPre, ExecStart and ExecStop are run
as systemd would run them (its default PATH, /etc and /run paths moved under
the test's tmp dir) to show that ExecStop flushes before SIGTERM; and the
system calls of a serve session (under strace) are checked against
SystemCallFilter.  A missing systemd-analyze or strace skips those parts.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deploykit import REPO, SYSTEMD_PATH, Proc, nbd_connect, split_command  # noqa: E402

UNIT = REPO / "deploy" / "nbdcache.service"
INSTALL_ROOT = "/opt/nbdcache"           # where the unit expects the checkout
CONFIG = "/etc/nbdcache/nbdcache.yaml"   # installed from deploy/nbdcache.yaml
SOCKET = "/run/nbdcache/nbdcache.sock"
MiB = 1024 * 1024


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value, repeated keys kept in order, # comments,
    backslash continuation lines."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    lines = iter(text.splitlines())
    for line in lines:
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines, "")
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        m = re.fullmatch(r"\[([A-Za-z]+)\]", s)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"{s!r} outside a section"
        key, sep, value = s.partition("=")
        assert sep, f"not Key=Value: {s!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= given {len(values)} times"
    return values[0]


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(n) * units[u or "s"]
    return total


def local(path: str, tmp: Path | None = None) -> str:
    """The unit's installed paths, moved to this checkout (and the tmp dir)."""
    path = path.replace(INSTALL_ROOT, str(REPO))
    if tmp is not None:
        path = path.replace(CONFIG, str(tmp / "etc" / "nbdcache.yaml"))
        path = path.replace("/run/nbdcache", str(tmp / "run"))
    return path


# --------------------------------------------------------------------------- static checks

def test_required_settings(unit):
    svc = unit["Service"]
    assert one(unit, "Service", "Type") == "simple"
    assert one(unit, "Service", "RuntimeDirectory") == "nbdcache"
    assert one(unit, "Service", "RuntimeDirectoryMode") == "0700"
    start = split_command(one(unit, "Service", "ExecStart"))
    assert start[1:3] == ["serve", "--config"] and start[0].endswith("/bin/nbdcache")
    assert start[3] == CONFIG and start[start.index("--socket") + 1] == SOCKET
    stop = split_command(one(unit, "Service", "ExecStop"))
    assert Path(stop[0]).name == "nbdsh"
    assert stop[stop.index("--uri") + 1] == f"nbd+unix:///?socket={SOCKET}"
    assert stop[stop.index("-c") + 1] == "h.flush()"
    # SIGTERM to `nbdcache serve` only (it forwards to nbdkit); time for a flush.
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert seconds(one(unit, "Service", "TimeoutStopSec")) >= 60
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "SystemCallFilter",
                "CapabilityBoundingSet", "RestrictAddressFamilies"):
        assert key in svc, f"hardening option {key}= is missing"
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)   # socket, nbd:// backends
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_referenced_files_exist_or_are_installed_as_documented(unit):
    docs = (REPO / "docs" / "deployment.md").read_text()
    for key in ("ExecStartPre", "ExecStart", "ExecStop"):
        for line in unit["Service"].get(key, []):
            exe = split_command(line)[0]
            if exe.startswith(INSTALL_ROOT):
                p = Path(local(exe))
                assert os.access(p, os.X_OK), f"{key}: {p} is not executable (make setup?)"
            else:
                assert os.access(exe, os.X_OK), f"{key}: {exe} is not installed"
                owner = subprocess.run(["dpkg", "-S", exe], capture_output=True, text=True)
                if owner.returncode == 0:
                    pkg = owner.stdout.split(":")[0]
                    assert pkg in (REPO / "Makefile").read_text(), \
                        f"{exe} comes from {pkg}, which `make setup` does not install"
    doc = one(unit, "Unit", "Documentation")
    assert doc.startswith(f"file:{INSTALL_ROOT}/")
    assert Path(local(doc[len("file:"):])).is_file()
    # The config path is installed from deploy/nbdcache.yaml, as the unit and docs say.
    assert (REPO / "deploy" / "nbdcache.yaml").is_file()
    install_line = f"deploy/nbdcache.yaml {CONFIG}"
    assert install_line in UNIT.read_text() and install_line in docs


def test_example_config_is_valid():
    r = subprocess.run([sys.executable, "-m", "nbdcache", "check-config",
                        str(REPO / "deploy" / "nbdcache.yaml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    text = (REPO / "deploy" / "nbdcache.yaml").read_text()
    assert f"socket: {SOCKET}" in text
    assert "path: /var/lib/nbdcache/" in text         # the unit's StateDirectory


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_systemd_analyze_verify(tmp_path):
    copy = tmp_path / "nbdcache.service"
    copy.write_text(local(UNIT.read_text()))
    r = systemd_analyze("verify", str(copy), cwd=tmp_path)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "nbdcache" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_systemd_analyze_security_offline(tmp_path):
    copy = tmp_path / "nbdcache.service"
    copy.write_text(UNIT.read_text())
    r = systemd_analyze("security", "--offline=yes", "--no-pager", str(copy), cwd=tmp_path)
    if "--offline" in r.stderr and r.returncode != 0:
        pytest.skip("systemd-analyze security has no --offline here (systemd < 250)")
    m = re.search(r"Overall exposure level for nbdcache.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout        # 2.0 "OK" with systemd 252


# --------------------------------------------------------------------------- the commands, run

def systemd_env() -> dict[str, str]:
    """systemd's default PATH plus the unit's Environment= lines."""
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
    for line in parse_unit(UNIT.read_text())["Service"].get("Environment", []):
        for word in split_command(line):
            k, _, v = word.partition("=")
            env[k] = v
    return env


def install_config(tmp_path: Path) -> None:
    """deploy/nbdcache.yaml as /etc/nbdcache/nbdcache.yaml, its paths under tmp_path."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "state").mkdir(mode=0o700)
    text = (REPO / "deploy" / "nbdcache.yaml").read_text()
    text = text.replace("/var/lib/nbdcache", str(tmp_path / "state"))
    text = text.replace("/run/nbdcache", str(tmp_path / "run"))
    (tmp_path / "etc" / "nbdcache.yaml").write_text(text)


@pytest.mark.timeout(300)
def test_execstop_flushes_before_sigterm(unit, tmp_path):
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    install_config(tmp_path)
    env = systemd_env()
    pre = [local(w, tmp_path) for w in split_command(one(unit, "Service", "ExecStartPre"))]
    r = subprocess.run(pre, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    start = [local(w, tmp_path) for w in split_command(one(unit, "Service", "ExecStart"))]
    main = Proc(start, tmp_path / "journal.log", env=env, die_with_parent=True)
    sock = tmp_path / "run" / "nbdcache.sock"
    try:
        main.wait_ready(sock.is_socket, 60, "ExecStart")
        assert (sock.parent.stat().st_mode & 0o777) == 0o700
        data = os.urandom(MiB) + b"tail"
        h = nbd_connect(f"nbd+unix:///?socket={sock}")
        h.pwrite(data, 12345)                   # dirty in the cache: not flushed
        h.shutdown()
        image = tmp_path / "state" / "disk.img"
        with open(image, "rb") as f:
            f.seek(12345)
            assert f.read(len(data)) != data    # not yet written back
        stop = [local(w, tmp_path) for w in split_command(one(unit, "Service", "ExecStop"))]
        r = subprocess.run(stop, env=env, capture_output=True, text=True,
                           timeout=seconds(one(unit, "Service", "TimeoutStopSec")))
        assert r.returncode == 0, r.stdout + r.stderr
        with open(image, "rb") as f:            # ExecStop alone put it on the disk
            f.seek(12345)
            assert f.read(len(data)) == data
        assert main.proc.poll() is None, "ExecStop must not stop the server itself"
        rc = main.terminate(60)                 # KillMode=mixed: SIGTERM to the main process
        assert rc == 0, main.output()
        assert not sock.exists()
    finally:
        main.stop(5)
    assert '"event": "shutdown.flush"' in main.output()


@pytest.mark.timeout(300)
def test_system_calls_pass_the_filter(unit, tmp_path):
    """Every system call of a serve session (start, I/O, flush, SIGTERM) is in the
    unit's SystemCallFilter, so the filter does not break the service."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    wanted = one(unit, "Service", "SystemCallFilter").split()
    allowed: set[str] = set()
    for name in wanted:
        allowed |= expand_filter(name, tmp_path)
    install_config(tmp_path)
    start = [local(w, tmp_path) for w in split_command(one(unit, "Service", "ExecStart"))]
    trace = tmp_path / "strace.txt"
    main = Proc(["strace", "-f", "-qq", "-c", "-U", "name", "-o", str(trace), *start],
                tmp_path / "journal.log", env=systemd_env(), die_with_parent=True)
    sock = tmp_path / "run" / "nbdcache.sock"
    try:
        main.wait_ready(sock.is_socket, 120, "ExecStart under strace")
        h = nbd_connect(f"nbd+unix:///?socket={sock}")
        h.pwrite(os.urandom(3 * MiB), 4096)
        h.flush()
        assert len(h.pread(8 * MiB, 64 * MiB)) == 8 * MiB
        h.trim(MiB, 0)
        h.zero(MiB, 16 * MiB)
        h.shutdown()
        # strace does not pass signals on: SIGTERM its child, `nbdcache serve`.
        children = Path(f"/proc/{main.proc.pid}/task/{main.proc.pid}/children").read_text()
        os.kill(int(children.split()[0]), signal.SIGTERM)
        assert main.proc.wait(120) == 0, main.output()
    finally:
        main.stop(5)
    used = {line.split()[0] for line in trace.read_text().splitlines()[2:]
            if line.strip() and not line.startswith("-") and line.split()[0] != "total"}
    assert len(used) > 20, trace.read_text()
    assert used <= allowed, f"outside SystemCallFilter: {sorted(used - allowed)}"


def expand_filter(name: str, cwd: Path, seen: set[str] | None = None) -> set[str]:
    """The system calls a SystemCallFilter= group or name stands for."""
    if not name.startswith("@"):
        return {name}
    seen = seen if seen is not None else set()
    seen.add(name)
    r = systemd_analyze("syscall-filter", name, cwd=cwd)
    assert r.returncode == 0, r.stderr
    calls: set[str] = set()
    for line in r.stdout.splitlines()[1:]:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("@"):
            if s not in seen:
                calls |= expand_filter(s, cwd, seen)
        else:
            calls.add(s)
    return calls
