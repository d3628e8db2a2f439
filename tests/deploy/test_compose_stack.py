"""compose.yaml's three services, run on the host as the containers would run them.

No container engine runs here, so the services' own commands are started
from compose.yaml (``docker-compose config``), with the image's
/opt/nbdcache mapped to this checkout and volumes to the test's tmp dir:
deploy/nbd-backend.sh serves a sparse image on a loopback TCP port,
``nbdcache serve`` runs with the mounted deploy/nbdcache-compose.yaml (its
``nbd-backend`` host name pointed at 127.0.0.1), both healthchecks pass, and
deploy/vm.sh builds (or reuses) the guest image and boots the ``smoke``
workload through the cache.  After SIGTERM the guest's data is in the
backend's image file.  A missing QEMU, qboot or docker-compose skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from deploykit import REPO, Proc, Serve, free_port, port_open  # noqa: E402

IMAGE_ROOT = "/opt/nbdcache"
MiB = 1024 * 1024

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def host(word: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        word = word.replace(old, new)
    return word.replace(IMAGE_ROOT, str(REPO))


@pytest.mark.timeout(900)
def test_compose_services_run_and_boot_the_guest(tmp_path):
    for tool in ("docker-compose", "nbdkit", "nbdinfo", "qemu-system-x86_64", "timeout"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/usr/share/qemu/qboot.rom").exists():
        pytest.skip("/usr/share/qemu/qboot.rom is missing (package qemu-system-data)")
    r = subprocess.run(["docker-compose", "-f", str(REPO / "compose.yaml"), "config"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    svcs = yaml.safe_load(r.stdout)["services"]
    port = free_port()

    # nbd-backend: its entrypoint and environment, the volume under tmp_path.
    be = svcs["nbd-backend"]
    env = {k: str(v) for k, v in be["environment"].items()}
    image = tmp_path / "backend-data" / Path(env["NBD_BACKEND_IMAGE"]).name
    env.update(NBD_BACKEND_IMAGE=str(image), NBD_BACKEND_SIZE="256M",
               NBD_BACKEND_PORT=str(port), NBD_BACKEND_ADDR="127.0.0.1")
    subs = {f"nbd://127.0.0.1:{be['environment']['NBD_BACKEND_PORT']}":
            f"nbd://127.0.0.1:{port}"}
    backend = Proc(["timeout", "-k", "5", "800", *[host(w, subs) for w in be["entrypoint"]]],
                   tmp_path / "nbd-backend.log", env={**os.environ, **env})
    cache = None
    try:
        backend.wait_ready(lambda: port_open(port), 30, "nbd-backend")
        assert image.stat().st_size == 256 * MiB
        check = [host(w, subs) for w in be["healthcheck"]["test"][1:]]
        assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0, check

        # nbdcache: the image's entrypoint with the mounted config.
        nc = svcs["nbdcache"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in nc["volumes"]}
        config = yaml.safe_load(Path(mounts["/etc/nbdcache/nbdcache.yaml"]).read_text())
        config["backend"]["uri"] = config["backend"]["uri"].replace(
            "nbd-backend:", "127.0.0.1:").replace(f":{env_port(be)}", f":{port}")
        sock = tmp_path / "run" / Path(config["server"]["socket"]).name
        config["server"]["socket"] = str(sock)
        config["log"]["file"] = str(tmp_path / "nbdcache.log")
        cfg = tmp_path / "nbdcache.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cache = Serve(cfg, sock, tmp_path / "nbdcache.stderr")
        check = [w.replace(nc["healthcheck"]["test"][-1], f"nbd+unix:///?socket={sock}")
                 for w in nc["healthcheck"]["test"][1:]]
        assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0, check

        # vm: deploy/vm.sh with the default guest cache (vm-images/cache) and smoke.
        vm = svcs["vm"]
        cmd = [host(w, {}) for w in vm["entrypoint"]]
        args = list(vm["command"])
        args[args.index("--workload") + 1] = "smoke"
        args[args.index("--timeout") + 1] = "300"
        vm_env = {k: v for k, v in os.environ.items() if k != "NBDCACHE_VM_CACHE"}
        vm_env["NBDCACHE_SOCKET"] = str(sock)
        r = subprocess.run(["timeout", "-k", "10", "700", *cmd, *args, "--serial-log",
                            str(tmp_path / "serial.log")], env=vm_env, capture_output=True,
                           text=True, timeout=760, start_new_session=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert '"ok": true' in r.stdout and '"workload": "smoke"' in r.stdout, r.stdout

        assert cache.stop(120) == 0, cache.output()     # docker-compose stop: SIGTERM
        cache = None
        with open(image, "rb") as f:                    # smoke wrote the head of the disk
            assert f.read(4 * MiB) != bytes(4 * MiB)
    finally:
        if cache is not None:
            cache.stop(30)
        backend.stop(10)


def env_port(service: dict) -> str:
    return str(service["environment"]["NBD_BACKEND_PORT"])
