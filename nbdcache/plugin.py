"""nbdkit Python plugin (API version 2): thin callbacks in nbdkit's lifecycle order.

Run it as ``nbdkit python nbdcache/plugin.py config=FILE [KEY=VALUE ...]``, or
through ``nbdcache serve``, which also sets the interpreter and PYTHONPATH.
Every callback is a few lines that hand over to the engine; exceptions become
an errno for the client in one place (``_fail``).  A failure before serving
(``config_complete``, ``get_ready``) prints one ``nbdcache: error: KEY: ...``
line naming the setting at fault, and nbdkit exits non-zero before it creates
its socket.

Importing this module tunes glibc's malloc for nbdkit's many worker threads
(``_tune_malloc``); nbdkit imports it before it starts any of them.
"""

from __future__ import annotations

import ctypes
import errno
import sys

import nbdkit

from nbdcache import config as configmod
from nbdcache import log as logmod

API_VERSION = 2

_config_path: str | None = None
_overrides: dict[str, str] = {}
_cfg: configmod.Config | None = None
_engine = None
_THREAD_MODELS = {
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_connections": nbdkit.THREAD_MODEL_SERIALIZE_CONNECTIONS,
}


# glibc mallopt() parameters (malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def _tune_malloc() -> None:
    """Keep freed buffers from piling up in per-thread malloc arenas.

    Measured with tests/reliability/test_load_memory.py (4 connections x 16 nbdkit
    worker threads, requests of 4K-1M, cache.ram 64M, 2 cores; /proc/PID/smaps):
    peak RSS was 409-435 MiB, of which 16 glibc arenas of ~20 MiB each held freed
    buffers.  glibc gives threads up to 8 arenas per core, and once a buffer that
    malloc had mmapped is freed it raises its mmap threshold to that size (up to
    32 MiB), so later write-back snapshots and other large buffers come from those
    arenas and stay there after free.  One arena and a fixed 128 KiB threshold
    (setting it turns the dynamic threshold off) give every large buffer its own
    mmap, returned to the OS on free: peak RSS 177-180 MiB (2 arenas: 189-194, 4:
    207-217).  Bytes moved in 12 s did not change beyond run-to-run noise (4.2-5.4
    GiB tuned, 4.8-5.1 GiB untuned, on a shared machine).  What remains is not
    malloc's to give back: see the xfail in test_load_memory.py.

    Must run before nbdkit starts its threads (a thread picks its arena when it
    first allocates).  A C library without mallopt (not glibc) is left alone.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_ARENA_MAX, 1)
    mallopt(M_MMAP_THRESHOLD, 128 * 1024)


_tune_malloc()


def _fail(e: BaseException) -> None:
    """Map an exception to the errno the client sees, then let nbdkit report it."""
    code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
    nbdkit.set_error(code)
    if not isinstance(e, OSError):
        nbdkit.debug(f"nbdcache: unexpected {e!r}")
    raise e


class StartupError(Exception):
    """A configuration or backend problem found before serving; nbdkit exits non-zero."""


def _startup_error(msg: str) -> StartupError:
    print(f"nbdcache: error: {msg}", file=sys.stderr, flush=True)
    return StartupError(msg)


# -- configuration ---------------------------------------------------------------------

def config(key: str, value: str) -> None:
    global _config_path
    if key == "config":
        _config_path = value
    else:
        _overrides[key] = value


def config_complete() -> None:
    global _cfg
    try:
        _cfg = configmod.load(_config_path, _overrides)
    except configmod.ConfigError as e:
        raise _startup_error(str(e)) from None
    try:
        logmod.configure(_cfg["log.level"], _cfg["log.file"], _cfg["log.format"])
    except OSError as e:
        raise _startup_error(f"log.file {_cfg['log.file']!r}: {e.strerror}") from None


def config_help() -> str:
    return configmod.config_help()


def thread_model() -> int:
    return _THREAD_MODELS[_cfg["server.thread_model"]] if _cfg else nbdkit.THREAD_MODEL_PARALLEL


def _reason(e: BaseException) -> str:
    """The message of a startup exception (an OSError's strerror carries the key)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _names_key(msg: str) -> bool:
    return msg.split(":")[0].split(" ")[0] in configmod.BY_KEY


def get_ready() -> None:
    """Open the backend, then the engine (swap, the arena); a failure is a StartupError
    naming the key: messages that name none are put against backend.type for the
    backend, and against cache.ram when memory runs out (the arena is one mmap of
    cache.ram bytes).  Blocks opening the backend."""
    global _engine
    from nbdcache.backend import open_backend
    from nbdcache.engine import Engine
    startup = (OSError, ValueError, MemoryError, OverflowError)
    try:
        backend = open_backend(_cfg)
    except startup as e:
        msg = _reason(e)
        if not _names_key(msg):
            msg = f"backend.type {_cfg['backend.type']}: {msg}"
        raise _startup_error(msg) from None
    try:
        _engine = Engine(_cfg, backend)
    except startup as e:
        backend.close()
        msg = _reason(e)
        out_of_memory = isinstance(e, (MemoryError, OverflowError)) or \
            (isinstance(e, OSError) and e.errno == errno.ENOMEM)
        if out_of_memory and not _names_key(msg):
            ram = _cfg["cache.ram"]
            msg = (f"cache.ram: got {ram} ({configmod.format_size(ram)}), expected a "
                   f"size this process can allocate ({msg})")
        raise _startup_error(msg) from None


def after_fork() -> None:
    _engine.start()


def cleanup() -> None:
    if _engine is not None:
        _engine.stop()


# -- connections ---------------------------------------------------------------------------

def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's callback name
    return 1


def close(h: int) -> None:
    pass


def get_size(h: int) -> int:
    return _engine.size


def block_size(h: int) -> tuple[int, int, int]:
    return (1, 4096, 32 * 1024 * 1024)


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_fua(h: int) -> int:
    return nbdkit.FUA_NATIVE


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_fast_zero(h: int) -> bool:
    return bool(_engine.backend.can_zero)


def can_multi_conn(h: int) -> bool:
    return True


def can_cache(h: int) -> int:
    return nbdkit.CACHE_NATIVE


# -- requests --------------------------------------------------------------------------

def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    try:
        _engine.pread(buf, offset)
    except Exception as e:  # noqa: BLE001 - mapped to errno in one place
        _fail(e)


def pwrite(h: int, buf: memoryview, offset: int, flags: int) -> None:
    try:
        _engine.pwrite(buf, offset, bool(flags & nbdkit.FLAG_FUA))
    except Exception as e:  # noqa: BLE001
        _fail(e)


def flush(h: int, flags: int) -> None:
    try:
        _engine.flush()
    except Exception as e:  # noqa: BLE001
        _fail(e)


def trim(h: int, count: int, offset: int, flags: int) -> None:
    try:
        _engine.trim(offset, count, bool(flags & nbdkit.FLAG_FUA))
    except Exception as e:  # noqa: BLE001
        _fail(e)


def zero(h: int, count: int, offset: int, flags: int) -> None:
    try:
        if flags & nbdkit.FLAG_FAST_ZERO and not _engine.backend.can_zero:
            raise OSError(errno.ENOTSUP, "fast zero is not supported by this backend")
        _engine.zero(offset, count, bool(flags & nbdkit.FLAG_FUA))
    except Exception as e:  # noqa: BLE001
        _fail(e)


def cache(h: int, count: int, offset: int, flags: int) -> None:
    try:
        _engine.prefetch(offset, count)
    except Exception as e:  # noqa: BLE001
        _fail(e)
