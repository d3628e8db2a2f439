"""The `make bench` harness (bench/run.py) end to end on two cheap workloads, plus its
ratio arithmetic.  Checks that results, ratios and tables are produced, not their values
(the machine is shared; figures here mean nothing)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None or shutil.which("fio") is None,
                                reason="nbdkit and fio are required")


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("run"), importlib.import_module("workloads")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_quick_run_writes_json_table_and_ratios(tmp_path):
    cmd = [sys.executable, str(RUN), "--quick", "--runtime", "1",
           "--only", "hit-rand4k-read-qd1", "w1ms-burst-flush",
           "--targets", "nbdcache-parallel", "nbdkit-memory", "cache-filter",
           "--results-dir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[bench +" in p.stdout and "hit-rand4k-read-qd1 on nbdcache-parallel" in p.stdout

    (raw,) = tmp_path.glob("*.json")
    doc = json.loads(raw.read_text())
    assert doc["options"]["quick"] and doc["options"]["reps"] == 1
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["nbdkit"].startswith("nbdkit")
    assert [s["suite"] for s in doc["suites"]] == ["hits", "slow-w1ms"]
    assert not any(r["error"] for s in doc["suites"] for r in s["results"])
    measured = {(m["workload"], m["target"]) for m in doc["medians"]}
    assert measured == {("hit-rand4k-read-qd1", "nbdcache-parallel"),
                        ("hit-rand4k-read-qd1", "nbdkit-memory"),
                        ("hit-rand4k-read-qd1", "cache-filter"),
                        ("w1ms-burst-flush", "nbdcache-parallel"),
                        ("w1ms-burst-flush", "cache-filter")}
    burst = next(m["metrics"] for m in doc["medians"]
                 if m["workload"] == "w1ms-burst-flush" and m["target"] == "nbdcache-parallel")
    assert burst["flush_s"] >= 0 and burst["backend_writes"] > 0     # the upstream log is read

    ratios = {(r["workload"], r["nbdcache"], r["peer"]): r["ratio"] for r in doc["ratios"]}
    assert ratios[("hit-rand4k-read-qd1", "nbdcache-parallel", "nbdkit-memory")] > 0
    assert ratios[("hit-rand4k-read-qd1", "nbdcache-parallel", "cache-filter")] > 0
    assert ratios[("w1ms-burst-flush", "nbdcache-parallel", "cache-filter")] > 0
    verdicts = {(g["goal"], g["workload"], g["subject"]): g["verdict"] for g in doc["goals"]}
    flush_goal = next(k for k in verdicts if k[1] == "w1ms-burst-flush")
    assert verdicts[flush_goal] in ("PASS", "MISS")
    assert any(g["verdict"] == "SKIP" or g["note"] == "not measured in this run"
               for g in doc["goals"])

    table = (tmp_path / "quick.md").read_text()
    for text in ("## Machine", "## Goals", "hit-rand4k-read-qd1", "w1ms-burst-flush",
                 "nbdcache's advantage", "## Servers", "--quick"):
        assert text in table, text
    assert not (ROOT / "bench" / "results" / raw.name).exists()


def test_ratios_favour_nbdcache_above_one(bench_modules):
    run, _ = bench_modules
    assert run.advantage(200.0, 100.0, "higher") == 2.0      # twice the IOPS
    assert run.advantage(0.5, 2.0, "lower") == 4.0           # a flush four times shorter
    assert run.advantage(None, 1.0, "higher") is None
    assert run.advantage(1.0, 0.0, "higher") is None


def test_only_and_targets_select_suites_workloads_and_targets(bench_modules):
    _, workloads = bench_modules
    opts = workloads.Options(reps=1, runtime=1, quick=True, models=["parallel"], threads=None,
                             guest=False)
    suites = workloads.select(workloads.plan(opts), ["hit-rand4k-*", "slow-r1ms"],
                              ["nbdcache-*", "cache-filter"])
    assert [s.name for s in suites] == ["hits", "slow-r1ms"]
    hits, slow = suites
    assert [w.name for w in hits.workloads] == [f"hit-rand4k-{rw}-qd{qd}" for rw in
                                                ("read", "write") for qd in (1, 16)]
    assert [t.name for t in hits.specs] == ["nbdcache-parallel", "cache-filter"]
    assert [t.name for t in slow.specs] == ["upstream", "nbdcache-parallel", "cache-filter"]
