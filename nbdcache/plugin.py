"""nbdkit Python plugin (API version 2): thin callbacks in nbdkit's lifecycle order.

Run it as ``nbdkit python nbdcache/plugin.py config=FILE [KEY=VALUE ...]``, or
through ``nbdcache serve``, which also sets the interpreter and PYTHONPATH.
Every callback is a few lines that hand over to the engine; exceptions become
an errno for the client in one place (``_fail``).
"""

from __future__ import annotations

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


def get_ready() -> None:
    global _engine
    from nbdcache.engine import Engine
    try:
        _engine = Engine(_cfg)
    except (OSError, ValueError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
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
