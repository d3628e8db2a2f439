"""A remote NBD export through libnbd (``nbd://``, ``nbd+unix://``, ``nbds://``).

Theory of operation
-------------------
*Connections.*  libnbd runs one synchronous command at a time per handle, so
the backend keeps ``connections`` slots (``_Conn``), each holding at most one
handle, and lends them to callers: misses and write-back clusters proceed in
parallel up to that count.  A caller borrows any free slot; a flush may wait
for one particular slot (``wanted`` keeps others from taking it meanwhile).
Only the borrower of a slot calls libnbd on its handle, reconnects it or
sleeps; nobody holds ``_lock`` while doing so.  The export's size and
capabilities are read at connect time and respected: no trim or zero is sent
to a server that does not offer them (zero falls back to written zeroes).

*Reconnection.*  A command that fails because its connection is dead (libnbd
reports ENOTCONN, ECONNRESET, EPIPE or ESHUTDOWN, or the handle is no longer
ready) drops that slot's handle; its borrower reconnects (same URI and
settings) at once and sends the command again.  If the server cannot be
reached, it tries again after a back-off from 50 ms doubling to 1 s, until
``retry_timeout`` seconds after the *outage* began (the first such failure
while no outage was known), then raises EIO naming the URI and the outage
length.  A request that arrives late in a long outage thus gets only what is
left of the window, and once it has passed, each request makes one
connection attempt and fails: whatever asks next (write-back retries anyway)
finds the server when it is back.  With ``retry_timeout`` 0 a dead connection
is still replaced once, at once, but nothing waits.  An answer from
a live server (EIO, ENOSPC, ...) is never retried.  A reconnected export must
have the same size and no fewer capabilities, else EIO at once.  An outage is
logged once (``backend.disconnected``, ``backend.reconnected`` with attempts
and seconds, ``backend.unavailable`` when the first request gives up);
connections opened before the last recovery that turn out dead are replaced
quietly, as part of the outage already reported.

*Durability across reconnects: the journal.*  A write that a server
acknowledged but that no successful FLUSH has covered yet is lost if that
server crashes; the cache has marked the block clean by then, so only the
backend can bring it back.  Every completed pwrite and zero is therefore kept
in a journal (the write-back snapshot itself, no copy) until a FLUSH covers
it, as an NFS client keeps unstable writes until a COMMIT (the kernel's
B_NEEDCOMMIT).  ``epoch`` counts events after which the server may have
dropped unflushed writes: a connection dropped or replaced, a FLUSH that
failed.  Each entry records the epoch it completed in.  ``flush``:

1. if any entry is from an older epoch, *replays* the whole journal, oldest
   first, with every other request of this backend held off meanwhile (so no
   newer write can be overtaken and no read sees a half-replayed range); the
   replayed entries then belong to the current epoch;
2. sends the FLUSH: on one connection with multi-conn, else on every one;
3. if the epoch did not change from before the FLUSH was sent until it
   succeeded, every entry completed before it was sent is durable and leaves
   the journal; otherwise it goes back to 1 (at most a few times, then EIO).

A flush thus never reports success for a write a lost server dropped, and
does not fail either: it writes the data again, to whatever server answers
within ``retry_timeout``.  Trims are not journaled (advisory).  The journal
is bounded: once it holds more than ``journal_max`` bytes, the write that
crossed the bound issues a flush itself, so memory stays bounded while guests
do not flush.  The engine sets the bound to ``cache.hirunningspace`` at start,
so write-back keeps at most about twice that in memory (in flight, then
journaled).

Locking: ``_lock`` guards slot state (free/busy), the outage state, the
journal and the epoch; ``_cond`` is its condition.  A replay holds requests
off at ``_borrow`` and waits until no slot is busy (every request under way
holds one).
``_flush_lock`` serialises flushes.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import nbd

from nbdcache import log as logmod
from nbdcache.backend import Backend

_BACKOFF_MIN = 0.05             # first wait between reconnect attempts (seconds) ...
_BACKOFF_MAX = 1.0              # ... doubling up to this
_CONNECT_TIMEOUT = 10.0         # one reconnect attempt at most (a host that drops SYNs) ...
_CONNECT_FLOOR = 1.0            # ... and at least, even when the retry window is spent
JOURNAL_MAX = 32 << 20          # unflushed write bytes kept for replay before a flush is forced
_FLUSH_TRIES = 8                # flush rounds (replay, FLUSH) before giving up while epochs change

# A command failed because the connection is gone (not because the server said no).
_DEAD = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN})

# Errors a server may return that mean the same to our client; anything else (libnbd's own
# EINVAL for a handle in the wrong state, ...) is an I/O error of the backend: EIO.
_PASS_THROUGH = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EPERM, errno.ENOMEM,
                 errno.EFBIG, errno.EROFS}


class BackendInvariantError(Exception):
    """The NBD backend's bookkeeping is inconsistent (a bug, raised by ``check``)."""


def _chunks(offset: int, count: int, step: int = 1 << 30):
    """NBD lengths are 32-bit: split a large trim or zero into 1 GiB requests."""
    end = offset + count
    while offset < end:
        yield offset, min(step, end - offset)
        offset += step


def _oserror(e: "nbd.Error", what: str) -> OSError:
    code = getattr(e, "errnum", None)                # .errno is the name, .errnum the number
    if code not in _PASS_THROUGH:
        code = errno.EIO
    return OSError(code, f"{what}: {e.string}")


def _is_dead(h: "nbd.NBD", e: "nbd.Error") -> bool:
    """Whether ``e`` (raised by a command on ``h``) means the connection is gone."""
    if getattr(e, "errnum", None) in _DEAD:
        return True
    try:
        return bool(h.aio_is_dead() or h.aio_is_closed() or not h.aio_is_ready())
    except nbd.Error:
        return True


# The journaled requests: fn(handle, data, offset), data a buffer (pwrite) or a count (zero).
_WRITE_OPS = {"pwrite": lambda h, buf, offset: h.pwrite(buf, offset),
              "zero": lambda h, count, offset: h.zero(count, offset)}


@dataclass(eq=False)
class _Entry:
    """A completed pwrite or zero that no FLUSH has covered yet."""
    seq: int
    epoch: int                      # the epoch it completed in
    kind: str                       # "pwrite" | "zero"
    offset: int
    data: Any                       # the buffer written (pwrite) or the byte count (zero)

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.kind == "pwrite" else 0


@dataclass(eq=False)
class _Conn:
    """One connection slot.  ``h`` is used only by the slot's borrower; the rest is
    guarded by the backend's ``_lock``."""
    index: int
    h: Any = None                   # nbd.NBD, or None: (re)connect before use
    connected_at: float = -math.inf
    busy: bool = False
    wanted: bool = False            # a flush waits for this slot: others leave it alone


class NbdBackend(Backend):
    """An NBD export used through a pool of libnbd connections.

    Every method may block: on a dead connection it reconnects and retries for up to
    ``retry_timeout`` seconds from the start of the outage (see the module doc),
    then raises EIO naming the URI.  Errors the server returns are raised at once
    with their errno (EIO, ENOSPC, EDQUOT, EPERM, ENOMEM, EFBIG, EROFS; else EIO).

    Durability: completed writes are journaled until a FLUSH covers them; after a
    connection was lost (or a FLUSH failed), ``flush`` replays the journal before
    flushing, so a successful ``flush`` always covers every write completed before
    it, whatever the server lost meanwhile (see the module doc).

    ``retry_timeout`` may be changed at any time (a live tunable).  No lock is held
    by callers; ``close`` ends every connection and makes later requests fail.
    """

    def __init__(self, uri: str, connections: int = 4, retry_timeout: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 journal_max: int = JOURNAL_MAX) -> None:
        self.uri = uri
        self.retry_timeout = float(retry_timeout)
        self._clock, self._sleep = clock, sleep
        self.log = logmod.get("backend")
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._conns = [_Conn(i) for i in range(connections)]
        self._closed = False
        self.journal_max = journal_max
        self._journal: deque[_Entry] = deque()  # completed, not yet covered by a FLUSH
        self._jseq = 0                          # the last entry's seq
        self._jbytes = 0                        # pwrite bytes in the journal
        self._auto_at = journal_max             # journal bytes at which a write flushes
        self._epoch = 0                         # bumped when unflushed writes may be lost
        self._replaying = False
        self._down_since: float | None = None   # the current outage began (None: no outage)
        self._attempts = 0                      # reconnect attempts in this outage
        self._gave_up = False                   # a request of this outage timed out
        self._recovered_at = -math.inf          # the last outage ended
        self._bad_export: str | None = None     # last "export changed" message logged
        self.outages = 0                        # statistics
        self.reconnects = 0
        self.replays = 0                        # journal replays, and entries replayed
        self.replayed = 0
        self.auto_flushes = 0                   # flushes forced by journal_max
        try:
            first = self._open(None)
            self.size = first.get_size()
            self.read_only = bool(first.is_read_only())
            self.can_trim = bool(first.can_trim())
            self.can_zero = bool(first.can_zero())
            self.can_fua = bool(first.can_fua())
            self.can_flush = bool(first.can_flush())
            self.multi_conn = bool(first.can_multi_conn())
            self._attach(self._conns[0], first)
            for c in self._conns[1:]:
                self._attach(c, self._open(None))
        except nbd.Error as e:
            self.close()
            raise _oserror(e, f"backend.uri {uri!r}") from None
        if self.read_only:
            self.close()
            raise OSError(errno.EROFS, f"backend.uri {uri!r}: the export is read-only")
        self.description = f"nbd {uri} ({self.size} bytes, {connections} connections)"

    # -- connections -------------------------------------------------------------------

    def _open(self, timeout: float | None) -> "nbd.NBD":
        """A new connected handle; raises nbd.Error.  ``timeout`` bounds the connect and
        handshake (None: libnbd's blocking connect, used at startup)."""
        h = nbd.NBD()
        h.set_handle_name("nbdcache-backend")
        h.set_uri_allow_local_file(True)         # ?tls-certificates=DIR for nbds:// URIs
        if timeout is None:
            h.connect_uri(self.uri)
            return h
        h.aio_connect_uri(self.uri)
        end = self._clock() + timeout
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise nbd.Error("connect: the connection failed", errno.ENOTCONN)
            left = end - self._clock()
            if left <= 0:
                raise nbd.Error(f"connect: no answer in {timeout:.1f} s", errno.ETIMEDOUT)
            h.poll(max(1, int(min(left, 1.0) * 1000)))
        return h

    def _attach(self, c: _Conn, h: "nbd.NBD") -> None:
        with self._lock:
            self._epoch += 1                    # a new connection: maybe a new server
            c.h, c.connected_at = h, self._clock()

    def _changed(self, h: "nbd.NBD") -> str | None:
        """How a reconnected export differs from the one we started with, or None."""
        size = h.get_size()
        if size != self.size:
            return f"its size changed from {self.size} to {size} bytes"
        gone = [name for name, had, has in (
            ("writes", True, not h.is_read_only()), ("trim", self.can_trim, h.can_trim()),
            ("zero", self.can_zero, h.can_zero()), ("flush", self.can_flush, h.can_flush()),
            ("multi-conn", self.multi_conn, h.can_multi_conn())) if had and not has]
        return f"it no longer offers {', '.join(gone)}" if gone else None

    def _reconnect(self, c: _Conn) -> None:
        """Give the borrowed slot ``c`` a new connection.  Raises nbd.Error if the server
        cannot be reached, OSError(EIO) if the backend is closed or the export changed."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EIO, f"backend {self.uri}: closed")
            left = self.retry_timeout
            if self._down_since is not None:
                self._attempts += 1
                left += self._down_since - self._clock()
        h = self._open(min(_CONNECT_TIMEOUT, max(_CONNECT_FLOOR, left)))
        why = self._changed(h)
        if why is not None:
            del h
            msg = f"backend {self.uri}: reconnected, but {why}; not using it"
            with self._lock:
                first, self._bad_export = self._bad_export != msg, msg
            if first:
                self.log.error("backend.export_changed", uri=self.uri, why=why)
            raise OSError(errno.EIO, msg)
        self._attach(c, h)
        with self._lock:
            if self._closed:                    # close() ran while we connected
                c.h = None
                raise OSError(errno.EIO, f"backend {self.uri}: closed")
            self.reconnects += 1
            began, self._down_since = self._down_since, None
            if began is not None:
                self._recovered_at = c.connected_at
            attempts = self._attempts
        if began is not None:
            self.log.info("backend.reconnected", uri=self.uri, attempts=attempts,
                          outage=round(c.connected_at - began, 3))

    def _disconnected(self, c: _Conn, e: "nbd.Error", now: float) -> float:
        """The borrowed slot ``c`` lost its connection (or could not get one): drop the
        handle (a new epoch: the journal is replayed before the next FLUSH), start an
        outage unless one is known.  Returns when the outage began (``now`` for a
        stale connection)."""
        with self._lock:
            h, c.h = c.h, None
            stale = h is not None and c.connected_at < self._recovered_at
            if h is not None:
                self._epoch += 1
            start = self._down_since is None and not stale
            if start:
                self.outages += 1
                self._down_since, self._attempts, self._gave_up = now, 0, False
            began = self._down_since if self._down_since is not None else now
            journaled = len(self._journal)
        del h                                   # closes the socket (libnbd's nbd_close)
        if start:
            self.log.warning("backend.disconnected", uri=self.uri, error=e.string,
                             unflushed_writes=journaled)
        return began

    def _unavailable(self, what: str, e: "nbd.Error", outage: float) -> OSError:
        with self._lock:
            first, self._gave_up = not self._gave_up, True
            attempts = self._attempts
        if first:
            self.log.error("backend.unavailable", uri=self.uri, outage=round(outage, 3),
                           attempts=attempts, retry_timeout=self.retry_timeout)
        return OSError(errno.EIO, f"backend {what}: {self.uri} unreachable for {outage:.1f} s "
                                  f"(backend.retry_timeout {self.retry_timeout:g} s): "
                                  f"{e.string}")

    # -- the pool ----------------------------------------------------------------------

    def _borrow(self, want: _Conn | None = None, gate: bool = True) -> _Conn:
        """Take any free slot, or the slot ``want`` (waiting for it).  May block.  Any
        slot is not handed out while the journal is replayed, except to the replay
        (``gate=False``)."""
        with self._cond:
            if want is not None:
                want.wanted = True
                while want.busy:
                    self._cond.wait()
                want.wanted, want.busy = False, True
                return want
            while True:
                if not (gate and self._replaying):
                    for c in self._conns:
                        if not c.busy and not c.wanted:
                            c.busy = True
                            return c
                self._cond.wait()

    def _release(self, c: _Conn) -> None:
        with self._cond:
            c.busy = False
            self._cond.notify_all()             # a flush may wait for this very slot

    def _run(self, what: str, fn, *args, write: str | None = None):
        """One request on any free slot.  ``write`` ("pwrite" or "zero") journals the
        request once it completed."""
        c = self._borrow()
        try:
            return self._attempt(c, what, fn, args, write)
        finally:
            self._release(c)

    def _attempt(self, c: _Conn, what: str, fn, args: tuple, write: str | None = None):
        """Run ``fn(h, *args)`` on the borrowed slot ``c``, reconnecting and retrying
        while the connection is dead (see the module doc).  May block."""
        first: float | None = None
        delay = _BACKOFF_MIN
        while True:
            try:
                if c.h is None:
                    self._reconnect(c)
                result = fn(c.h, *args)
            except nbd.Error as e:
                if self._closed:
                    raise OSError(errno.EIO, f"backend {what}: {self.uri}: closed") from None
                if c.h is not None and not _is_dead(c.h, e):
                    raise _oserror(e, f"backend {what}") from None
                dropped = c.h is not None
                now = self._clock()
                began = self._disconnected(c, e, now)
                if dropped and first is None:   # died under this request: reconnect at once
                    first = now
                    continue
                first = now if first is None else first
                began = min(began, first)
                left = began + self.retry_timeout - now
                if left <= 0:
                    raise self._unavailable(what, e, now - began) from None
                self._sleep(min(delay, left))
                delay = min(2 * delay, _BACKOFF_MAX)
                continue
            if write and self.can_flush:
                with self._lock:
                    self._jseq += 1
                    # args: (buffer, offset) for pwrite, (count, offset) for zero
                    e = _Entry(self._jseq, self._epoch, write, args[1], args[0])
                    self._journal.append(e)
                    self._jbytes += e.nbytes
            return result

    # -- the Backend interface -------------------------------------------------------------

    def pread(self, buf: memoryview, offset: int) -> None:
        def go(h: "nbd.NBD", buf: memoryview, offset: int) -> None:
            buf[:] = h.pread(len(buf), offset)
        self._run("pread", go, buf, offset)

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        # libnbd takes any buffer: no copy.  The journal keeps ``buf`` until a FLUSH covers
        # it: callers pass buffers they never modify again (write-back snapshots, zeroes).
        self._run("pwrite", _WRITE_OPS["pwrite"], buf, offset, write="pwrite")
        if self._jbytes > self._auto_at:
            self._auto_flush()

    def set_journal_max(self, nbytes: int) -> None:
        """Bound the journal (the engine sets it to cache.hirunningspace at start)."""
        with self._lock:
            self.journal_max = max(int(nbytes), 1)
            self._auto_at = self._jbytes + self.journal_max

    def _auto_flush(self) -> None:
        """The journal passed journal_max: flush so that it can be emptied.  A failure is
        logged, not raised (the write itself succeeded); the next try waits for another
        journal_max of writes."""
        with self._lock:
            if self._jbytes <= self._auto_at:
                return                          # another writer got here first
            self._auto_at = self._jbytes + self.journal_max
        self.auto_flushes += 1
        try:
            self.flush()
        except OSError as e:
            self.log.warning("backend.auto_flush_failed", uri=self.uri, error=str(e),
                             journal_bytes=self._jbytes)

    def flush(self) -> None:
        """Make every write completed before the call durable, or raise.  May block:
        replays the journal first if the server may have lost writes (module doc)."""
        with self._flush_lock:
            if not self.can_flush:
                return
            for _ in range(_FLUSH_TRIES):
                with self._lock:
                    epoch, upto = self._epoch, self._jseq
                    # epochs never decrease along the journal: the oldest entry tells
                    stale = bool(self._journal) and self._journal[0].epoch != epoch
                if stale:
                    self._replay()
                    continue
                try:
                    self._send_flush()
                except OSError:
                    with self._lock:
                        self._epoch += 1        # a failed FLUSH may have dropped writes
                    raise
                with self._lock:
                    if self._epoch != epoch:
                        continue                # a connection was lost or replaced meanwhile
                    j = self._journal
                    while j and j[0].seq <= upto:
                        self._jbytes -= j.popleft().nbytes
                    self._auto_at = self._jbytes + self.journal_max
                    return
            raise OSError(errno.EIO, f"backend flush: {self.uri}: connections kept failing "
                                     f"while flushing ({_FLUSH_TRIES} tries)")

    def _send_flush(self) -> None:
        """FLUSH on one connection (multi-conn), else on every connection; reconnects
        like any request.  Raises OSError."""
        flush = lambda h: h.flush()             # noqa: E731
        if self.multi_conn:
            self._run("flush", flush)
            return
        for c in self._conns:
            self._borrow(c)
            try:
                self._attempt(c, "flush", flush, ())
            finally:
                self._release(c)

    def _replay(self) -> None:
        """Write the whole journal again, oldest first, with every other request held off;
        repeated until no connection is lost meanwhile.  Raises OSError."""
        with self._cond:
            self._replaying = True
            while any(c.busy for c in self._conns):
                self._cond.wait()
        t0 = self._clock()
        try:
            while True:
                with self._lock:
                    epoch = self._epoch
                    entries = list(self._journal)
                for e in entries:
                    c = self._borrow(gate=False)
                    try:
                        self._attempt(c, "replay", _WRITE_OPS[e.kind], (e.data, e.offset))
                    finally:
                        self._release(c)
                with self._lock:
                    if self._epoch == epoch:
                        for e in entries:
                            e.epoch = epoch
                        break
            self.replays += 1
            self.replayed += len(entries)
            self.log.info("backend.replayed", uri=self.uri, writes=len(entries),
                          bytes=sum(e.nbytes for e in entries),
                          seconds=round(self._clock() - t0, 3))
        finally:
            with self._cond:
                self._replaying = False
                self._cond.notify_all()

    def trim(self, offset: int, count: int) -> None:
        if self.can_trim:
            for o, c in _chunks(offset, count):
                self._run("trim", lambda h, c, o: h.trim(c, o), c, o)

    def zero(self, offset: int, count: int) -> None:
        if self.can_zero:
            for o, c in _chunks(offset, count):
                self._run("zero", _WRITE_OPS["zero"], c, o, write="zero")
            return
        self.write_zeroes(offset, count)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles = [c.h for c in self._conns if c.h is not None]
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    # -- invariants --------------------------------------------------------------------

    @property
    def journaled(self) -> int:
        """Completed writes no FLUSH has covered yet (kept for replay)."""
        with self._lock:
            return len(self._journal)

    def check(self) -> None:
        """Raise BackendInvariantError if the bookkeeping is inconsistent."""
        with self._lock:
            seqs = [e.seq for e in self._journal]
            if seqs != sorted(seqs) or (seqs and seqs[-1] > self._jseq):
                raise BackendInvariantError(f"journal out of order: {seqs[:8]}...")
            if self._jbytes != sum(e.nbytes for e in self._journal):
                raise BackendInvariantError(f"journal bytes {self._jbytes} != entries")
            epochs = [e.epoch for e in self._journal]
            if epochs != sorted(epochs) or (epochs and epochs[-1] > self._epoch):
                raise BackendInvariantError("journal epochs decrease or lie in the future")
            if self._journal and not self.can_flush:
                raise BackendInvariantError("writes journaled on a server without flush")
            if self._down_since is not None and self._down_since < self._recovered_at:
                raise BackendInvariantError("an outage began before the last recovery")
