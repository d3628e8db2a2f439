"""`make bench`: nbdcache against its peers, medians and ratios from one run.

    bench/run.py [--quick] [--only NAME ...] [--targets NAME ...] [--reps N] [--runtime S]
                 [--guest] [--thread-models MODEL ...] [--threads N]

Theory of operation
-------------------
The plan is a list of *suites*.  A suite owns a temporary work directory and
a set of targets (``bench/targets.py``): it starts them all on Unix sockets,
warms each one (writes the working set, flushes), then for every repetition
runs every workload on every target in turn, so that the targets of one
workload are measured minutes apart at most and under the same load from the
rest of the machine.  A measurement is: the untimed pre-step (re-read the
working set, since idle page cache is paged out after ~30 s), the timed
workload (``bench/workloads.py``), the untimed settle step (a flush, so no
write-back runs during the next target's measurement).  Then the suite's
servers are stopped together and nbdcache's final ``stats`` events read.

The report is the median of the repetitions of each figure, and for every
nbdcache target the ratio of its median to each peer's median in the same
suite, oriented so that a ratio above 1 means nbdcache did better (higher
IOPS, or a shorter time).  The project's goals (:func:`goals`) are checked
against those ratios, each with PASS or MISS.

Outputs: progress lines while running; the tables on stdout at the end; raw
results as JSON in ``bench/results/<UTC timestamp>.json``; the tables with a
machine description and the exact commands in ``docs/benchmarks.md``
(``bench/results/quick.md`` with ``--quick``).

Nothing outlives the run: every server is stopped in a ``finally``, and the
work directories are removed (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets as T  # noqa: E402
import workloads as W  # noqa: E402
from workloads import MODEL_SUFFIX, RSS_RAM, Ctx, Options, Suite, Workload  # noqa: E402

ROOT = T.ROOT
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024

RSS_SLACK = 64 * MiB        # the RSS goal: VmHWM <= cache.ram + this


# --------------------------------------------------------------------------- running

class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[bench +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


def fmt_ratio(v: float | None) -> str:
    """A ratio with enough digits that 0.899 does not read as 0.9 next to a MISS."""
    if v is None:
        return "—"
    return (f"{v:.3f}" if v < 10 else f"{v:.1f}") + "×"


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def run_suite(suite: Suite, opts: Options, say: Progress, keep: bool) -> dict[str, Any]:
    """Start, warm, measure (reps x workloads x targets), stop.  Never raises for a
    failed measurement: it is recorded with its error and the run goes on."""
    rec: dict[str, Any] = {"suite": suite.name, "title": suite.title, "results": [],
                           "servers": {}, "skipped": suite.skip or None, "error": None}
    if suite.skip:
        say(f"{suite.name}: SKIP ({suite.skip})")
        return rec
    workdir = Path(tempfile.mkdtemp(prefix=f"nbdcache-bench-{suite.name}-"))
    servers: dict[str, T.Server] = {}
    ctx = Ctx(opts, workdir, servers)
    try:
        for spec in suite.specs:
            t0 = time.monotonic()
            servers[spec.name] = s = spec.start(workdir)
            rec["servers"][spec.name] = {"label": spec.label, "role": spec.role,
                                         "cmd": s.cmd, "pid": s.pid,
                                         "info": {k: v for k, v in s.info.items()
                                                  if k != "config"},
                                         "config": s.info.get("config")}
            if suite.setup and spec.role != T.UPSTREAM:
                rec["servers"][spec.name]["setup"] = suite.setup(ctx, s)
            say(f"{suite.name}: started {spec.name} ({spec.label}) and warmed it in "
                f"{time.monotonic() - t0:.1f} s")
        for rep in range(opts.reps):
            ctx.rep = rep
            for w in suite.workloads:
                for tname in w.targets:
                    rec["results"].append(_measure(ctx, suite, w, tname, rep, say))
        for name, s in servers.items():
            if s.info.get("log"):
                rec["servers"][name]["memory_kib"] = s.status()
    except Exception as e:  # noqa: BLE001 - a suite that cannot start is reported, not fatal
        rec["error"] = f"{type(e).__name__}: {e}"
        say(f"{suite.name}: ERROR, suite abandoned: {rec['error'][:500]}")
    finally:
        T.stop_all(list(servers.values()))
        for name, s in servers.items():
            if s.info.get("log"):
                final = W.final_stats(s.info["log"])
                if final:
                    rec["servers"][name]["final_stats"] = {
                        k: final.get(k) for k in ("hits", "misses", "hit_ratio",
                                                  "writeback_bytes", "writeback_clusters",
                                                  "writeback_mean_cluster_bufs", "block_size",
                                                  "bd_wait_blocks", "recycled",
                                                  "writeback_errors")}
            rec["servers"].get(name, {})["exit_status"] = s.proc.returncode
        if keep:
            say(f"{suite.name}: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rec


def _measure(ctx: Ctx, suite: Suite, w: Workload, tname: str, rep: int,
             say: Progress) -> dict[str, Any]:
    server = ctx.servers[tname]
    row: dict[str, Any] = {"workload": w.name, "target": tname, "rep": rep, "metrics": {},
                           "error": None}
    t0 = time.monotonic()
    try:
        if not server.alive():
            raise W.WorkloadError(f"the server exited ({server.proc.returncode}): "
                                  f"{server.stderr()[-500:]}")
        row["metrics"] = w.run(ctx, server)
    except (W.WorkloadError, T.TargetError, OSError) as e:
        row["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - nbd.Error and friends: record, go on
        row["error"] = f"{type(e).__name__}: {e}"
    row["elapsed_s"] = round(time.monotonic() - t0, 2)
    head = (f"{fmt(row['metrics'].get(w.metric))} {w.unit}" if not row["error"]
            else f"ERROR {row['error'][:200]}")
    say(f"{suite.name}: rep {rep + 1}/{ctx.opts.reps} {w.name} on {tname}: {head}")
    return row


# --------------------------------------------------------------------------- analysis

def medians(suite_recs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(suite, workload, target) -> {metric: median over the successful reps}."""
    samples: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for rec in suite_recs:
        for r in rec["results"]:
            if r["error"]:
                continue
            key = (rec["suite"], r["workload"], r["target"])
            for m, v in r["metrics"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    samples.setdefault(key, {}).setdefault(m, []).append(v)
    return {k: {m: statistics.median(vs) for m, vs in ms.items()} for k, ms in samples.items()}


def advantage(nbdcache: float | None, peer: float | None, better: str) -> float | None:
    """How many times better nbdcache did than the peer (>1: nbdcache better)."""
    if not nbdcache or not peer:
        return None
    return nbdcache / peer if better == "higher" else peer / nbdcache


def ratios(suites: list[Suite], med: dict) -> list[dict[str, Any]]:
    out = []
    for s in suites:
        roles = {t.name: t.role for t in s.specs}
        for w in s.workloads:
            for n in (t for t in w.targets if roles.get(t) == T.NBDCACHE):
                for p in (t for t in w.targets
                          if roles.get(t) == T.PEER and t not in w.no_ratio):
                    a = med.get((s.name, w.name, n), {}).get(w.metric)
                    b = med.get((s.name, w.name, p), {}).get(w.metric)
                    out.append({"suite": s.name, "workload": w.name, "metric": w.metric,
                                "better": w.better, "nbdcache": n, "peer": p,
                                "ratio": _round(advantage(a, b, w.better))})
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


@dataclasses.dataclass
class Goal:
    text: str
    suite: str
    workloads: tuple[str, ...]
    peer: str | None            # "floor-{sfx}" formats with the model's suffix
    op: str                     # ">=" or "<="
    threshold: float
    measure: Callable[..., tuple[float | None, str]] | None = None


def goals() -> list[Goal]:
    return [
        Goal("4 KiB QD16 hits >= 0.9x the Python floor (same thread model)", "hits",
             ("hit-rand4k-read-qd16", "hit-rand4k-write-qd16"), "floor-{sfx}", ">=", 0.9),
        Goal("4 KiB QD16 hits >= 1.0x the C cache filter", "hits",
             ("hit-rand4k-read-qd16", "hit-rand4k-write-qd16"), "cache-filter", ">=", 1.0),
        Goal("1 MiB hits >= 0.9x the Python floor (same thread model)", "seq",
             ("hit-seq1m-read", "hit-seq1m-write"), "floor-{sfx}", ">=", 0.9),
        Goal("1 ms backend: QD1 random writes >= 10x uncached", "slow-w1ms",
             ("w1ms-randwrite-qd1",), "passthrough", ">=", 10),
        Goal("1 ms backend: flush after a random-write burst >= 5x faster than the cache "
             "filter's", "slow-w1ms", ("w1ms-burst-flush",), "cache-filter", ">=", 5),
        Goal("1 ms backend: a sequential burst's flush time / (dirty bytes / backend "
             "sequential bandwidth) <= 1.2", "slow-w1ms", ("w1ms-seq-flush",), None, "<=", 1.2,
             _seq_flush),
        Goal("1 ms read backend: QD16 random-read misses >= 4x the cache filter's",
             "slow-r1ms", ("r1ms-miss-randread-qd16",), "cache-filter", ">=", 4),
        Goal("2x working set on a 1 ms backend: with swap >= 3x without", "swap",
             ("swap-2x-randread-qd16",), "nbdcache-noswap", ">=", 3),
        Goal("RSS: VmHWM / (cache.ram + 64 MiB) <= 1", "rss", ("rss-vmhwm",), None, "<=",
             1.0, _rss),
    ]


def _seq_flush(med: dict, suite: str, workload: str, target: str) -> tuple[float | None, str]:
    m = med.get((suite, workload, target), {})
    bw = med.get((suite, workload.replace("seq-flush", "backend-seq-bw"), "upstream"),
                 {}).get("mbps")
    if not m or not bw or "flush_s" not in m:
        return None, ""
    ideal = m.get("dirty_mib", 0) * MiB / (bw * 1e6)
    if ideal <= 0:
        return None, "no dirty bytes at the flush"
    return m["flush_s"] / ideal, (f"flush {m['flush_s']:.3f} s, {fmt(m.get('dirty_mib', 0))} "
                                  f"MiB dirty at {fmt(bw)} MB/s: ideal {ideal:.3f} s")


def _rss(med: dict, suite: str, workload: str, target: str) -> tuple[float | None, str]:
    m = med.get((suite, workload, target), {})
    if "vmhwm_mib" not in m:
        return None, ""
    limit = m.get("budget_mib", RSS_RAM // MiB) + RSS_SLACK // MiB
    return m["vmhwm_mib"] / limit, f"VmHWM {m['vmhwm_mib']:g} MiB, limit {limit:g} MiB"


def check_goals(suites: list[Suite], med: dict, skipped: dict[str, str]) -> list[dict]:
    by_name = {s.name: s for s in suites}
    rows = []
    for g in goals():
        s = by_name.get(g.suite)
        subjects = ([t.name for t in s.specs if t.role == T.NBDCACHE] if s else [])
        if g.suite in skipped:
            rows.append(_goal_row(g, "nbdcache", None, None, "SKIP", skipped[g.suite]))
            continue
        if not subjects:
            rows.append(_goal_row(g, "nbdcache", None, None, "—", "not measured in this run"))
            continue
        for wname in g.workloads:
            w = next((x for x in s.workloads if x.name == wname), None)
            for n in subjects:
                if w is None or n not in w.targets:
                    rows.append(_goal_row(g, n, wname, None, "—", "not measured in this run"))
                    continue
                if g.measure:
                    value, note = g.measure(med, g.suite, wname, n)
                else:
                    peer = g.peer.format(sfx=n.split("nbdcache-", 1)[-1]) if g.peer else ""
                    mine = med.get((g.suite, wname, n), {}).get(w.metric)
                    theirs = med.get((g.suite, wname, peer), {}).get(w.metric)
                    value = advantage(mine, theirs, w.better)
                    note = (f"vs {peer}" if value is not None else
                            f"{n if mine is None else peer} not measured in this run")
                if value is None:
                    rows.append(_goal_row(g, n, wname, None, "—", note or "not measured"))
                    continue
                ok = value >= g.threshold if g.op == ">=" else value <= g.threshold
                rows.append(_goal_row(g, n, wname, value, "PASS" if ok else "MISS", note))
    return rows


def _goal_row(g: Goal, subject: str, workload: str | None, value: float | None, verdict: str,
              note: str) -> dict[str, Any]:
    return {"goal": g.text, "suite": g.suite, "workload": workload, "subject": subject,
            "value": _round(value), "threshold": f"{g.op} {g.threshold:g}",
            "verdict": verdict, "note": note}


# --------------------------------------------------------------------------- reporting

def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def thread_models(suites: list[Suite], med: dict) -> list[str]:
    """serialize_requests against parallel, workload by workload: the figures the default
    thread model (server.thread_model) is chosen from."""
    a, b = "nbdcache-parallel", "nbdcache-serialize"
    rows = []
    for s in suites:
        for w in s.workloads:
            x = med.get((s.name, w.name, a), {}).get(w.metric)
            y = med.get((s.name, w.name, b), {}).get(w.metric)
            if x and y:
                rows.append([w.name, f"{fmt(x)} {w.unit}", f"{fmt(y)} {w.unit}",
                             fmt_ratio(advantage(y, x, w.better))])
    if not rows:
        return []
    return ["", "## Thread model", "",
            "nbdcache under `server.thread_model: serialize_requests` against `parallel` "
            "(nbdkit --threads as in the server commands below); above 1: serialize_requests "
            "did better.", ""] + table(["workload", "parallel", "serialize_requests",
                                        "serialize ÷ parallel"], rows)


def report_tables(suites: list[Suite], recs: list[dict], med: dict, rats: list[dict],
                  goal_rows: list[dict], opts: Options) -> list[str]:
    lines = ["## Goals", "",
             "Ratios are medians of nbdcache over medians of the peer, measured in this same "
             "run, oriented so that above 1 means nbdcache did better.", ""]
    lines += table(["goal", "workload", "nbdcache target", "measured", "goal", "verdict",
                    "note"],
                   [[r["goal"], r["workload"] or "—", r["subject"],
                     fmt_ratio(r["value"]),
                     r["threshold"], r["verdict"], r["note"]] for r in goal_rows])
    lines += thread_models(suites, med)
    rec_by = {r["suite"]: r for r in recs}
    for s in suites:
        rec = rec_by.get(s.name, {})
        lines += ["", f"## {s.title} (`{s.name}`)", ""]
        if rec.get("skipped"):
            lines += [f"Skipped: {rec['skipped']}."]
            continue
        names = [t.name for t in s.specs if any(t.name in w.targets for w in s.workloads)]
        lines += [f"Medians of {opts.reps} run(s)" + (f" of {opts.runtime:g} s" if opts.runtime
                                                      else "") + ".", ""]
        rows = []
        for w in s.workloads:
            rows.append([f"{w.name} ({w.unit}, {w.better} is better)"] +
                        [fmt(med.get((s.name, w.name, t), {}).get(w.metric))
                         if t in w.targets else "" for t in names])
        lines += table(["workload"] + names, rows)
        srats = [r for r in rats if r["suite"] == s.name]
        peers = sorted({r["peer"] for r in srats}, key=names.index)
        if srats:
            lines += ["", "nbdcache's advantage over each peer (×, above 1: nbdcache better):", ""]
            rows = []
            for w in s.workloads:
                for n in sorted({r["nbdcache"] for r in srats if r["workload"] == w.name},
                                key=names.index):
                    got = {r["peer"]: r["ratio"] for r in srats
                           if r["workload"] == w.name and r["nbdcache"] == n}
                    rows.append([w.name, n] + [fmt_ratio(got.get(p)) for p in peers])
            lines += table(["workload", "nbdcache"] + peers, rows)
        detail_rows = []
        for w in s.workloads:
            for t in w.targets:
                m = med.get((s.name, w.name, t), {})
                shown = [f"{k} {fmt(m[k])}" for k in w.details if k in m]
                if shown:
                    detail_rows.append([w.name, t, ", ".join(shown)])
        if detail_rows:
            lines += ["", "Details (medians):", ""] + table(["workload", "target", "figures"],
                                                            detail_rows)
        if rec.get("error"):
            lines += ["", f"The suite stopped early: {rec['error'][:500]}"]
        errors = [r for r in rec.get("results", []) if r["error"]]
        if errors:
            lines += ["", "Failed measurements:", ""]
            lines += [f"- {r['workload']} on {r['target']} (rep {r['rep'] + 1}): "
                      f"{r['error'][:300]}" for r in errors]
        ends = [_server_summary(n, sv) for n, sv in rec.get("servers", {}).items()
                if sv.get("role") != T.UPSTREAM and (sv.get("memory_kib") or sv.get("final_stats"))]
        if ends:
            lines += ["", "nbdcache servers over the whole suite (VmHWM; final `stats` event):",
                      ""] + [f"- {e}" for e in ends]
    return lines


def _server_summary(name: str, sv: dict[str, Any]) -> str:
    parts = []
    if sv.get("memory_kib"):
        parts.append(f"VmHWM {sv['memory_kib'].get('VmHWM', 0) / KiB:.0f} MiB with cache.ram "
                     f"{sv['info'].get('ram', 0) // MiB} MiB")
    f = sv.get("final_stats") or {}
    if f.get("hits") or f.get("misses"):
        parts.append(f"hit ratio {fmt(f.get('hit_ratio'))}, {f.get('misses')} misses")
        if f.get("writeback_clusters"):
            parts.append(f"write-back {(f.get('writeback_bytes') or 0) / MiB:.0f} MiB in "
                         f"{f['writeback_clusters']} clusters of "
                         f"{fmt(f.get('writeback_mean_cluster_bufs'))} buffers of "
                         f"{(f.get('block_size') or 0) // KiB} KiB")
    return f"{name}: " + "; ".join(parts)


def _version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not found"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * KiB
    except (OSError, ValueError):
        pass
    try:
        import nbd
        libnbd = nbd.NBD().get_version()
    except Exception:  # noqa: BLE001 - only for the description
        libnbd = "not found"
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "memory_gib": round(mem / GiB, 1),
        "kernel": platform.release(), "nbdkit": _version(["nbdkit", "--version"]),
        "fio": _version(["fio", "--version"]),
        "qemu": _version(["qemu-system-x86_64", "--version"]), "libnbd": libnbd,
        "python": platform.python_version(),
        "git": commit + (" (with uncommitted changes)" if dirty else ""),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(doc: dict[str, Any], suites: list[Suite], tables: list[str]) -> str:
    m = doc["machine"]
    o = doc["options"]
    lines = ["# Benchmarks", "",
             f"{'Quick run' if o['quick'] else 'Run'} of {m['date']}: medians of {o['reps']} "
             f"repetition(s) of {o['runtime']:g} s per measurement; every ratio compares "
             "figures measured in this same run.  What each workload measures and how ratios "
             "are computed: [bench/README.md](../bench/README.md)."
             if not o["quick"] else
             f"Quick run of {m['date']} (1 repetition of {o['runtime']:g} s): a smoke check "
             "of the harness on a shared machine, not figures to quote.", "",
             "## Machine", "",
             f"- CPUs: {m['nproc']} × {m['cpu']}", f"- Memory: {m['memory_gib']} GiB",
             f"- Kernel: {m['kernel']}", f"- nbdkit: {m['nbdkit']}", f"- fio: {m['fio']}",
             f"- QEMU: {m['qemu']}", f"- libnbd: {m['libnbd']}, Python {m['python']}",
             f"- nbdcache: git {m['git']}", "",
             "## Commands", "",
             "`make bench` runs `.venv/bin/python bench/run.py --guest` (3 repetitions of "
             "10 s); this report came from:", "", "```", doc["command"], "```", ""]
    lines += tables
    analysis = Path(__file__).with_name("analysis.md")
    if analysis.exists() and not o["quick"]:
        lines += ["", analysis.read_text().rstrip()]
    lines += ["", "## Servers", "",
              "Each suite starts its servers in a fresh temporary directory (`$WORK`), from the "
              "repository's top directory.  The Python targets (nbdcache, the floor) run under "
              "`nbdcache.cli.plugin_env()` (PYTHONPATH = the source tree, PYTHONEXECUTABLE = "
              "the virtualenv's python); the C targets with TMPDIR=$WORK (where the cache "
              "filter keeps its cache file).", ""]
    for rec in doc["suites"]:
        if rec.get("skipped") or not rec["servers"]:
            continue
        lines.append(f"- `{rec['suite']}`:")
        for name, sv in rec["servers"].items():
            cmd = " ".join(sv["cmd"])
            cmd = _unwork(cmd, sv)
            lines.append(f"  - {name}: `{cmd}`")
            if sv.get("config"):
                cfg = ", ".join(f"{k}={_unwork(str(v), sv)}" for k, v in sv["config"].items())
                lines.append(f"    (config: {cfg})")
    lines += ["", "## Client commands", "",
              "`$URI` is the target's `nbd+unix:///?socket=...` URI, `$RUNTIME` the seconds "
              "per measurement, `$REP` the repetition's number (1, 2, ...).  Each fio job "
              "writes its JSON with `--output=FILE`.", ""]
    for s in suites:
        for w in s.workloads:
            lines.append(f"- `{w.name}`: `{w.command}`")
    return "\n".join(lines) + "\n"


def _relative(path: str) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def _unwork(text: str, server: dict[str, Any]) -> str:
    """``text`` with the suite's work directory as $WORK and the tree's paths relative."""
    cmd = server.get("cmd", [])
    for i, a in enumerate(cmd):
        if a == "--unix" and i + 1 < len(cmd):
            text = text.replace(str(Path(cmd[i + 1]).parent), "$WORK")
    return text.replace(str(ROOT) + "/", "")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description="nbdcache benchmarks: "
                                "medians and ratios against its peers, from one run.")
    p.add_argument("--quick", action="store_true", help="1 repetition of 2 s per point, smaller "
                   "bursts; the table goes to bench/results/quick.md")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help="run only these suites or workloads (glob patterns, e.g. hits, "
                   "'hit-rand4k-*', w1ms-burst-flush)")
    p.add_argument("--targets", nargs="+", default=[], metavar="NAME",
                   help="start only these targets (glob patterns, e.g. 'nbdcache-*' "
                   "cache-filter); upstreams always start")
    p.add_argument("--reps", type=int, metavar="N",
                   help="repetitions of each measurement (default 3; --quick: 1)")
    p.add_argument("--runtime", type=float, metavar="S",
                   help="seconds per time-based measurement (default 10; --quick: 2)")
    p.add_argument("--guest", action="store_true", help="also run the guest's fio through QEMU "
                   "on nbdcache and the cache filter (boots one guest per target; not in "
                   "--quick)")
    p.add_argument("--thread-models", nargs="+", default=list(MODEL_SUFFIX), metavar="MODEL",
                   choices=list(MODEL_SUFFIX), help="thread models of nbdcache and the floor "
                   "to measure (default: parallel serialize_requests)")
    p.add_argument("--threads", type=int, metavar="N", help="nbdkit --threads for nbdcache "
                   "and the floor (default: server.threads from the tunables table)")
    p.add_argument("--list", action="store_true", help="list suites, workloads and targets")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    p.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.runtime = args.runtime or (2.0 if args.quick else 10.0)
    if args.reps < 1 or args.runtime <= 0:
        p.error("--reps and --runtime must be positive")
    if args.quick and args.guest:
        p.error("--guest is not part of --quick")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(reps=args.reps, runtime=args.runtime, quick=args.quick,
                   models=args.thread_models, threads=args.threads, guest=args.guest)
    suites = W.select(W.plan(opts), args.only, args.targets)
    if args.list:
        for s in suites:
            print(f"{s.name}: {s.title}" + (f" [SKIP: {s.skip}]" if s.skip else ""))
            print("  targets: " + ", ".join(t.name for t in s.specs))
            for w in s.workloads:
                print(f"  {w.name}: {w.about} (on {', '.join(w.targets)})")
        return 0
    if not suites:
        print("bench: nothing matches --only/--targets; see --list", file=sys.stderr)
        return 2
    for tool in ("nbdkit", "fio"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (run `make setup`)", file=sys.stderr)
            return 2
    say = Progress()
    n = sum(len(w.targets) for s in suites if not s.skip for w in s.workloads) * opts.reps
    say(f"{n} measurements in {len(suites)} suite(s), {opts.reps} rep(s) of {opts.runtime:g} s "
        f"(time-based ones); the 2-core machine is shared, so expect noise")
    command = " ".join([_relative(sys.executable), "bench/run.py",
                        *(argv if argv is not None else sys.argv[1:])])
    started = dt.datetime.now(dt.timezone.utc)
    recs = []
    for s in suites:
        recs.append(run_suite(s, opts, say, args.keep))
    med = medians(recs)
    rats = ratios(suites, med)
    skipped = {r["suite"]: r["skipped"] for r in recs if r.get("skipped")}
    goal_rows = check_goals(suites, med, skipped)
    tables = report_tables(suites, recs, med, rats, goal_rows, opts)
    doc = {
        "started": started.isoformat(), "command": command.strip(),
        "options": dataclasses.asdict(opts), "machine": machine(),
        "suites": recs,
        "medians": [{"suite": k[0], "workload": k[1], "target": k[2], "metrics": v}
                    for k, v in med.items()],
        "ratios": rats, "goals": goal_rows,
        "workloads": [{"suite": s.name, "name": w.name, "metric": w.metric, "unit": w.unit,
                       "better": w.better, "about": w.about, "command": w.command}
                      for s in suites for w in s.workloads],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out_json = args.results_dir / f"{stamp}.json"
    out_json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    out_md = args.results_dir / "quick.md" if args.quick else args.docs
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(markdown(doc, suites, tables))
    print("\n".join(tables), flush=True)
    say(f"raw results: {out_json}; table: {out_md}")
    failed = sum(1 for r in recs for x in r["results"] if x["error"]) + \
        sum(1 for r in recs if r.get("error"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
