"""The control socket: statistics and live tunables for ``nbdcache stats`` and ``nbdcache set``.

Theory of operation
-------------------
A Unix stream socket (file mode 0600, in a directory created 0700 if missing;
the file appears only once the socket listens, so a client that sees it can
connect) speaks one JSON object per line in each direction::

    {"op": "stats"}                     -> {"ok": true, "stats": {...}, "time": <monotonic>}
    {"op": "tunables"}                  -> {"ok": true, "tunables": {"cache.max_io": ...}}
    {"op": "set", "key": K, "value": V} -> {"ok": true, "old": ..., "new": ...}
                                        or {"ok": false, "error": "<ConfigError message>"}
    anything else                       -> {"ok": false, "error": "..."}

``time`` is the server's ``time.monotonic()``, the same clock for every
process on the machine, so a client computes rates from two replies.  A
connection may carry any number of requests.

The protocol is decided by :func:`handle_request` alone, a function of the
engine and one decoded request with no I/O (the h11 habit), so every reply is
unit-testable without a socket.  :class:`ControlServer` only moves lines: its
accept loop runs in one daemon thread, each connection in another; a request
that is not JSON, too long, or makes the engine raise gets an error reply and
never stops the server.  ``stop()`` wakes the accept loop, shuts down every
open connection, joins the threads and removes the socket file.

Ownership: the engine starts the observers (this server and the Prometheus
exporter) from ``Engine.start()`` (nbdkit's ``after_fork``) through
:func:`start_observers`, and stops them from ``Engine.stop()`` through
:func:`stop_observers`.

Locking: none here; ``Engine.stats()``, ``tunables()`` and ``set_tunable()``
take the engine lock themselves.  Nothing here runs under the engine lock.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from nbdcache import log as logmod
from nbdcache.config import ConfigError

MAX_LINE = 64 * 1024            # longest request accepted
MAX_REPLY = 64 * 1024 * 1024    # longest reply a client reads
IDLE_TIMEOUT = 300.0            # an idle connection is closed after this many seconds


class ControlError(Exception):
    """The control server refused a request, or could not be reached; the message says why."""


# --------------------------------------------------------------------------- the protocol

def handle_request(engine: Any, req: Any) -> dict[str, Any]:
    """The reply to one decoded request.  Never raises; may block briefly on the engine lock."""
    if not isinstance(req, Mapping):
        return _error("expected a JSON object such as {\"op\": \"stats\"}")
    op = req.get("op")
    try:
        if op == "stats":
            return {"ok": True, "stats": engine.stats(), "time": time.monotonic()}
        if op == "tunables":
            return {"ok": True, "tunables": engine.tunables()}
        if op == "set":
            key, value = req.get("key"), req.get("value")
            if not isinstance(key, str) or not key:
                return _error("set: expected \"key\": a tunable such as \"cache.max_io\"")
            if "value" not in req or isinstance(value, (dict, list)) or value is None:
                return _error(f"{key}: expected \"value\": a number or a string such as \"4M\"")
            old, new = engine.set_tunable(key, value)
            return {"ok": True, "key": key, "old": old, "new": new}
    except ConfigError as e:
        return _error(str(e))
    except Exception as e:  # noqa: BLE001 - a reply, not a crash; logged by the caller
        return _error(f"internal error: {e!r}", internal=True)
    return _error(f"unknown op {op!r}: expected \"stats\", \"tunables\" or \"set\"")


def _error(message: str, internal: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "error": message}
    if internal:
        out["internal"] = True
    return out


def decode_line(line: bytes) -> Any:
    """The request on one line, or an error reply (a dict with ok=False) if it is not JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return _error(f"bad request: not a JSON object on one line ({e.__class__.__name__})")


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    return json.dumps(reply, default=str).encode("utf-8") + b"\n"


# --------------------------------------------------------------------------- the server

class ControlServer:
    """Serve ``handle_request`` on a Unix socket at ``path`` from daemon threads."""

    def __init__(self, engine: Any, path: str | os.PathLike[str], log: Any = None) -> None:
        self.engine = engine
        self.path = Path(path)
        self.log = log or logmod.get("control")
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Bind the socket and start the accept thread.  Raises ControlError or OSError if
        the path is unusable (not a socket, or another server listens on it).  Call after fork."""
        path = self.path
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
            os.chmod(path.parent, 0o700)        # mkdir's mode is filtered by the umask
        _remove_stale(path)
        # Bind and listen under a temporary name, then rename: the socket file appears
        # only once it accepts connections, and only with mode 0600.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tmp.unlink(missing_ok=True)
            os.fchmod(sock.fileno(), 0o600)     # Linux: bind() creates the file with this mode
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)                # elsewhere: narrow it before it is visible
            sock.listen(16)
            os.rename(tmp, path)
        except OSError as e:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, f"control socket {path}: {e.strerror}") from None
        self._listener = sock
        self._wake = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="nbdcache-control",
                                        daemon=True)
        self._thread.start()
        self.log.info("control.start", path=str(path))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join the threads, remove the socket file."""
        if self._thread is None:
            return
        self._stopping = True
        assert self._wake is not None
        self._wake[1].send(b"x")
        self._thread.join(timeout)
        with self._conns_lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in conns:
            t.join(timeout)
        for s in (self._listener, *self._wake):
            if s is not None:
                s.close()
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass
        self._thread = None
        self.log.info("control.stop", path=str(self.path))

    # -- threads -----------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None and self._wake is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake[0], selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is self._wake[0] or self._stopping:
                        return
                    try:
                        conn, _ = self._listener.accept()
                    except OSError:
                        continue
                    t = threading.Thread(target=self._connection, args=(conn,),
                                         name="nbdcache-control-conn", daemon=True)
                    with self._conns_lock:
                        self._conns[conn] = t
                    t.start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT)
            with conn.makefile("rb") as f:
                while not self._stopping:
                    line = f.readline(MAX_LINE + 1)
                    if not line:
                        break
                    if len(line) > MAX_LINE and not line.endswith(b"\n"):
                        conn.sendall(encode_reply(_error(
                            f"bad request: longer than {MAX_LINE} bytes")))
                        break
                    if not line.strip():
                        continue
                    conn.sendall(encode_reply(self._reply(line)))
        except OSError:
            pass                                # client went away, idle timeout, or stop()
        finally:
            with self._conns_lock:
                self._conns.pop(conn, None)
            conn.close()

    def _reply(self, line: bytes) -> dict[str, Any]:
        req = decode_line(line)
        if isinstance(req, dict) and req.get("ok") is False:
            return req
        reply = handle_request(self.engine, req)
        if reply.pop("internal", False):
            self.log.error("control.error", request=line[:200].decode("utf-8", "replace"),
                           error=reply["error"])
        elif not reply["ok"] and isinstance(req, dict) and req.get("op") == "set":
            self.log.info("control.set_refused", key=req.get("key"), error=reply["error"])
        return reply


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"control socket {path}: exists and is not a socket; "
                           "refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)            # stale: left by a server that was killed
        return
    except OSError:
        return                                  # let bind() report the problem
    finally:
        probe.close()
    raise ControlError(f"control socket {path}: another server is listening on it")


# --------------------------------------------------------------------------- the client

class ControlClient:
    """Requests to a ControlServer; one connection per request.  Every method may block
    up to ``timeout`` seconds and raises ControlError with the server's message."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def _missing(self, why: str = "") -> ControlError:
        return ControlError(f"no nbdcache control socket at {self.path}: is the server "
                            f"running?{why}")

    def request(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request, return the reply (ok=True); raise ControlError otherwise."""
        if not os.path.exists(self.path):
            raise self._missing()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise self._missing(" (the socket file exists but nothing listens on it)") \
                    from None
            except PermissionError:
                raise ControlError(f"{self.path}: permission denied (the control socket is "
                                   "0600: run as the server's user)") from None
            s.sendall(json.dumps(dict(req)).encode("utf-8") + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise ControlError(f"{self.path}: the server closed the connection "
                                       "without replying")
                data += chunk
                if len(data) > MAX_REPLY:
                    raise ControlError(f"{self.path}: reply longer than {MAX_REPLY} bytes")
        except socket.timeout:
            raise ControlError(f"{self.path}: no reply within {self.timeout:g}s") from None
        except ControlError:
            raise
        except OSError as e:
            raise ControlError(f"{self.path}: {e.strerror or e}") from None
        finally:
            s.close()
        try:
            reply = json.loads(data)
        except ValueError:
            raise ControlError(f"{self.path}: the reply is not JSON") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            msg = reply.get("error") if isinstance(reply, dict) else None
            raise ControlError(msg or f"{self.path}: unexpected reply {reply!r}")
        return reply

    def sample(self) -> tuple[float, dict[str, Any]]:
        """(server monotonic time, statistics)."""
        r = self.request({"op": "stats"})
        return float(r["time"]), r["stats"]

    def stats(self) -> dict[str, Any]:
        return self.request({"op": "stats"})["stats"]

    def tunables(self) -> dict[str, Any]:
        return self.request({"op": "tunables"})["tunables"]

    def set(self, key: str, value: Any) -> tuple[Any, Any]:
        """Change a live tunable; return (old, new)."""
        r = self.request({"op": "set", "key": key, "value": value})
        return r["old"], r["new"]


# --------------------------------------------------------------------------- ownership

def start_observers(engine: Any) -> list[Any]:
    """Start the control server and Prometheus exporter the engine's config asks for
    (``server.control_socket``, ``server.prometheus_port``); return them for
    :func:`stop_observers`.  If one fails to start, those started are stopped and the
    error propagates.  Call from ``Engine.start()``, after fork."""
    cfg = engine.cfg
    started: list[Any] = []
    try:
        if cfg.get("server.control_socket"):
            control = ControlServer(engine, cfg["server.control_socket"])
            control.start()
            started.append(control)
        if cfg.get("server.prometheus_port"):
            from nbdcache.metrics import PrometheusExporter
            exporter = PrometheusExporter(engine, cfg["server.prometheus_port"])
            exporter.start()
            started.append(exporter)
    except BaseException:
        stop_observers(started)
        raise
    return started


def stop_observers(observers: list[Any]) -> None:
    """Stop what :func:`start_observers` started, last first.  Blocks up to a few seconds."""
    for o in reversed(observers):
        o.stop()
