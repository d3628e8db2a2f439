"""Shared machinery of the reliability suite: self-identifying data, a history of
requests with their acknowledgement order, the checker that says which value each
unit of the disk may hold, and a driver for many libnbd handles in one thread.

Theory of operation
-------------------
Every byte a test writes is attributable.  A write with id ``wid`` puts at disk
offset ``p`` the byte ``unit_pattern(wid, p // unit)[p % unit]``: each unit
(512 bytes by default) starts with ``(wid, unit offset)`` packed as two
little-endian u64 and repeats them to its end, so any unit read back names the
write it came from and where that write meant it to go (a misplaced unit shows
a foreign offset), and a unit mixing two writes is visibly torn.

``History`` numbers events with one counter: a request takes ``issue`` just
before it is sent and ``complete`` when its successful reply is seen (requests
that fail, or whose reply never came, keep ``complete=None``).  Those numbers
give the only order a client can rely on: X was issued after W was
acknowledged iff ``X.issue > W.complete``.  A request is *durable* when it was
acknowledged with FUA, or when a FLUSH issued after its acknowledgement was
itself acknowledged (on any connection: the export advertises multi-conn).

``History.check`` applies, per unit, the rule the issue states: after a crash a
unit holds its value as of the last completed flush or a value written after
it.  Precisely, candidate W (a write, a zero, a trim, or the base image) is
ruled out iff some durable request X covering the unit was issued after W was
acknowledged; every other candidate is acceptable.  A trim is a wildcard (the
range may read back anything until rewritten durably), a zero reads zeroes,
an unacknowledged request may or may not have landed.  Units that a
byte-unaligned request covers only in part are checked byte by byte with the
same rule.

``AioPool`` drives several handles from the test's thread with poll(2) and short
timeouts, so the thread never sits in C for long (the pytest-timeout watchdog
can always fire) and completion order is observed exactly.
"""

from __future__ import annotations

import bisect
import errno as errnomod
import functools
import itertools
import json
import math
import os
import random
import select
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import nbd

KiB = 1024
MiB = 1024 * KiB
UNIT = 512

_HDR = struct.Struct("<QQ")


# ============================================================================ data

def unit_pattern(wid: int, unit: int, unit_size: int = UNIT) -> bytes:
    """The bytes write ``wid`` puts in unit number ``unit``."""
    return _HDR.pack(wid, unit * unit_size) * (unit_size // _HDR.size)


def pattern_bytes(wid: int, offset: int, length: int, unit_size: int = UNIT) -> bytes:
    """The bytes write ``wid`` puts at [offset, offset+length) (any alignment)."""
    u0 = offset // unit_size
    u1 = (offset + length + unit_size - 1) // unit_size
    full = b"".join([unit_pattern(wid, u, unit_size) for u in range(u0, u1)])
    start = offset - u0 * unit_size
    return full[start:start + length]


def describe_unit(data: bytes, unit_size: int = UNIT) -> str:
    """What a unit read back says about itself (for failure messages)."""
    if data == bytes(len(data)):
        return "zeroes"
    wid, off = _HDR.unpack_from(data)
    whole = data == _HDR.pack(wid, off) * (unit_size // _HDR.size)
    return (f"write {wid >> 32}:{wid & 0xFFFFFFFF} meant for offset {off}"
            + ("" if whole else " (torn or mixed)"))


# ============================================================================ history

@dataclass
class Op:
    kind: str                       # write | zero | trim | flush | read
    wid: int
    offset: int
    length: int
    fua: bool
    issue: int
    complete: int | None = None
    error: str | None = None
    buf: Any = None                 # kept alive until the reply (libnbd's rule)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class CheckResult:
    units_checked: int = 0
    units_touched: int = 0
    lost: list[str] = field(default_factory=list)
    lost_units: int = 0

    def summary(self, limit: int = 8) -> str:
        return f"{self.lost_units} unit(s) lost or foreign: " + "; ".join(self.lost[:limit])


class History:
    """Requests of one epoch (one server lifetime, or one test) and their order."""

    BASE_ISSUE, BASE_COMPLETE = -2, -1

    def __init__(self, base: bytes | bytearray, epoch: int, unit: int = UNIT) -> None:
        self.base = base
        self.size = len(base)
        self.unit = unit
        self.epoch = epoch
        self.ops: list[Op] = []
        self._seq = itertools.count()
        self._wid = itertools.count(1)

    # -- recording -------------------------------------------------------------------

    def new(self, kind: str, offset: int = 0, length: int = 0, fua: bool = False) -> Op:
        """Take the issue number of a request about to be sent."""
        wid = (self.epoch << 32) | next(self._wid) if kind == "write" else 0
        return Op(kind, wid, offset, length, fua, next(self._seq))

    def sent(self, op: Op) -> None:
        self.ops.append(op)

    def done(self, op: Op, err: int) -> None:
        """The reply of ``op`` arrived (err is 0 on success)."""
        if err:
            op.error = errnomod.errorcode.get(err, str(err))
        else:
            op.complete = next(self._seq)
        op.buf = None

    # -- figures ---------------------------------------------------------------------

    def count(self, kind: str, acked: bool | None = None, fua: bool | None = None) -> int:
        return sum(1 for op in self.ops if op.kind == kind
                   and (acked is None or (op.complete is not None) == acked)
                   and (fua is None or op.fua == fua))

    def acked_bytes(self) -> int:
        return sum(op.length for op in self.ops if op.kind == "write" and op.complete is not None)

    # -- the rule ----------------------------------------------------------------------

    def _durable_fn(self) -> Callable[[Op], bool]:
        flushes = sorted(op.issue for op in self.ops
                         if op.kind == "flush" and op.complete is not None)

        def durable(op: Op) -> bool:
            if op.complete is None:
                return False
            if op.fua:
                return True
            return bisect.bisect_right(flushes, op.complete) < len(flushes)
        return durable

    def durable_count(self) -> int:
        durable = self._durable_fn()
        return sum(1 for op in self.ops if op.kind in ("write", "zero") and durable(op))

    def check(self, actual: bytes | memoryview) -> CheckResult:
        """Check every unit of ``actual`` (the whole disk read back) against the rule."""
        U = self.unit
        assert len(actual) == self.size
        durable = self._durable_fn()
        cands: dict[int, list[tuple[Op, bool, int, int]]] = {}
        for op in self.ops:
            if op.kind not in ("write", "zero", "trim") or op.length == 0:
                continue
            d = durable(op)
            u0, u1 = op.offset // U, (op.end + U - 1) // U
            full = (op, d, 0, U)
            for u in range(u0, u1):
                lo = op.offset - u * U
                hi = op.end - u * U
                if lo > 0 or hi < U:
                    cands.setdefault(u, []).append((op, d, max(lo, 0), min(hi, U)))
                else:
                    cands.setdefault(u, []).append(full)
        res = CheckResult(units_checked=self.size // U, units_touched=len(cands))
        mv_a, mv_b = memoryview(actual), memoryview(self.base)
        # untouched units must hold the base image exactly
        chunk = 64 * KiB
        for c in range(0, self.size, chunk):
            if mv_a[c:c + chunk] == mv_b[c:c + chunk]:
                continue
            for u in range(c // U, min(c + chunk, self.size) // U):
                if u not in cands and mv_a[u * U:(u + 1) * U] != mv_b[u * U:(u + 1) * U]:
                    self._lost(res, u, bytes(mv_a[u * U:(u + 1) * U]), "untouched unit changed")
        for u, lst in cands.items():
            got = bytes(mv_a[u * U:(u + 1) * U])
            if all(lo == 0 and hi == U for _, _, lo, hi in lst):
                why = self._check_full(u, got, lst, mv_b)
            else:
                why = self._check_bytes(u, got, lst, mv_b)
            if why:
                self._lost(res, u, got, why)
        return res

    def _lost(self, res: CheckResult, u: int, got: bytes, why: str) -> None:
        res.lost_units += 1
        if len(res.lost) < 50:
            res.lost.append(f"offset {u * self.unit}: holds {describe_unit(got, self.unit)}; "
                            f"{why}")

    def _check_full(self, u: int, got: bytes, lst: list, base: memoryview) -> str:
        U = self.unit
        floor = max([self.BASE_ISSUE] + [op.issue for op, d, _, _ in lst if d])
        ok_ids = []
        if self.BASE_COMPLETE > floor:
            if got == base[u * U:(u + 1) * U]:
                return ""
            ok_ids.append("base")
        for op, _, _, _ in lst:
            if op.complete is not None and op.complete < floor:
                continue
            if op.kind == "trim":
                return ""
            if op.kind == "zero":
                if got == bytes(U):
                    return ""
                ok_ids.append("zero")
            elif got == unit_pattern(op.wid, u, U):
                return ""
            else:
                ok_ids.append(f"{op.wid >> 32}:{op.wid & 0xFFFFFFFF}"
                              + ("" if op.complete is not None else "?"))
        return f"acceptable: {', '.join(ok_ids) or 'nothing'} (floor #{floor})"

    def _check_bytes(self, u: int, got: bytes, lst: list, base: memoryview) -> str:
        U = self.unit
        pats: dict[int, bytes] = {}
        for b in range(U):
            cover = [(op, d) for op, d, lo, hi in lst if lo <= b < hi]
            floor = max([self.BASE_ISSUE] + [op.issue for op, d in cover if d])
            if self.BASE_COMPLETE > floor and got[b] == base[u * U + b]:
                continue
            fine = False
            for op, _ in cover:
                if op.complete is not None and op.complete < floor:
                    continue
                if op.kind == "trim":
                    fine = True
                elif op.kind == "zero":
                    fine = got[b] == 0
                else:
                    if op.wid not in pats:
                        pats[op.wid] = unit_pattern(op.wid, u, U)
                    fine = got[b] == pats[op.wid][b]
                if fine:
                    break
            if not fine:
                return f"byte {b} of a partially written unit matches no acceptable request"
        return ""


# ============================================================================ workload

class AioPool:
    """Several libnbd handles driven from one thread (aio + poll(2))."""

    def __init__(self, handles: Iterable["nbd.NBD"], hist: History) -> None:
        self.handles = list(handles)
        self.hist = hist
        self.inflight = [0] * len(self.handles)
        self.dead: set[int] = set()
        self.errors: dict[str, int] = {}
        self.max_inflight = 0
        self.sync_inflight = 0          # flushes and FUA requests in flight
        self.completions = 0
        self.last_completion = time.monotonic()
        self.longest_gap = 0.0          # longest wait for any completion while busy

    def alive(self) -> list[int]:
        return [i for i in range(len(self.handles)) if i not in self.dead]

    def total_inflight(self) -> int:
        return sum(self.inflight)

    def _done(self, i: int, op: Op, err: Any) -> int:
        code = err.value if hasattr(err, "value") else int(err)
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self.last_completion)
        self.last_completion = now
        self.completions += 1
        if op.kind == "flush" or op.fua:
            self.sync_inflight -= 1
        self.hist.done(op, code)
        if code:
            self.errors[f"{op.kind}:{op.error}"] = self.errors.get(f"{op.kind}:{op.error}", 0) + 1
        self.inflight[i] -= 1
        return 1

    def submit(self, i: int, op: Op) -> bool:
        """Send ``op`` on handle ``i``; False (and op forgotten) if the handle is dead."""
        h = self.handles[i]
        cb = functools.partial(self._done, i, op)
        flags = nbd.CMD_FLAG_FUA if op.fua else 0
        try:
            if op.kind == "write":
                op.buf = pattern_bytes(op.wid, op.offset, op.length, self.hist.unit)
                h.aio_pwrite(op.buf, op.offset, completion=cb, flags=flags)
            elif op.kind == "zero":
                h.aio_zero(op.length, op.offset, completion=cb, flags=flags)
            elif op.kind == "trim":
                h.aio_trim(op.length, op.offset, completion=cb, flags=flags)
            elif op.kind == "flush":
                h.aio_flush(completion=cb)
            elif op.kind == "read":
                op.buf = nbd.Buffer(op.length)
                h.aio_pread(op.buf, op.offset, completion=cb)
            else:
                raise ValueError(op.kind)
        except nbd.Error:
            self.dead.add(i)
            return False
        self.hist.sent(op)
        if not self.total_inflight():
            self.last_completion = time.monotonic()     # idle time is no stall
        if op.kind == "flush" or op.fua:
            self.sync_inflight += 1
        self.inflight[i] += 1
        self.max_inflight = max(self.max_inflight, self.total_inflight())
        return True

    def pump(self, timeout_ms: int = 5) -> None:
        """Wait up to ``timeout_ms`` for any handle to be ready and move it along."""
        p = select.poll()
        fdmap: dict[int, int] = {}
        for i in self.alive():
            h = self.handles[i]
            try:
                if h.aio_is_dead() or h.aio_is_closed():
                    self.dead.add(i)
                    continue
                d = h.aio_get_direction()
                fd = h.aio_get_fd()
            except nbd.Error:
                self.dead.add(i)
                continue
            ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                 (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            if ev:
                p.register(fd, ev)
                fdmap[fd] = i
        if not fdmap:
            time.sleep(timeout_ms / 1000)
            return
        for fd, rev in p.poll(timeout_ms):
            i = fdmap[fd]
            h = self.handles[i]
            try:
                if rev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                elif rev & select.POLLOUT:
                    h.aio_notify_write()
                if h.aio_is_dead():
                    self.dead.add(i)
            except nbd.Error:
                self.dead.add(i)

    def close(self) -> None:
        """Disconnect every handle (nbdkit waits for its clients before a clean stop)."""
        for i in self.alive():
            try:
                self.handles[i].shutdown()
            except nbd.Error:
                pass
        self.handles.clear()
        self.dead = set()
        self.inflight = []

    def drain(self, timeout: float) -> bool:
        """Pump until nothing is in flight on live handles; False on timeout."""
        deadline = time.monotonic() + timeout
        while any(self.inflight[i] for i in self.alive()):
            if time.monotonic() > deadline:
                return False
            self.pump(20)
        return True


@dataclass
class Mix:
    """The request mix of the crash workloads (probabilities add up to 1)."""

    write: float = 0.58
    fua_write: float = 0.08
    zero: float = 0.08
    trim: float = 0.07
    flush: float = 0.10
    read: float = 0.09
    min_len: int = 4 * KiB
    max_len: int = 1 * MiB
    unaligned: float = 0.15         # share of byte-unaligned writes and zeroes
    hot: int = 2 * MiB              # half of the requests land in this window


def random_op(hist: History, rng: random.Random, mix: Mix) -> Op:
    """Draw one request of ``mix`` (the issue number is taken now)."""
    r = rng.random()
    size = hist.size
    kinds = (("write", mix.write), ("fua_write", mix.fua_write), ("zero", mix.zero),
             ("trim", mix.trim), ("flush", mix.flush), ("read", mix.read))
    for kind, p in kinds:
        if r < p:
            break
        r -= p
    if kind == "flush":
        return hist.new("flush")
    length = int(round(math.exp(rng.uniform(math.log(mix.min_len), math.log(mix.max_len)))))
    length = min(length, size)
    if rng.random() < 0.5:
        window = min(mix.hot, size)
        offset = rng.randrange(0, window - min(length, window) + 1)
    else:
        offset = rng.randrange(0, size - length + 1)
    if kind in ("write", "fua_write", "zero") and rng.random() < mix.unaligned:
        offset = min(offset + rng.randrange(1, UNIT), size - 1)
        length = max(1, min(length - rng.randrange(0, UNIT), size - offset))
    else:
        offset -= offset % UNIT
        length = max(UNIT, length - length % UNIT)
    if kind == "fua_write":
        return hist.new("write", offset, length, fua=True)
    if kind == "zero":
        return hist.new("zero", offset, length, fua=rng.random() < 0.2)
    return hist.new(kind, offset, length)



def fill(pool: AioPool, rng: random.Random, mix: Mix, depth: int,
         serial_sync: bool = False) -> int:
    """Top every live handle up to ``depth`` random requests in flight; with
    ``serial_sync`` at most one flush or FUA request is in flight at a time.
    Returns the bytes requested."""
    moved = 0
    for i in pool.alive():
        while pool.inflight[i] < depth and i not in pool.dead:
            op = random_op(pool.hist, rng, mix)
            while serial_sync and pool.sync_inflight and (op.kind == "flush" or op.fua):
                op = random_op(pool.hist, rng, mix)
            moved += op.length
            pool.submit(i, op)
    return moved


def run_until_kill(pool: AioPool, rng: random.Random, mix: Mix, kill_after: float,
                   kill: Callable[[], None], depth: int = 4, grace: float = 10.0) -> float:
    """Keep ``depth`` random requests in flight per handle; after ``kill_after`` seconds
    call ``kill`` and wait until every handle has noticed.  Returns the longest time
    the load waited for any completion before the kill (a stall, or a deadlock that
    the kill hides)."""
    t0 = time.monotonic()
    killed_at = None
    stall = 0.0
    while True:
        now = time.monotonic()
        if killed_at is None and now - t0 >= kill_after:
            kill()
            killed_at = now
        if killed_at is None:
            fill(pool, rng, mix, depth)
            pool.pump(5)
            stall = max(stall, time.monotonic() - pool.last_completion)
            continue
        pool.pump(5)
        if killed_at is not None:
            if not pool.alive() or not pool.total_inflight():
                return stall
            if now - killed_at > grace:
                raise TimeoutError(f"handles still alive {grace}s after the kill: "
                                   f"{pool.total_inflight()} requests in flight")


# ============================================================================ servers & disks

def read_all(h: "nbd.NBD", size: int, chunk: int = 4 * MiB) -> bytes:
    out = bytearray(size)
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        out[off:off + n] = h.pread(n, off)
    return bytes(out)


def read_file(path: Path, size: int | None = None) -> bytes:
    with open(path, "rb") as f:
        data = f.read() if size is None else f.read(size)
    return data + bytes((size or 0) - len(data)) if size else data


def make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def hard_kill(*servers: Any) -> None:
    """SIGKILL each server's process group at once (no cleanup runs), then reap."""
    for s in servers:
        if s is not None and s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for s in servers:
        if s is not None:
            s.proc.wait(10)
            s.stop()            # closes its log file and removes the socket


def stats_events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "stats":
                out.append(e)
    return out


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * KiB
    return out


def nbdcache_yaml(**sections: dict[str, Any]) -> str:
    """A YAML config from nested keyword sections: nbdcache_yaml(cache={"ram": "8M"})."""
    lines = []
    for sec, kv in sections.items():
        lines.append(f"{sec}:")
        for k, v in kv.items():
            lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, (int, float)) else v}")
    return "\n".join(lines) + "\n"


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point (also when its FUSE server died: then
    os.path.ismount fails with ENOTCONN and says no)."""
    target = str(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def unmount(path: Path) -> None:
    if mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=20)


class FuseDisk:
    """An NBD export mounted as one file with nbdfuse (the host's view of a disk).

    nbdfuse 1.14 sometimes aborts (operations.c:208, ``in_flight >= 1``) when its
    server is killed under load, leaving a dead mount: ``close`` and the next
    mount lazily unmount whatever is there."""

    def __init__(self, mnt: Path, sock: Path, log: Path) -> None:
        self.mnt = mnt
        self.file = mnt / "disk"
        unmount(mnt)
        mnt.mkdir(exist_ok=True)
        pidfile = mnt.with_suffix(".pid")
        if pidfile.exists():
            pidfile.unlink()
        self._log = open(log, "a")
        self.proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(self.file),
                                      "--unix", str(sock)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and mounted(mnt)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"nbdfuse did not mount {mnt}: {log.read_text()[-500:]}")
            time.sleep(0.01)

    def close(self) -> None:
        unmount(self.mnt)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def fuse_unusable() -> str | None:
    """Why nbdfuse cannot work here, or None."""
    from shutil import which
    if which("nbdfuse") is None:
        return "nbdfuse is not installed (Debian package nbdfuse)"
    if which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist in this sandbox"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    return None


# ============================================================================ crash rounds

class Stack:
    """One server lifetime in a crash test: nbdcache and whatever lies beneath it.

    ``kill`` is the crash (SIGKILL of every process group, no waiting), ``reap``
    collects the corpses once the client noticed, ``stop`` ends the last, healthy
    stack gracefully.  Subclasses (or the default, nbdcache alone) fill in ``procs``.
    """

    def __init__(self, nbdcache: Any, below: list[Any] | None = None,
                 mounts: list[FuseDisk] | None = None) -> None:
        self.nbdcache = nbdcache
        self.below = below or []
        self.mounts = mounts or []
        self.uri = nbdcache.uri

    def kill(self) -> None:
        for s in self.below + [self.nbdcache]:      # the disk loses power with the host
            if s.proc.poll() is None:
                os.killpg(s.proc.pid, signal.SIGKILL)

    def reap(self) -> None:
        for s in [self.nbdcache] + self.below:
            s.proc.wait(10)
        for m in self.mounts:
            m.close()
        for s in [self.nbdcache] + self.below:
            s.stop()

    def stop(self) -> None:
        self.nbdcache.stop()
        for m in self.mounts:
            m.close()
        for s in self.below:
            s.stop()


def connect(uri: str) -> "nbd.NBD":
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


@dataclass
class CrashTotals:
    rounds: int = 0
    writes: int = 0
    fua: int = 0
    zeroes: int = 0
    trims: int = 0
    flushes: int = 0
    durable: int = 0
    units: int = 0
    lost: int = 0
    kills_in_flush: int = 0
    stalled_rounds: int = 0         # rounds that waited >= 0.3 s for any completion
    failure: str = ""


def crash_rounds(start: Callable[[int], Stack], size: int, rounds: int, rng: random.Random,
                 seed: int, mix: Mix | None = None, connections: int = 4, depth: int = 4,
                 kill_window: tuple[float, float] = (0.05, 0.6)) -> CrashTotals:
    """Run ``rounds`` rounds of start, check what the last round left, load, kill.

    Round r's stack first reads the whole disk and checks it against round r-1's
    history; the disk it read becomes the base of round r.  Stops at the first
    round that loses data (``failure`` says where and how).  The image must
    start all zeroes.
    """
    mix = mix or Mix()
    t = CrashTotals()
    base = bytes(size)
    hist: History | None = None
    for r in range(rounds + 1):
        stack = start(r)
        h = connect(stack.uri)
        if hist is not None:
            actual = read_all(h, size)
            res = hist.check(actual)
            t.units += res.units_touched
            t.lost += res.lost_units
            if res.lost_units:
                h.shutdown()
                stack.stop()
                t.failure = f"round {r} (seed {seed}): {res.summary()}"
                return t
            base = actual
            t.rounds = r
        if r == rounds:
            h.shutdown()
            stack.stop()
            return t
        hist = History(base, epoch=r + 1)
        pool = AioPool([h] + [connect(stack.uri) for _ in range(connections - 1)], hist)
        stall = run_until_kill(pool, rng, mix, kill_after=rng.uniform(*kill_window),
                               kill=stack.kill, depth=depth)
        t.stalled_rounds += stall >= 0.3
        stack.reap()
        del pool, h
        t.writes += hist.count("write", acked=True)
        t.fua += hist.count("write", acked=True, fua=True)
        t.zeroes += hist.count("zero", acked=True)
        t.trims += hist.count("trim", acked=True)
        t.flushes += hist.count("flush", acked=True)
        t.durable += hist.durable_count()
        t.kills_in_flush += any(op.kind == "flush" and op.complete is None for op in hist.ops)
    return t


def report_crash(figures: Any, name: str, t: CrashTotals, rounds: int, seed: int,
                 elapsed: float) -> None:
    figures.add(name, "rounds (seed)", f"{t.rounds} ({seed})", f">= {rounds}",
                t.rounds == rounds)
    figures.add(name, "acked writes / FUA / zeroes / trims / flushes",
                f"{t.writes} / {t.fua} / {t.zeroes} / {t.trims} / {t.flushes}")
    figures.add(name, "durable requests / kills during a flush",
                f"{t.durable} / {t.kills_in_flush}")
    figures.add(name, "rounds stalled >= 0.3 s before the kill", t.stalled_rounds)
    figures.add(name, "512-byte units checked (touched)", t.units)
    figures.add(name, "units lost", t.lost, 0, t.lost == 0)
    figures.add(name, "elapsed", f"{elapsed:.1f} s")


def seed_from_env() -> int:
    return int(os.environ.get("NBDCACHE_SEED", time.time_ns() % 2**32))
