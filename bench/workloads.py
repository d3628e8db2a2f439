"""What the benchmarks do to a server, and the plan of which workload runs where.

Theory of operation
-------------------
The first half holds the measurements.  Each drives one server through its
NBD URI and returns plain figures (a dict of numbers); none knows which target
it talks to, and none starts or stops a server (``bench/targets.py`` does).

* :func:`fio` runs one fio job with the ``nbd`` engine (``--ioengine=nbd
  --uri=...``; the JSON goes to a file because the engine prints a line on
  stdout) and returns IOPS, MB/s and latency.  fio issues no flush of its own
  here (``--end_fsync=0``, no ``--fsync``), so a write job measures writes.
* :func:`burst_then_flush` writes a burst from Python with libnbd's aio calls
  (a raw aio loop, ~60k 4 KiB writes/s against ``nbdkit memory`` here, so the
  burst's own time is only indicative for the fastest targets), then times one
  ``flush()`` on the same connection: the time until the burst is durable.
* :class:`RequestLog` counts the writes an upstream's ``--filter=log`` saw
  between two offsets of its log: how many bytes each cache still had to
  write when the flush began, and in what size of backend writes.
* :func:`final_stats` reads the final ``stats`` event of nbdcache's JSON log.

The second half is the plan: :class:`Suite` (targets started together in one
work directory, a warm-up, workloads) and :class:`Workload` (a headline
metric, whether higher or lower is better, the targets it runs on, and a
``run(ctx, server)``).  :func:`plan` lists the suites; :func:`select` applies
``--only`` and ``--targets``.  ``bench/run.py`` runs them and reports.

Everything blocks until done and has a deadline (fio runs under a subprocess
timeout, a burst under its own); libnbd connections are closed before
returning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets as T  # noqa: E402

KiB = 1024
MiB = 1024 * KiB


class WorkloadError(RuntimeError):
    """A measurement failed (fio error, NBD error, timeout); the message says how."""


# --------------------------------------------------------------------------- fio

def fio_command(uri: str, *, name: str, rw: str, bs: int, iodepth: int, size: int,
                offset: int = 0, runtime: float | None = None, output: Path | None = None,
                seed: int | str = 1) -> list[str]:
    """The fio argv for one job.  ``runtime`` makes it time-based over the region
    [offset, offset+size); without it the region is covered once.  ``seed`` fixes the
    random offsets: the same for every target of a repetition, new for the next."""
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", f"--offset={offset}",
           "--numjobs=1", "--end_fsync=0", f"--randseed={seed}", "--output-format=json"]
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={runtime:g}"]
    if output is not None:
        cmd.append(f"--output={output}")
    return cmd


def fio(uri: str, *, workdir: Path, name: str, rw: str, bs: int, iodepth: int, size: int,
        offset: int = 0, runtime: float | None = None, timeout: float | None = None,
        seed: int = 1) -> dict[str, Any]:
    """Run one fio job; return iops, mbps (MB/s, 10^6), lat_mean_us, lat_p99_us, seconds.

    Blocks for the job (``runtime`` seconds, or one pass over the region);
    raises WorkloadError if fio fails or overruns ``timeout``.
    """
    out = workdir / f"fio-{name}.json"
    cmd = fio_command(uri, name=name, rw=rw, bs=bs, iodepth=iodepth, size=size,
                      offset=offset, runtime=runtime, output=out, seed=seed)
    limit = timeout or ((runtime or 0) + 120)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=limit)
    except subprocess.TimeoutExpired:
        raise WorkloadError(f"fio {name} did not finish within {limit:g} s") from None
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise WorkloadError(f"fio {name} exited {p.returncode}: {(p.stderr or p.stdout)[-800:]}")
    try:
        job = json.loads(out.read_text())["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise WorkloadError(f"fio {name}: no JSON result ({e})") from None
    if job.get("error"):
        raise WorkloadError(f"fio {name}: job error {job['error']}")
    side = job["write"] if rw in ("write", "randwrite") else job["read"]
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    return {
        "iops": round(side["iops"], 1),
        "mbps": round(side["bw_bytes"] / 1e6, 2),
        "lat_mean_us": round(clat.get("mean", 0.0) / 1000, 1),
        "lat_p99_us": round(pct.get("99.000000", 0) / 1000, 1),
        "io_mib": round(side["io_bytes"] / MiB, 1),
        "seconds": round(seconds, 2),
    }


# --------------------------------------------------------------------------- libnbd

@contextlib.contextmanager
def connection(uri: str) -> Iterator[Any]:
    """A libnbd handle connected to ``uri``, shut down on exit."""
    import nbd
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        raise WorkloadError(f"cannot connect to {uri}: {e.string}") from None
    try:
        yield h
    finally:
        try:
            h.shutdown()
        except nbd.Error:
            pass
        del h                       # libnbd closes the handle when it is collected


def flush(uri: str) -> float:
    """Connect, flush, disconnect; return the flush's seconds (the harness's settle step).
    A server without flush (the Python floor) takes 0 s."""
    import nbd
    with connection(uri) as h:
        if not h.can_flush():
            return 0.0
        t0 = time.monotonic()
        try:
            h.flush()
        except nbd.Error as e:
            raise WorkloadError(f"flush failed: {e.string}") from None
        return time.monotonic() - t0


def random_offsets(region: int, bs: int, *, offset: int = 0, seed: int = 1) -> list[int]:
    """Every ``bs`` block of [offset, offset+region) once, in a seeded random order."""
    offs = [offset + i * bs for i in range(region // bs)]
    random.Random(seed).shuffle(offs)
    return offs


def sequential_offsets(region: int, bs: int, *, offset: int = 0) -> list[int]:
    return [offset + i * bs for i in range(region // bs)]


def aio_writes(h: Any, offsets: list[int], bs: int, qd: int, timeout: float = 600) -> float:
    """Write ``bs`` bytes at each offset, ``qd`` in flight; return seconds.

    A raw aio loop (submit while below ``qd``, ``poll``, completions retire
    themselves).  Raises WorkloadError on the first failed write or overrun.
    """
    import nbd
    buf = nbd.Buffer.from_bytearray(bytearray(random.Random(7).randbytes(bs)))
    done = [0]
    errors: list[int] = []

    def completed(err: Any) -> int:
        code = getattr(err, "value", err)
        if code:
            errors.append(code)
        done[0] += 1
        return 1

    n, i = len(offsets), 0
    t0 = time.monotonic()
    deadline = t0 + timeout
    while done[0] < n:
        while i < n and h.aio_in_flight() < qd:
            h.aio_pwrite(buf, offsets[i], completion=completed)
            i += 1
        h.poll(1000)
        if errors:
            raise WorkloadError(f"a burst write failed with errno {errors[0]}")
        if time.monotonic() > deadline:
            raise WorkloadError(f"the burst did not finish within {timeout:g} s")
    return time.monotonic() - t0


def burst_then_flush(uri: str, offsets: list[int], bs: int, qd: int,
                     log: RequestLog | None = None) -> dict[str, Any]:
    """Write the burst, then time one flush on the same connection.

    Returns burst_s, flush_s, total_s and burst_mib; with the upstream's
    request ``log``, also what reached the backend during the burst
    (early_mib) and during the flush (dirty_mib: what the cache still held),
    and the number and mean size of those backend writes.
    """
    marks = []
    with connection(uri) as h:
        marks.append(log.mark() if log else 0)
        burst_s = aio_writes(h, offsets, bs, qd)
        marks.append(log.mark() if log else 0)
        t0 = time.monotonic()
        if h.can_flush():
            h.flush()
        flush_s = time.monotonic() - t0
        marks.append(log.mark() if log else 0)
    size = len(offsets) * bs
    out: dict[str, Any] = {"burst_s": round(burst_s, 3), "flush_s": round(flush_s, 4),
                           "total_s": round(burst_s + flush_s, 3),
                           "burst_mib": round(size / MiB, 1)}
    if log:
        n_early, b_early = log.writes(marks[0], marks[1])
        n_flush, b_flush = log.writes(marks[1], marks[2])
        n, b = n_early + n_flush, b_early + b_flush
        out.update({"early_mib": round(b_early / MiB, 2), "dirty_mib": round(b_flush / MiB, 2),
                    "backend_writes": n,
                    "backend_write_mean_kib": round(b / n / KiB, 1) if n else 0.0})
    return out


# --------------------------------------------------------------------------- counters

_WRITE_RE = re.compile(rb" Write id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) ")


class RequestLog:
    """The request log of an upstream's ``--filter=log``: writes between two marks."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def writes(self, start: int, end: int | None = None) -> tuple[int, int]:
        """(number, bytes) of the writes logged between marks ``start`` and ``end``.

        The log filter writes a request's line when the request arrives, so a
        write in flight at a mark counts before it."""
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
        sizes = [int(m.group(2), 16) for m in _WRITE_RE.finditer(data)]
        return len(sizes), sum(sizes)


def final_stats(log_path: str | Path) -> dict[str, Any] | None:
    """The last ``stats`` event with ``final`` true in nbdcache's JSON log, if any."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    final = None
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "stats" and e.get("final"):
            final = e
    return final


# --------------------------------------------------------------------------- the guest

def guest_fio(socket_path: str, *, workdir: Path, runtime: float, size_mb: int = 128,
              timeout: float = 900) -> dict[str, Any]:
    """The guest's ``fio`` workload (vm-images/init) on the server at ``socket_path``.

    Returns the 4 KiB random mix IOPS (read + write, QD32), the 1 MiB
    sequential read and verified-write MiB/s (fio's terse figures as the guest
    reports them), and the run's seconds.
    """
    from nbdcache.vm import GuestError, run_guest
    try:
        run = run_guest(socket_path, "fio", timeout=timeout, workdir=workdir,
                        params={"runtime": int(max(1, runtime)), "size_mb": size_mb})
    except GuestError as e:
        raise WorkloadError(f"guest fio failed: {e.reason}") from None
    r = run.result

    def get(job: str, key: str) -> float:
        return float(r.get(job, {}).get(key, 0) or 0)
    return {
        "rand4k_iops": get("rand4k", "read_iops") + get("rand4k", "write_iops"),
        "seq1m_read_mibs": get("seq1m_read", "read_mbs"),
        "seq1m_write_mibs": get("seq1m_verify", "write_mbs"),
        "seconds": round(run.seconds, 1),
    }


# =========================================================================== the plan
#
# Which workload runs on which target.  A suite's targets are started together
# in one work directory; its workloads name the targets they run on.

KiB4 = 4 * KiB
GiB = 1024 * MiB
HIT_DISK = 256 * MiB        # hits, sequential: the disk each target serves
WORKING_SET = 64 * MiB      # hits, sequential: the region written first, then measured
CACHE_RAM = 256 * MiB       # nbdcache's cache.ram: four times the working set
SLOW_DISK = 1 * GiB         # the slow upstream (nbdkit memory behind --filter=delay)
MISS_DISK = 8 * GiB         # misses: 32x cache.ram, so nearly every random read misses
SWAP_RAM = 64 * MiB         # 2x working set: cache.ram; the working set is twice it
RSS_RAM = 128 * MiB         # RSS: the budget; four times it is written through the cache
BURST_QD = 16               # aio writes in flight during a random burst
# The thread models measured (the floor plugin knows only these two) and target suffixes.
MODEL_SUFFIX = {"parallel": "parallel", "serialize_requests": "serialize"}


@dataclasses.dataclass
class Options:
    reps: int
    runtime: float
    quick: bool
    models: list[str]
    threads: int | None
    guest: bool

    @property
    def burst(self) -> int:
        """Bytes of a burst before a timed flush: 64 MiB, an eighth in a quick run."""
        return 8 * MiB if self.quick else 64 * MiB

    @property
    def randwrite_region(self) -> int:
        """Region of the QD1 random writes on a slow backend (all of it ends dirty)."""
        return 4 * MiB if self.quick else 16 * MiB


@dataclasses.dataclass
class Ctx:
    """What a workload may use: the options, the suite's directory and servers."""

    opts: Options
    workdir: Path
    servers: dict[str, T.Server]
    rep: int = 0


Run = Callable[[Ctx, T.Server], dict[str, Any]]


@dataclasses.dataclass
class Workload:
    name: str
    metric: str                  # the headline figure, compared across targets
    unit: str
    better: str                  # "higher" or "lower"
    targets: tuple[str, ...]     # names of the suite's targets it runs on
    run: Run
    about: str
    details: tuple[str, ...] = ()
    command: str = ""            # the client command, for the docs
    no_ratio: tuple[str, ...] = ()   # peers shown but not compared (a different quantity)


@dataclasses.dataclass
class Suite:
    name: str
    title: str
    specs: list[T.TargetSpec]
    workloads: list[Workload]
    setup: Run | None = None     # once per non-upstream target after its start
    skip: str = ""               # why the suite cannot run here


def fio_workload(name: str, rw: str, bs: int, qd: int, region: int, targets: tuple[str, ...],
                 about: str, *, offset: int = 0, prewarm: bool = True) -> Workload:
    """A time-based fio job over [offset, offset+region); IOPS (4K) or MB/s (1M).

    Untimed around it: with ``prewarm`` a sequential read of the region first
    (idle page cache is paged out after ~30 s); after writes, a flush, so that
    no write-back runs while the next target is measured."""
    metric, unit = ("iops", "IOPS") if bs < MiB else ("mbps", "MB/s")

    def run(ctx: Ctx, server: T.Server) -> dict[str, Any]:
        if prewarm:
            fio(server.uri, workdir=ctx.workdir, name=f"prewarm-{server.name}", rw="read",
                bs=MiB, iodepth=4, size=region, offset=offset)
        out = fio(server.uri, workdir=ctx.workdir, name=f"{name}-{server.name}", rw=rw, bs=bs,
                  iodepth=qd, size=region, offset=offset, runtime=ctx.opts.runtime,
                  seed=ctx.rep + 1)
        if rw in ("write", "randwrite"):
            out["settle_flush_s"] = round(flush(server.uri), 3)
        return out

    cmd = " ".join(fio_command("$URI", name=name, rw=rw, bs=bs, iodepth=qd, size=region,
                               offset=offset, runtime=1, seed="$REP")).replace(
                                   "--runtime=1", "--runtime=$RUNTIME")
    return Workload(name, metric, unit, "higher", targets, run, about,
                    ("lat_mean_us", "lat_p99_us"), cmd)


def _upstream_log(ctx: Ctx) -> RequestLog | None:
    up = ctx.servers.get("upstream")
    return RequestLog(up.info["logfile"]) if up and up.info.get("logfile") else None


def burst_workload(name: str, order: str, bs: int, qd: int, region: int,
                   targets: tuple[str, ...], about: str) -> Workload:
    """A burst of writes from libnbd aio, then one timed flush; headline flush_s."""
    def run(ctx: Ctx, server: T.Server) -> dict[str, Any]:
        offsets = (random_offsets(region, bs, seed=ctx.rep + 1) if order == "random"
                   else sequential_offsets(region, bs))
        return burst_then_flush(server.uri, offsets, bs, qd, log=_upstream_log(ctx))

    cmd = (f"libnbd aio_pwrite: {region // MiB} MiB of {bs // KiB} KiB writes at {order} "
           f"offsets, {qd} in flight; then h.flush(), timed")
    # The passthrough has nothing to flush: its writes reached the backend during the
    # burst, so its flush time is not comparable (its total_s is, in the details).
    return Workload(name, "flush_s", "s", "lower", targets, run, about,
                    ("burst_s", "total_s", "early_mib", "dirty_mib", "backend_writes",
                     "backend_write_mean_kib"), cmd, no_ratio=("passthrough",))


def backend_bw_workload(name: str, region: int) -> Workload:
    """The upstream's own sequential write bandwidth, written the way nbdcache writes
    back by default: cache.max_io (1 MiB) writes, backend.connections (4) in flight."""
    bs = T.configmod.BY_KEY["cache.max_io"].default
    qd = T.configmod.BY_KEY["backend.connections"].default

    def run(ctx: Ctx, server: T.Server) -> dict[str, Any]:
        return fio(server.uri, workdir=ctx.workdir, name=f"{name}-r{ctx.rep}", rw="write",
                   bs=bs, iodepth=qd, size=region)
    cmd = " ".join(fio_command("$UPSTREAM_URI", name=name, rw="write", bs=bs, iodepth=qd,
                               size=region))
    return Workload(name, "mbps", "MB/s", "higher", ("upstream",), run,
                    f"the slow backend's sequential write bandwidth ({bs // MiB} MiB writes, "
                    f"{qd} in flight), measured on the upstream itself: the denominator of "
                    "the sequential-flush goal", (), cmd)


def warm_write(region: int) -> Run:
    """Setup: write the working set once (1 MiB, QD4), then flush."""
    def setup(ctx: Ctx, server: T.Server) -> dict[str, Any]:
        fio(server.uri, workdir=ctx.workdir, name=f"warm-{server.name}", rw="write", bs=MiB,
            iodepth=4, size=region)
        return {"warm_flush_s": flush(server.uri)}
    return setup


def connect_once(ctx: Ctx, server: T.Server) -> dict[str, Any]:
    """Setup: one connection and flush, so the first measurement pays no start-up cost."""
    return {"warm_flush_s": flush(server.uri)}


def _models(opts: Options) -> list[tuple[str, str]]:
    return [(m, MODEL_SUFFIX[m]) for m in opts.models]


def _sz(n: int) -> str:
    return T.configmod.format_size(n)


def hits_suite(opts: Options, name: str, backend: str) -> Suite:
    """4 KiB random (``hits``, memory backend) or 1 MiB sequential (``seq``, file
    backend) on a cached working set, against the floor and the C servers."""
    specs: list[T.TargetSpec] = [
        T.nbdcache(f"nbdcache-{sfx}", {"backend.type": backend, "backend.size": _sz(HIT_DISK)},
                   thread_model=model, ram=CACHE_RAM, threads=opts.threads)
        for model, sfx in _models(opts)]
    specs += [T.floor(f"floor-{sfx}", thread_model=model, size=HIT_DISK, threads=opts.threads)
              for model, sfx in _models(opts)]
    specs += [T.nbdkit_memory("nbdkit-memory", size=HIT_DISK),
              T.nbdkit_file("nbdkit-file", size=HIT_DISK),
              T.cache_filter_file("cache-filter", size=HIT_DISK)]
    every = tuple(s.name for s in specs)
    ws = WORKING_SET
    if name == "hits":
        wl = [fio_workload(f"hit-rand4k-{rw}-qd{qd}", f"rand{rw}", KiB4, qd, ws, every,
                           f"4 KiB random {rw}s at QD{qd} over the {ws // MiB} MiB working set, "
                           "all of it cached (written first)")
              for rw in ("read", "write") for qd in (1, 16)]
        title = "Cache hits, 4 KiB random (nbdcache: memory backend)"
    else:
        wl = [fio_workload(f"hit-seq1m-{rw}", rw, MiB, 4, ws, every,
                           f"1 MiB sequential {rw}s at QD4 over the {ws // MiB} MiB working "
                           "set, all of it cached (written first)") for rw in ("read", "write")]
        title = "Cache hits, 1 MiB sequential (nbdcache: file backend)"
    return Suite(name, title, specs, wl, setup=warm_write(ws))


def _cached_over(opts: Options) -> list[T.TargetSpec]:
    specs: list[T.TargetSpec] = [
        T.nbdcache_over(f"nbdcache-{sfx}", "upstream", thread_model=model, ram=CACHE_RAM,
                        threads=opts.threads) for model, sfx in _models(opts)]
    return specs + [T.cache_filter_over("cache-filter", "upstream"),
                    T.passthrough_over("passthrough", "upstream")]


def slow_write_suite(opts: Options, delay_ms: int) -> Suite:
    """A backend that takes ``delay_ms`` per write: write-back, bursts, flushes."""
    specs = [T.upstream("upstream", size=SLOW_DISK, delay_write=f"{delay_ms}ms")]
    specs += _cached_over(opts)
    cached = tuple(s.name for s in specs if s.role != T.UPSTREAM)
    burst, region, pre = opts.burst, opts.randwrite_region, f"w{delay_ms}ms"
    wl = [
        fio_workload(f"{pre}-randwrite-qd1", "randwrite", KiB4, 1, region, cached,
                     f"4 KiB random writes at QD1 over {region // MiB} MiB: write-back "
                     "against the uncached path", offset=512 * MiB, prewarm=False),
        burst_workload(f"{pre}-burst-flush", "random", KiB4, BURST_QD, burst, cached,
                       f"{burst // MiB} MiB of 4 KiB writes, each block once in random order, "
                       f"{BURST_QD} in flight, then one timed flush"),
        backend_bw_workload(f"{pre}-backend-seq-bw", burst),
        burst_workload(f"{pre}-seq-flush", "sequential", MiB, 4, burst, cached,
                       f"{burst // MiB} MiB of 1 MiB sequential writes, 4 in flight, then one "
                       "timed flush, against dirty bytes / the backend's sequential bandwidth"),
    ]
    return Suite(f"slow-{pre}", f"Slow backend: {delay_ms} ms per write", specs, wl,
                 setup=connect_once)


def slow_read_suite(opts: Options) -> Suite:
    """A backend that takes 1 ms per read: random reads that nearly all miss."""
    specs = [T.upstream("upstream", size=MISS_DISK, delay_read="1ms", log=False)]
    specs += _cached_over(opts)
    cached = tuple(s.name for s in specs if s.role != T.UPSTREAM)
    wl = [fio_workload("r1ms-miss-randread-qd16", "randread", KiB4, 16, MISS_DISK, cached,
                       f"4 KiB random reads at QD16 over {MISS_DISK // GiB} GiB (32x cache.ram): "
                       "cache misses, which nbdcache serves in parallel", prewarm=False)]
    return Suite("slow-r1ms", "Slow backend: 1 ms per read, cache misses", specs, wl,
                 setup=connect_once)


def swap_suite(opts: Options) -> Suite:
    """Twice cache.ram of working set on a 1 ms backend, without and with swap."""
    ws = 2 * SWAP_RAM
    skip = "" if T.swap_available() else \
        "swap not available (nbdcache.config has no swap.devices key yet)"
    specs: list[T.TargetSpec] = [T.upstream("upstream", size=SLOW_DISK, delay_read="1ms",
                                            delay_write="1ms", log=False)]
    if not skip:
        noswap = T.nbdcache_over("nbdcache-noswap", "upstream", thread_model="parallel",
                                 ram=SWAP_RAM, threads=opts.threads,
                                 label="nbdcache without swap (NBD backend)")
        noswap.role = T.PEER            # the baseline the swap run is compared with
        specs += [noswap, T.nbdcache_over("nbdcache-swap", "upstream", thread_model="parallel",
                                          ram=SWAP_RAM, threads=opts.threads,
                                          settings=T.swap_settings(4 * ws),
                                          label="nbdcache with a swap file (NBD backend)")]
    wl = [fio_workload("swap-2x-randread-qd16", "randread", KiB4, 16, ws,
                       ("nbdcache-noswap", "nbdcache-swap"),
                       f"4 KiB random reads at QD16 over {ws // MiB} MiB, twice cache.ram, on "
                       "a 1 ms backend: swap keeps what RAM cannot", prewarm=False)]
    return Suite("swap", "Working set twice the RAM cache, with and without swap", specs, wl,
                 setup=warm_write(ws), skip=skip)


def rss_suite(opts: Options) -> Suite:
    """The nbdcache server's peak RSS after four times cache.ram went through it."""
    region = 4 * RSS_RAM
    specs = [T.upstream("upstream", size=SLOW_DISK, log=False),
             T.nbdcache_over("nbdcache-rss", "upstream", thread_model="parallel", ram=RSS_RAM,
                             threads=opts.threads)]

    def run(ctx: Ctx, server: T.Server) -> dict[str, Any]:
        for rw, bs, qd in (("write", MiB, 4), ("randwrite", KiB4, 16), ("randread", KiB4, 16)):
            fio(server.uri, workdir=ctx.workdir, name=f"rss-{rw}", rw=rw, bs=bs, iodepth=qd,
                size=region, runtime=None if rw == "write" else ctx.opts.runtime)
        flush(server.uri)
        st = server.status()
        return {"vmhwm_mib": round(st.get("VmHWM", 0) / KiB, 1),
                "vmrss_mib": round(st.get("VmRSS", 0) / KiB, 1),
                "budget_mib": RSS_RAM // MiB}

    wl = [Workload("rss-vmhwm", "vmhwm_mib", "MiB", "lower", ("nbdcache-rss",), run,
                   f"peak RSS (VmHWM) of the nbdcache server after {region // MiB} MiB of "
                   f"sequential writes through a {RSS_RAM // MiB} MiB cache, then random "
                   "writes and reads over the same region", ("vmrss_mib", "budget_mib"),
                   f"fio --rw=write --bs=1M --iodepth=4 --size={region // MiB}M; then "
                   "--rw=randwrite and --rw=randread --bs=4k --iodepth=16 --time_based; "
                   "VmHWM from /proc/PID/status")]
    return Suite("rss", "Memory: the server's peak RSS against cache.ram", specs, wl,
                 setup=connect_once)


def guest_suite(opts: Options) -> Suite:
    """The guest's fio through QEMU on nbdcache (default thread model) and the cache filter."""
    model = T.configmod.BY_KEY["server.thread_model"].default
    specs = [T.nbdcache("nbdcache", {"backend.type": "file", "backend.size": _sz(SLOW_DISK)},
                        thread_model=model, ram=CACHE_RAM, threads=opts.threads),
             T.cache_filter_file("cache-filter", size=SLOW_DISK)]

    def run(ctx: Ctx, server: T.Server) -> dict[str, Any]:
        return guest_fio(str(server.sock), workdir=ctx.workdir / f"vm-{server.name}",
                         runtime=ctx.opts.runtime)
    wl = [Workload("guest-fio", "rand4k_iops", "IOPS", "higher", ("nbdcache", "cache-filter"),
                   run, "the guest's fio workload (vm-images/init: 4 KiB random mix at QD32, "
                   "verified writes, 1 MiB sequential reads) through QEMU's NBD client",
                   ("seq1m_read_mibs", "seq1m_write_mibs", "seconds"),
                   "nbdcache.vm.run_guest(socket, 'fio', params={runtime: $RUNTIME, "
                   "size_mb: 128})")]
    return Suite("guest", "The guest's fio through QEMU", specs, wl)


def plan(opts: Options) -> list[Suite]:
    suites = [hits_suite(opts, "hits", "memory"), hits_suite(opts, "seq", "file"),
              slow_write_suite(opts, 1), slow_write_suite(opts, 5), slow_read_suite(opts),
              swap_suite(opts), rss_suite(opts)]
    if opts.guest:
        suites.append(guest_suite(opts))
    return suites


def select(suites: list[Suite], only: list[str], target_pats: list[str]) -> list[Suite]:
    """Keep the workloads whose name or suite matches a glob of ``only`` and the
    targets matching ``target_pats`` (upstreams always stay); drop what is left
    empty, except skipped suites (so their skip is reported)."""
    def match(name: str, pats: list[str]) -> bool:
        return not pats or any(fnmatch.fnmatchcase(name, p) for p in pats)
    out = []
    for s in suites:
        wl = [w for w in s.workloads if match(s.name, only) or match(w.name, only)]
        if not wl:
            continue
        keep = {t.name for t in s.specs if t.role == T.UPSTREAM or match(t.name, target_pats)}
        wl = [dataclasses.replace(w, targets=tuple(t for t in w.targets if t in keep))
              for w in wl]
        wl = [w for w in wl if w.targets]
        if not wl and not s.skip:
            continue
        used = {t for w in wl for t in w.targets}
        specs = [t for t in s.specs if t.name in used or t.role == T.UPSTREAM]
        out.append(dataclasses.replace(s, specs=specs, workloads=wl))
    return out
