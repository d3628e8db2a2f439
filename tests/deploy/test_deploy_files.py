"""Dockerfile, .dockerignore and compose.yaml: validated without a container engine.

``docker-compose config`` (Debian's docker-compose, which `make setup`
installs) parses and validates compose.yaml; the build context is computed
from .dockerignore with docker-py's own rules (``docker.utils.build``, which
docker-compose uses), and every path the image and the services rely on is
checked to exist in this checkout and in that context.  The services'
commands are run outside containers by test_compose_stack.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from deploykit import REPO  # noqa: E402

from nbdcache import config as configmod  # noqa: E402

IMAGE_ROOT = "/opt/nbdcache"
HOST_ONLY_PACKAGES = {"docker-compose"}      # validates compose.yaml on the host


def makefile_packages() -> list[str]:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(r"^DEB_PACKAGES\s*:?=\s*(.*)$", text, re.M)
    assert m, "no DEB_PACKAGES in the Makefile"
    return m.group(1).split()


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def apt_packages() -> list[str]:
    runs = " ".join(instructions("RUN"))
    m = re.search(r"apt-get install -y --no-install-recommends (.*?)(?:&&|$)", runs)
    assert m, "no apt-get install in the Dockerfile"
    return m.group(1).split()


# --------------------------------------------------------------------------- Dockerfile

def test_dockerfile_base_venv_and_entrypoint():
    assert instructions("FROM") == ["debian:bookworm-slim"]
    runs = " ".join(instructions("RUN"))
    assert f"/usr/bin/python3 -m venv --system-site-packages {IMAGE_ROOT}/.venv" in runs
    assert f"{IMAGE_ROOT}/.venv/bin/pip install -e {IMAGE_ROOT}" in runs
    assert f"install -m 0644 {IMAGE_ROOT}/deploy/nbdcache.yaml /etc/nbdcache/nbdcache.yaml" \
        in runs
    assert instructions("COPY") == [f". {IMAGE_ROOT}"]
    entry = json.loads(instructions("ENTRYPOINT")[0])
    assert entry == [f"{IMAGE_ROOT}/.venv/bin/nbdcache", "serve", "--config",
                     "/etc/nbdcache/nbdcache.yaml"]


def test_dockerfile_installs_what_make_setup_installs():
    missing = set(makefile_packages()) - HOST_ONLY_PACKAGES - set(apt_packages())
    assert not missing, f"Makefile DEB_PACKAGES not installed by the Dockerfile: {missing}"


def test_dockerfile_packages_resolve_in_debian():
    """The Dockerfile's apt-get install, simulated against this system's package lists
    (Debian 12, the image's base).  A virtual package with one provider, like
    bookworm's nbdfuse (in libnbd-bin), resolves to it, as it does in the build."""
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available")
    r = subprocess.run(["apt-get", "install", "-s", "--no-install-recommends", *apt_packages()],
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "E: " not in r.stderr, r.stderr


def build_context() -> set[str]:
    """Files docker would send as the build context (docker-py's .dockerignore rules)."""
    build = pytest.importorskip("docker.utils.build", reason="python3-docker is not installed")
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.lstrip().startswith("#")]
    return set(build.exclude_paths(str(REPO), patterns))


def test_build_context_holds_what_the_image_uses():
    ctx = build_context()
    needed = ["pyproject.toml", "nbdcache/plugin.py", "nbdcache/cli.py", "deploy/nbdcache.yaml",
              "deploy/nbd-backend.sh", "deploy/vm.sh", "vm-images/boot.sh",
              "vm-images/build.sh", "vm-images/init"]
    needed += [f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")]
    for rel in needed:
        assert rel in ctx, f"{rel} is not in the build context (.dockerignore)"
    for rel in ctx:
        top = rel.split("/")[0]
        assert top not in (".venv", ".git", "var", ".pytest_cache", ".hypothesis"), rel
        assert not rel.startswith("vm-images/cache/"), rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc"), rel


# --------------------------------------------------------------------------- compose.yaml

@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose, in the "
                    "Makefile's DEB_PACKAGES: run `make setup`)")
    r = subprocess.run([exe, "-f", str(REPO / "compose.yaml"), "config"], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_config_validates(compose):
    assert set(compose["services"]) == {"nbd-backend", "nbdcache", "vm"}


def image_path(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT + "/"), path
    return REPO / path[len(IMAGE_ROOT) + 1:]


def test_compose_references_exist(compose):
    packages = set(apt_packages())
    ctx = build_context()
    for name, svc in compose["services"].items():
        build = svc["build"]
        assert Path(build["context"]).resolve() == REPO, name
        assert (REPO / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("/"):
                assert Path(source).is_file() or Path(source).is_dir(), f"{name}: {source}"
                assert Path(source).resolve().is_relative_to(REPO), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for word in svc.get("entrypoint", []) + svc.get("command", []):
            if word.startswith(IMAGE_ROOT):
                p = image_path(word)
                assert p.is_file() and p.stat().st_mode & 0o111, f"{name}: {word}"
                assert str(p.relative_to(REPO)) in ctx, f"{name}: {word} not in the context"
        test = svc.get("healthcheck", {}).get("test", ["NONE"])
        if test[0] == "CMD":
            exe = shutil.which(test[1])
            assert exe, f"{name}: {test[1]} is not installed"
            owner = subprocess.run(["dpkg", "-S", exe], capture_output=True, text=True)
            assert owner.returncode == 0 and owner.stdout.split(":")[0] in packages, \
                f"{name}: {exe} is not from a package the Dockerfile installs"


def test_compose_wiring(compose):
    svcs = compose["services"]
    mounts = {name: {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
              for name, svc in svcs.items()}
    cfg_source = Path(mounts["nbdcache"]["/etc/nbdcache/nbdcache.yaml"])
    assert cfg_source.parent == REPO / "deploy"
    cfg = configmod.load(cfg_source)
    assert cfg["backend.type"] == "nbd"
    m = re.fullmatch(r"nbd://([^:/]+):(\d+)", cfg["backend.uri"])
    assert m and m.group(1) == "nbd-backend"
    backend_env = svcs["nbd-backend"]["environment"]
    assert m.group(2) == str(backend_env["NBD_BACKEND_PORT"])
    assert m.group(2) in svcs["nbd-backend"]["expose"]
    assert str(Path(backend_env["NBD_BACKEND_IMAGE"]).parent) in mounts["nbd-backend"]
    # The export's socket is in a volume that nbdcache and vm both mount there.
    sock = cfg["server.socket"]
    run_dir = str(Path(sock).parent)
    assert mounts["nbdcache"][run_dir] == mounts["vm"][run_dir]
    assert mounts["vm"][run_dir] in compose["volumes"]
    assert svcs["vm"]["environment"]["NBDCACHE_SOCKET"] == sock
    assert svcs["nbdcache"]["healthcheck"]["test"][-1] == f"nbd+unix:///?socket={sock}"
    assert str(Path(cfg["log.file"]).parent) in mounts["nbdcache"]
    assert svcs["vm"]["environment"]["NBDCACHE_VM_CACHE"] in mounts["vm"]
    # Start order, and time for the flush on `docker-compose stop`.
    assert svcs["nbdcache"]["depends_on"]["nbd-backend"]["condition"] == "service_healthy"
    assert svcs["vm"]["depends_on"]["nbdcache"]["condition"] == "service_healthy"
    assert svcs["nbdcache"]["stop_grace_period"] in ("5m", "300s")


@pytest.mark.parametrize("name", ["nbdcache.yaml", "nbdcache-compose.yaml"])
def test_deploy_configs_pass_check_config(name):
    r = subprocess.run([sys.executable, "-m", "nbdcache", "check-config",
                        str(REPO / "deploy" / name)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_shell_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    scripts = sorted(str(p) for p in (REPO / "deploy").glob("*.sh"))
    r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def test_scripts_are_executable_and_posix_sh():
    for p in (REPO / "deploy").glob("*.sh"):
        assert p.stat().st_mode & 0o111, p
        assert p.read_text().startswith("#!/bin/sh\n"), p
        r = subprocess.run(["sh", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
