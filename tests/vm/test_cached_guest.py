"""End to end: the guest's workloads on the cached disk, with a RAM cache small enough that
eviction and write-back happen inside the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdcache.runner import ServedDisk

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def serve_small(tmp_path: Path, ram: str = "8M", size: str = "1G",
                swap: bool = False) -> ServedDisk:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"backend: {{path: disk.img, size: {size}}}\ncache: {{ram: {ram}}}\n"
                   + ("swap: {devices: [{path: swap.img, size: 256M}]}\n" if swap else "")
                   + "server: {socket: run/s.sock}\nlog: {file: server.log}\n")
    return ServedDisk(cfg)


@pytest.mark.parametrize("workload,swap", [("smoke", False), ("fs", False), ("smoke", True),
                                           ("fs", True)])
def test_workload_on_a_small_cache(tmp_path, workload, swap):
    from nbdcache.vm import run_guest
    disk = serve_small(tmp_path, swap=swap)
    try:
        run = run_guest(str(disk.socket), workload, timeout=420, workdir=tmp_path / "vm")
    finally:
        disk.stop()
    assert run.result["ok"], run.result
    (final,) = [e for e in disk.events("stats") if e.get("final")]
    assert final["writeback_bytes"] > 0 and final["writeback_clusters"] > 0
    assert final["recycled"] > 0 or workload == "smoke"     # the fs tree is 12x the cache
    assert final["writeback_errors"] == 0 and final["dirtybufcount"] == 0
    if swap:
        assert final["swap_pageout_blocks"] > 0, "swap enabled but nothing was paged out"
        assert final["swap_dirty_slots"] == 0, "dirty data left in swap after the final flush"
        assert final["swap_lost_dirty"] == 0 and final["swap_write_errors"] == 0
        if workload == "fs":
            assert final["swap_hits"] > 0, "the fs verify pass read nothing back from swap"


def test_run_vm_prints_verdict_and_statistics(tmp_path, capsys):
    from nbdcache.runner import run_vm
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backend: {path: disk.img, size: 256M}\ncache: {ram: 4M}\n"
                   "server: {socket: run/s.sock}\n")
    rc = run_vm(cfg, "smoke", workdir=tmp_path / "vm", timeout=300)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "guest verdict: PASS smoke" in err and "write-back" in err and "hit ratio" in err
