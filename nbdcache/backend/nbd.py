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

*Durability across reconnects.*  A write that a server acknowledged but that
no successful FLUSH has covered yet may be lost if that server crashed.  Each
slot counts the writes (pwrite, zero, trim) completed on its connection that
no flush has covered (``unflushed``), with the time the oldest of them was
sent.  When a connection is dropped, its count moves to ``_lost``, and the
next ``flush`` raises EIO once ("... lost after N unflushed writes ...")
instead of reporting a false success; the flush after that succeeds if it can.

A flush covers a connection's writes when it succeeds on that connection.
With multi-conn, one flush on connection X also covers connection Y's writes
if they were to the same server; that is certain when Y's oldest unflushed
write was sent after X was connected (both connections were then alive at one
moment, and an address serves one server at a time).  ``flush`` therefore
sends one flush on one connection, credits every slot it certainly covers,
and flushes the remaining slots with unflushed writes one by one (borrowing
each in turn).  Without reconnects every slot is covered, so a multi-conn
server gets one flush; without multi-conn every connected slot gets its own.
A FLUSH is sent even when the counts say nothing is unflushed: the counts only
decide which connections one flush covers.  A connection found dead while flushing is not retried: its writes
are counted lost and reported by this very flush.

Locking: ``_lock`` guards slot state (free/busy, counts, serials) and the
outage state; ``_cond`` is its condition.  ``_flush_lock`` serialises flushes.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import nbd

from nbdcache import log as logmod
from nbdcache.backend import Backend

_BACKOFF_MIN = 0.05             # first wait between reconnect attempts (seconds) ...
_BACKOFF_MAX = 1.0              # ... doubling up to this
_CONNECT_TIMEOUT = 10.0         # one reconnect attempt at most (a host that drops SYNs) ...
_CONNECT_FLOOR = 1.0            # ... and at least, even when the retry window is spent

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


@dataclass(eq=False)
class _Conn:
    """One connection slot.  ``h`` is used only by the slot's borrower; the rest is
    guarded by the backend's ``_lock``."""
    index: int
    h: Any = None                   # nbd.NBD, or None: (re)connect before use
    serial: int = 0                 # which connection this is; changes on reconnect
    connected_at: float = -math.inf
    unflushed: int = 0              # writes completed here that no flush has covered
    oldest: float | None = None     # when the oldest of them was sent (None iff unflushed==0)
    busy: bool = False
    wanted: bool = False            # a flush waits for this slot: others leave it alone


class NbdBackend(Backend):
    """An NBD export used through a pool of libnbd connections.

    Every method may block: on a dead connection it reconnects and retries for up to
    ``retry_timeout`` seconds from the start of the outage (see the module doc),
    then raises EIO naming the URI.  Errors the server returns are raised at once
    with their errno (EIO, ENOSPC, EDQUOT, EPERM, ENOMEM, EFBIG, EROFS; else EIO).

    Durability: if a connection was lost while writes completed on it had not been
    covered by a successful flush, those writes may be lost with the server, and the
    next ``flush`` raises EIO once, saying how many, rather than report a false
    success.  The caller is not told which writes they were; a flush after that
    covers only what was written since.

    ``retry_timeout`` may be changed at any time (a live tunable).  No lock is held
    by callers; ``close`` ends every connection and makes later requests fail.
    """

    def __init__(self, uri: str, connections: int = 4, retry_timeout: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.uri = uri
        self.retry_timeout = float(retry_timeout)
        self._clock, self._sleep = clock, sleep
        self.log = logmod.get("backend")
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._conns = [_Conn(i) for i in range(connections)]
        self._serial = 0
        self._closed = False
        self._lost = 0                          # unflushed writes on dropped connections
        self._down_since: float | None = None   # the current outage began (None: no outage)
        self._attempts = 0                      # reconnect attempts in this outage
        self._gave_up = False                   # a request of this outage timed out
        self._recovered_at = -math.inf          # the last outage ended
        self._bad_export: str | None = None     # last "export changed" message logged
        self.outages = 0                        # statistics
        self.reconnects = 0
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
            self._serial += 1
            c.h, c.serial, c.connected_at = h, self._serial, self._clock()

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
        handle, count its unflushed writes as lost, start an outage unless one is
        known.  Returns when the outage began (``now`` for a stale connection)."""
        with self._lock:
            h, c.h = c.h, None
            stale = h is not None and c.connected_at < self._recovered_at
            if h is not None:
                self._lost += c.unflushed
                c.unflushed, c.oldest = 0, None
            start = self._down_since is None and not stale
            if start:
                self.outages += 1
                self._down_since, self._attempts, self._gave_up = now, 0, False
            began = self._down_since if self._down_since is not None else now
            lost = self._lost
        del h                                   # closes the socket (libnbd's nbd_close)
        if start:
            self.log.warning("backend.disconnected", uri=self.uri, error=e.string,
                             unflushed_lost=lost)
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

    def _borrow(self, want: _Conn | None = None) -> _Conn:
        """Take any free slot, or the slot ``want`` (waiting for it).  May block."""
        with self._cond:
            if want is not None:
                want.wanted = True
                while want.busy:
                    self._cond.wait()
                want.wanted, want.busy = False, True
                return want
            while True:
                for c in self._conns:
                    if not c.busy and not c.wanted:
                        c.busy = True
                        return c
                self._cond.wait()

    def _release(self, c: _Conn) -> None:
        with self._cond:
            c.busy = False
            self._cond.notify_all()             # a flush may wait for this very slot

    def _run(self, what: str, fn, *args, write: bool = False):
        c = self._borrow()
        try:
            return self._attempt(c, what, fn, args, write)
        finally:
            self._release(c)

    def _attempt(self, c: _Conn, what: str, fn, args: tuple, write: bool):
        """Run ``fn(h, *args)`` on the borrowed slot ``c``, reconnecting and retrying
        while the connection is dead (see the module doc).  May block."""
        first: float | None = None
        delay = _BACKOFF_MIN
        while True:
            sent = self._clock()
            try:
                if c.h is None:
                    self._reconnect(c)
                    sent = self._clock()
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
                    c.unflushed += 1
                    if c.oldest is None:
                        c.oldest = sent
            return result

    # -- the Backend interface -------------------------------------------------------------

    def pread(self, buf: memoryview, offset: int) -> None:
        def go(h: "nbd.NBD", buf: memoryview, offset: int) -> None:
            buf[:] = h.pread(len(buf), offset)
        self._run("pread", go, buf, offset)

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        # libnbd takes any buffer: no copy (write-back snapshots are ours until done)
        self._run("pwrite", lambda h, b, o: h.pwrite(b, o), buf, offset, write=True)

    def flush(self) -> None:
        """Make every write completed before the call durable, or raise.  May block;
        EIO once after a connection was lost with unflushed writes (class doc)."""
        with self._flush_lock:
            if self.can_flush:
                if self.multi_conn:
                    self._flush_multi()
                with self._lock:
                    rest = [c for c in self._conns if c.unflushed
                            or (not self.multi_conn and c.h is not None)]
                for c in rest:
                    self._flush_one(c)
            with self._lock:
                lost, self._lost = self._lost, 0
            if lost:
                self.log.error("backend.writes_lost", uri=self.uri, writes=lost)
                raise OSError(errno.EIO, f"backend flush: the connection to {self.uri} was "
                                         f"lost after {lost} unflushed write(s), which may "
                                         "not be on stable storage")

    def _flush_multi(self) -> None:
        """One flush on one connection; credit the slots it certainly covers."""
        c = self._borrow()
        try:
            with self._lock:
                snap = [(y, y.serial, y.unflushed, y.oldest) for y in self._conns
                        if y.unflushed]
                since = c.connected_at
            if c.h is None:
                return                          # the slots with writes are flushed one by one
            # Sent even when the counts say nothing is unflushed: the counts decide which
            # other connections a flush covers, never whether a FLUSH reaches the server
            # (a power-loss run lost acknowledged data while flushes were skipped).
            if not self._flush_handle(c):
                return
            with self._lock:
                for y, serial, n, oldest in snap:
                    if y.serial == serial and (y is c or oldest > since):
                        y.unflushed -= n
                        if not y.unflushed:
                            y.oldest = None
        finally:
            self._release(c)

    def _flush_one(self, c: _Conn) -> None:
        """Flush the connection of slot ``c`` if writes on it are not covered yet."""
        self._borrow(c)
        try:
            if c.h is not None and self._flush_handle(c):
                with self._lock:                # we hold c: no write completed meanwhile
                    c.unflushed, c.oldest = 0, None
        finally:
            self._release(c)

    def _flush_handle(self, c: _Conn) -> bool:
        """FLUSH on the borrowed slot's connection: True if it succeeded, False if the
        connection was dead (its writes are then counted lost).  Server errors raise."""
        try:
            c.h.flush()
            return True
        except nbd.Error as e:
            if not _is_dead(c.h, e):
                raise _oserror(e, "backend flush") from None
            self._disconnected(c, e, self._clock())
            return False

    def trim(self, offset: int, count: int) -> None:
        if self.can_trim:
            for o, c in _chunks(offset, count):
                self._run("trim", lambda h, c, o: h.trim(c, o), c, o, write=True)

    def zero(self, offset: int, count: int) -> None:
        if self.can_zero:
            for o, c in _chunks(offset, count):
                self._run("zero", lambda h, c, o: h.zero(c, o), c, o, write=True)
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
    def unflushed(self) -> int:
        """Writes completed on live connections that no flush has covered yet."""
        with self._lock:
            return sum(c.unflushed for c in self._conns)

    def check(self) -> None:
        """Raise BackendInvariantError if the slots' bookkeeping is inconsistent."""
        with self._lock:
            for c in self._conns:
                if c.unflushed < 0 or (c.unflushed == 0) != (c.oldest is None):
                    raise BackendInvariantError(f"slot {c.index}: unflushed={c.unflushed} "
                                                f"oldest={c.oldest}")
                if c.h is None and c.unflushed:
                    raise BackendInvariantError(f"slot {c.index}: {c.unflushed} unflushed "
                                                "writes on no connection")
                if c.unflushed and not self.can_flush:
                    raise BackendInvariantError("writes counted on a server without flush")
            if self._lost < 0:
                raise BackendInvariantError(f"lost={self._lost}")
            if self._down_since is not None and self._down_since < self._recovered_at:
                raise BackendInvariantError("an outage began before the last recovery")
