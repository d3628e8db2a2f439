"""Configuration: one tunables table, one YAML file, key=value overrides.

Theory of operation
-------------------
``TUNABLES`` below is the only place a setting is declared.  Each entry names
its dotted YAML key, its type, its unit, its default (a value, or ``None`` when
``bufinit()`` derives it from the RAM budget), its kernel ancestor where there
is one, whether it may change while the server runs (``live``) or only at
startup, and a one-line meaning.  From that table come:

* parsing and validation (:func:`load`), for the YAML file and for nbdkit
  ``key=value`` / ``nbdcache serve --set key=value`` overrides alike;
* the text of nbdkit's ``config_help`` (:func:`config_help`);
* ``docs/tunables.md`` (:func:`tunables_markdown`), which a test compares with
  the committed file so that the docs cannot drift.

Every error is a :class:`ConfigError` whose message names the key, the value
and what was expected.  Values are shown by a bounded ``repr`` (:func:`show`,
at most 80 characters), so a huge value cannot flood the message.  Lo/high
pairs are validated together, here at startup and again by the engine on a live
change (:func:`check_pairs`).

An empty value (``key:`` with nothing after it, YAML's null) means "use the
default": a key with a default keeps it and a derived key stays derived.  An
empty section (``cache:`` alone) is a section without settings.

The YAML file is untrusted input of bounded size: it is composed into nodes
first and refused, naming the file and the key under which it happens, when
its node graph, aliases expanded, holds more than ``MAX_NODES`` nodes or nests
deeper than ``MAX_DEPTH`` (an alias bomb is a few hundred bytes that expand
into gigabytes); only then are Python values constructed.  Sizes are refused
when no disk or memory could hold them: any size of 2^63 bytes or more (the
largest file offset is 2^63-1), and a ``cache.ram`` or memory backend larger
than the machine's memory (:func:`machine_memory`).

Nothing here touches the cache: derived sizes are computed by
``nbdcache.core.bufinit.bufinit`` from the validated values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SECTOR = 4 * KiB


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


#: Sizes must be below this: the largest file offset is 2^63-1 (off_t is signed 64-bit).
MAX_SIZE = 1 << 63
_TOO_BIG = "a size below 8E (2^63 bytes; the largest file offset is 2^63-1)"
#: Bounds on a YAML file's node graph, aliases expanded (a real configuration has
#: about a hundred nodes, four levels deep).
MAX_NODES = 10000
MAX_DEPTH = 32

_SHOW_WIDTH = 80
_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = _repr.maxlong = _SHOW_WIDTH
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def show(value: Any) -> str:
    """``repr(value)`` for a message, at most 80 characters ("..." marks a cut).

    The work is bounded too (reprlib stops at 3 levels and 8 items a level), so a
    deeply shared structure is never expanded to be printed.  Does not block.
    """
    try:
        text = _repr.repr(value)
    except ValueError:               # an int past sys.get_int_max_str_digits()
        text = f"<{type(value).__name__} of {value.bit_length()} bits>"
    return text if len(text) <= _SHOW_WIDTH else text[:_SHOW_WIDTH - 3] + "..."


def machine_memory() -> int:
    """Bytes of physical memory of this machine (sysconf), the bound on RAM budgets."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- value parsers

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_SIZE_MULT = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(value: Any) -> int:
    """Parse ``4096``, ``"64K"``, ``"1G"``, ``"512MiB"`` into bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError("a size such as 64K, 16M or 1G")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size that is not negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and len(m.group(1).lstrip("0")) > 19:     # >= 10^19 > 2^63, and int() of
            raise ValueError(_TOO_BIG)                 # 4300+ digits would raise
        if m:
            return int(m.group(1)) * _SIZE_MULT[m.group(2).lower()]
    raise ValueError("a size such as 64K, 16M or 1G")


_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_duration(value: Any) -> float:
    """Parse ``1``, ``2.5``, ``"500ms"``, ``"10s"``, ``"1m"`` into seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 500ms, 1s or 2m")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError("a duration that is finite and not negative")
        return float(value)
    if isinstance(value, str):
        m = _DUR_RE.match(value)
        if m:
            scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
            return float(m.group(1)) * scale
    raise ValueError("a duration such as 500ms, 1s or 2m")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,30}\s*", value):
        return int(value)
    raise ValueError("a whole number")


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError("true or false")


def parse_devices(value: Any) -> list[dict[str, Any]]:
    """Swap devices: a list of ``{path, size, create}`` mappings, or ``PATH:SIZE[,PATH:SIZE]``."""
    if isinstance(value, str):
        items: list[Any] = []
        for part in value.split(","):
            path, sep, size = part.strip().rpartition(":")
            items.append({"path": path, "size": size} if sep else {"path": size})
        value = items
    if not isinstance(value, list) or not value:
        raise ValueError("a non-empty list of devices, each {path: FILE, size: SIZE}")
    out = []
    for i, d in enumerate(value):
        if isinstance(d, str):
            d = {"path": d}
        if not isinstance(d, Mapping):
            raise ValueError(f"device {i}: a mapping {{path: FILE, size: SIZE}}")
        unknown = set(d) - {"path", "size", "create"}
        if unknown:
            raise ValueError(f"device {i}: only path, size and create "
                             f"(not {', '.join(sorted(map(str, unknown)))})")
        path = d.get("path")
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError(f"device {i}: a path to a file or block device")
        size = d.get("size")
        out.append({"path": path,
                    "size": None if size in (None, "") else parse_size(size),
                    "create": parse_bool(d.get("create", True))})
    if len({d["path"] for d in out}) != len(out):
        raise ValueError("distinct paths (a device is listed twice)")
    return out


def parse_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("a string")


def parse_path(value: Any) -> str:
    """A file name: a string without NUL bytes (the OS cannot take one)."""
    path = parse_str(value)
    if "\0" in path:
        raise ValueError("a path without NUL bytes")
    return path


# --------------------------------------------------------------------------- the table

STARTUP = "startup"
LIVE = "live"


@dataclasses.dataclass(frozen=True)
class Tunable:
    key: str
    kind: str                      # size | int | duration | bool | str | path | enum
    default: Any                   # None: derived (see ``derivation``) or unset
    help: str
    ancestor: str = ""             # the kernel variable it descends from
    unit: str = ""
    mutability: str = STARTUP
    derivation: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def parser(self) -> Callable[[Any], Any]:
        if self.kind == "enum":
            def parse_enum(v: Any) -> str:
                if isinstance(v, str) and v.lower() in self.choices:
                    return v.lower()
                raise ValueError("one of " + ", ".join(self.choices))
            return parse_enum
        return {
            "size": parse_size, "int": parse_int, "duration": parse_duration,
            "bool": parse_bool, "str": parse_str, "path": parse_path,
            "devices": parse_devices,
        }[self.kind]


_T = Tunable
TUNABLES: tuple[Tunable, ...] = (
    # -- the disk behind the cache
    _T("backend.type", "enum", "file", "What holds the guest's data: a raw image file or block "
       "device, a remote NBD export, or volatile memory (tests and benchmarks).",
       choices=("file", "nbd", "memory")),
    _T("backend.path", "path", None, "Image file or block device (backend.type=file). Relative "
       "paths resolve against the config file's directory."),
    _T("backend.size", "size", None, "Size of the disk. Required to create a missing image and for "
       "the memory backend; if the image exists it must match.", unit="bytes", minimum=SECTOR),
    _T("backend.create", "bool", True, "Create a missing image file (sparse) at backend.size."),
    _T("backend.uri", "str", None, "NBD URI of the remote export (backend.type=nbd): nbd://, "
       "nbd+unix:// or nbds:// (TLS; certificates via ?tls-certificates=DIR)."),
    _T("backend.connections", "int", 4, "Connections opened to an NBD backend (a flush is sent on "
       "each unless the server advertises multi-conn).", minimum=1, maximum=64),
    _T("backend.retry_timeout", "duration", 60.0, "How long a failed request to an NBD backend "
       "is retried (reconnecting) before the error is returned; write-back keeps the data "
       "dirty and retries anyway.", unit="seconds", mutability=LIVE, minimum=0, maximum=3600),
    _T("backend.io_threads", "int", 4, "Threads that carry out background backend I/O "
       "(write-back clusters, read-ahead).", minimum=1, maximum=64),
    # -- the buffer cache
    _T("cache.block_size", "size", 64 * KiB, "Size of one buffer: the unit of caching, eviction and "
       "write-back. A power of two from 4K to 1M.", ancestor="MAXBSIZE", unit="bytes"),
    _T("cache.ram", "size", 256 * MiB, "RAM budget for buffer data, allocated once at startup "
       "(the arena). Every watermark below derives from it.", ancestor="maxbufspace",
       unit="bytes"),
    _T("cache.hibufspace", "size", None, "Buffer space above which getnewbuf recycles clean "
       "buffers instead of taking empty ones.", ancestor="hibufspace", unit="bytes",
       derivation="max(3*ram/4, ram - 10*block_size)"),
    _T("cache.lobufspace", "size", None, "Buffer space recycling brings bufspace back down to.",
       ancestor="lobufspace", unit="bytes",
       derivation="hibufspace*7/8, at least hibufspace-64M, at most hibufspace-block_size"),
    _T("cache.hidirtybufspace", "size", None, "Dirty plus running bytes at which guest writes "
       "are held in bd_wait until write-back makes progress.", ancestor="hidirtybufspace",
       unit="bytes", mutability=LIVE, derivation="hibufspace/2"),
    _T("cache.lodirtybufspace", "size", None, "Dirty plus running bytes the flush daemons aim "
       "for (each stops at half of it).", ancestor="lodirtybufspace", unit="bytes",
       mutability=LIVE, derivation="hidirtybufspace/2"),
    _T("cache.hirunningspace", "size", None, "Write-back bytes in flight to the backend; the "
       "daemons pause above 4/6 of it.", ancestor="hirunningspace", unit="bytes",
       mutability=LIVE, derivation="max(hibufspace/16, 1M)"),
    _T("cache.flushperqueue", "int", 1024, "Buffers one flushbufqueues pass may take from a "
       "dirty queue.", ancestor="flushperqueue", unit="buffers", mutability=LIVE,
       minimum=1),
    _T("cache.max_io", "size", 1 * MiB, "Largest backend write a write-back cluster may form "
       "(cluster_awrite's bound). A multiple of block_size.", ancestor="MAXPHYS",
       unit="bytes", mutability=LIVE),
    _T("cache.readahead", "int", 4, "Blocks read ahead when a sequential read stream is "
       "detected (breadn); 0 disables.", ancestor="breadn", unit="blocks", mutability=LIVE,
       minimum=0, maximum=256),
    _T("cache.daemon_interval", "duration", 1.0, "How often the flush daemons wake without "
       "being kicked.", ancestor="tsleep(bd_req, hz)", unit="seconds", mutability=LIVE,
       minimum=0.01, maximum=60),
    _T("cache.flush_on_shutdown", "bool", True, "Write back every dirty block before the "
       "server exits on SIGTERM/SIGINT."),
    # -- the swap pager
    _T("swap.devices", "devices", None, "Swap devices that blocks evicted from RAM spill to: "
       "a list of {path, size, create} (create defaults to true; a missing file is created "
       "sparse). Unset: no swap. Contents never survive a restart.", ancestor="swapdev"),
    _T("swap.spill", "enum", "both", "What evicted blocks go to swap: clean (a copy cheaper "
       "than the backend: the swapcache), dirty (instead of waiting for the backend), both, "
       "or off.", ancestor="vm.swapcache", mutability=LIVE,
       choices=("both", "clean", "dirty", "off")),
    _T("swap.dmmax", "int", 32, "Stripe of swap slots: consecutive stripes go to consecutive "
       "devices and no I/O crosses one.", ancestor="dmmax", unit="slots", minimum=1,
       maximum=1 << 20),
    _T("swap.cluster_max", "int", 16, "Most blocks one page-out writes in one I/O.",
       ancestor="nsw_cluster_max", unit="blocks", minimum=1, maximum=32),
    _T("swap.swap_async_max", "int", 4, "Page-out I/Os the flush daemons may have in flight "
       "(a smaller value is applied once the extra credits are back).",
       ancestor="vm.swap_async_max", unit="I/Os", mutability=LIVE, minimum=1, maximum=64),
    _T("swap.nswap_lowat", "int", None, "Free slots below which swap is almost full: dirty "
       "spill stops and clean copies are reclaimed first.", ancestor="nswap_lowat",
       unit="slots", mutability=LIVE, minimum=0,
       derivation="1% of the slots, at least 2*cluster_max"),
    _T("swap.nswap_hiwat", "int", None, "Free slots above which almost-full clears.",
       ancestor="nswap_hiwat", unit="slots", mutability=LIVE, minimum=1,
       derivation="4*nswap_lowat, at most half the slots"),
    # -- the nbdkit server
    _T("server.thread_model", "enum", "parallel", "nbdkit thread model for this plugin.",
       choices=("parallel", "serialize_requests", "serialize_all_requests",
                "serialize_connections")),
    _T("server.threads", "int", 16, "nbdkit worker threads per connection (nbdkit --threads); "
       "used by `nbdcache serve`.", minimum=1, maximum=1024),
    _T("server.socket", "path", None, "Unix socket `nbdcache serve` listens on (default "
       "var/run/nbdcache.sock beside the config); its directory is created 0700."),
    _T("server.port", "int", None, "TCP port `nbdcache serve` listens on instead of a socket "
       "(loopback only).", minimum=1, maximum=65535),
    _T("server.control_socket", "path", None, "Unix socket for `nbdcache stats` and `nbdcache "
       "set` (default: the export socket's path with .ctl appended; its directory is 0700)."),
    _T("server.prometheus_port", "int", 0, "Serve Prometheus text metrics on 127.0.0.1:PORT "
       "(0: off).", minimum=0, maximum=65535),
    # -- logging
    _T("log.level", "enum", "info", "Lowest structlog level written. Per-request events are "
       "debug only.", choices=("debug", "info", "warning", "error")),
    _T("log.file", "path", None, "File that receives JSON log lines (default: stderr)."),
    _T("log.format", "enum", "json", "json: one JSON object a line; console: human-readable.",
       choices=("json", "console")),
    _T("log.stats_interval", "duration", 10.0, "Period of the `stats` log event carrying every "
       "counter (0 disables; one is always written at close).", unit="seconds",
       mutability=LIVE),
)

BY_KEY: dict[str, Tunable] = {t.key: t for t in TUNABLES}
PATH_KEYS = {t.key for t in TUNABLES if t.kind == "path"}

#: Lo/high pairs validated together: (lo, hi, relation text).
PAIRS: tuple[tuple[str, str], ...] = (
    ("cache.lobufspace", "cache.hibufspace"),
    ("cache.lodirtybufspace", "cache.hidirtybufspace"),
)


# --------------------------------------------------------------------------- loading

@dataclasses.dataclass
class Config:
    """Validated settings: ``values`` maps every key of ``TUNABLES`` to a value or None."""

    values: dict[str, Any]
    source: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        v = self.values.get(key)
        return default if v is None else v


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to values from the nested mappings of a YAML file (already bounded in
    size by :func:`_check_nodes`)."""
    if not isinstance(tree, Mapping):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {show(tree)}")
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if not isinstance(k, str):
            raise ConfigError(f"{prefix}{show(k)}: keys must be strings")
        key = prefix + k
        if isinstance(v, Mapping):
            if key in BY_KEY:
                raise ConfigError(f"{key}: expected a single value, got a mapping")
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, BY_KEY, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{key}: unknown setting{hint}; see `nbdcache check-config --help` "
                       "or docs/tunables.md")


def parse_value(key: str, raw: Any) -> Any:
    """Parse and range-check one value for ``key``; raise ConfigError naming both.

    An empty value (None) returns None, which :func:`load` reads as "keep the
    default"; so does an empty section.  Does not block.
    """
    t = BY_KEY.get(key)
    if t is None:
        section = [k for k in BY_KEY if k.startswith(key + ".")]
        if section and raw is None:
            return None
        if section:
            raise ConfigError(f"{key}: got {show(raw)}, expected a mapping of settings such "
                              f"as {', '.join(section[:3])}")
        raise _unknown(key)
    if raw is None:
        return None
    try:
        value = t.parser(raw)
    except ValueError as e:
        raise ConfigError(f"{key}: got {show(raw)}, expected {e}") from None
    if t.kind == "size" and value >= MAX_SIZE:
        raise ConfigError(f"{key}: got {show(raw)}, expected {_TOO_BIG}")
    if t.minimum is not None and value < t.minimum:
        raise ConfigError(f"{key}: got {show(raw)}, expected at least {t.minimum:g}")
    if t.maximum is not None and value > t.maximum:
        raise ConfigError(f"{key}: got {show(raw)}, expected at most {t.maximum:g}")
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    """The flattened settings of the YAML file ``path``; raises ConfigError naming it.

    The document is composed into nodes, bounded by :func:`_check_nodes`, and
    only then constructed (with the safe constructor: tags that build Python
    objects are errors).  Blocks reading the file.
    """
    name = repr(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {name} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {name} is not UTF-8 text: byte "
                          f"0x{e.object[e.start]:02x} at offset {e.start}") from None
    try:
        tree = _load_bounded(text, name)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {name} is not valid YAML: {e}") from None
    except ValueError as e:          # a scalar YAML cannot construct: a 5000-digit int, ...
        raise ConfigError(f"config file {name} is not valid YAML: {show(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"config file {name} is nested too deeply") from None
    return {} if tree is None else _flatten(tree)


def _load_bounded(text: str, name: str) -> Any:
    """yaml.safe_load with :func:`_check_nodes` between composing and constructing."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, name)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, name: str) -> None:
    """Refuse a node graph that, aliases expanded, holds more than MAX_NODES nodes or is
    deeper than MAX_DEPTH; the message names the file and the dotted key where the bound
    was crossed.  Visits at most MAX_NODES + 1 nodes, so a bomb fails fast."""
    count = 0
    stack: list[tuple[yaml.Node, int, str]] = [(root, 0, "")]
    while stack:
        node, depth, where = stack.pop()
        count += 1
        at = where[:_SHOW_WIDTH] or "the top level"
        if count > MAX_NODES:
            raise ConfigError(f"config file {name}: {at}: more than {MAX_NODES} YAML nodes "
                              "once aliases are expanded, expected a small configuration "
                              "(an alias bomb?)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"config file {name} is nested too deeply ({at}: more than "
                              f"{MAX_DEPTH} levels)")
        if isinstance(node, yaml.MappingNode):
            for k, v in reversed(node.value):
                key = k.value if isinstance(k, yaml.ScalarNode) else "?"
                sub = f"{where}.{key}" if where else str(key)
                stack.append((v, depth + 1, sub))
                stack.append((k, depth + 1, sub))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, depth + 1, where) for v in reversed(node.value))


def parse_override(text: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` as given to ``--set`` or on nbdkit's command line."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{text!r}: expected KEY=VALUE, for example cache.ram=64M")
    return key.strip(), value.strip()


def load(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load the YAML file ``path`` (may be None), apply ``overrides``, validate everything.

    Relative paths resolve against the config file's directory (or the current
    directory when there is no file).  Raises ConfigError.  Does not block.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    source = None
    if path is not None:
        source = Path(path).resolve()
        base = source.parent
        raw.update(read_yaml(source))
    for k, v in (overrides or {}).items():
        raw[k] = v
    values: dict[str, Any] = {t.key: t.default for t in TUNABLES}
    for key, v in raw.items():
        value = parse_value(key, v)
        if value is not None:            # None: an empty value, the default stays
            values[key] = value
    for key in PATH_KEYS:
        if values[key]:
            p = Path(os.path.expanduser(values[key]))
            values[key] = str(p if p.is_absolute() else (base / p))
    for dev in values["swap.devices"] or ():
        p = Path(os.path.expanduser(dev["path"]))
        dev["path"] = str(p if p.is_absolute() else (base / p))
    cfg = Config(values, source)
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: Config) -> None:
    v = cfg.values
    bs = v["cache.block_size"]
    if bs < SECTOR or bs > MiB or bs & (bs - 1):
        raise ConfigError(f"cache.block_size: got {bs}, expected a power of two from 4K to 1M")
    if v["cache.ram"] < 16 * bs:
        raise ConfigError(f"cache.ram: got {v['cache.ram']}, expected at least 16 blocks "
                          f"({16 * bs} bytes with cache.block_size={bs})")
    memory = machine_memory()
    if v["cache.ram"] > memory:
        raise ConfigError(f"cache.ram: got {v['cache.ram']} ({_human(v['cache.ram'])}), "
                          f"expected at most the machine's memory ({memory} bytes, "
                          f"{_human(memory)})")
    if v["cache.max_io"] < bs or v["cache.max_io"] % bs or v["cache.max_io"] > 32 * MiB:
        raise ConfigError(f"cache.max_io: got {v['cache.max_io']}, expected a multiple of "
                          f"cache.block_size ({bs}) no larger than 32M")
    btype = v["backend.type"]
    if btype == "file" and not v["backend.path"]:
        raise ConfigError("backend.path: missing, expected the image file or block device "
                          "for backend.type=file")
    if btype == "nbd":
        uri = v["backend.uri"]
        if not uri:
            raise ConfigError("backend.uri: missing, expected an NBD URI for backend.type=nbd")
        if not re.match(r"^nbds?(\+unix|\+tcp)?://", uri):
            raise ConfigError(f"backend.uri: got {show(uri)}, expected nbd://, nbd+unix:// "
                              "or nbds:// URI")
    if btype == "memory" and not v["backend.size"]:
        raise ConfigError("backend.size: missing, expected the disk size for "
                          "backend.type=memory")
    if btype == "memory" and v["backend.size"] > memory:
        raise ConfigError(f"backend.size: got {v['backend.size']} "
                          f"({_human(v['backend.size'])}), expected at most the machine's "
                          f"memory ({memory} bytes, {_human(memory)}) for backend.type=memory")
    if v["backend.size"] is not None and v["backend.size"] % 512:
        raise ConfigError(f"backend.size: got {v['backend.size']}, expected a multiple of 512")
    lo, hi = v["swap.nswap_lowat"], v["swap.nswap_hiwat"]
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"swap.nswap_lowat: got {lo}, expected less than swap.nswap_hiwat "
                          f"({hi})")
    if v["server.socket"] and v["server.port"]:
        raise ConfigError("server.socket and server.port: both given, expected one of them")
    # Derived watermarks may be overridden; check that the pairs still make sense.
    from nbdcache.core.bufinit import bufinit
    check_pairs(bufinit(cfg))


def _human(n: int) -> str:
    """``n`` bytes in the largest binary unit, one decimal: 4.0T, 23.5G."""
    for unit, mult in (("E", 1 << 60), ("P", 1 << 50), ("T", 1 << 40), ("G", GiB),
                       ("M", MiB), ("K", KiB)):
        if n >= mult:
            return f"{n / mult:.1f}{unit}"
    return f"{n}B"


def check_pairs(params: Mapping[str, int]) -> None:
    """Raise ConfigError unless every lo/high pair is ordered and within the arena."""
    for lo, hi in PAIRS:
        lo_k, hi_k = lo.split(".")[1], hi.split(".")[1]
        if params[lo_k] >= params[hi_k]:
            raise ConfigError(f"{lo}: got {params[lo_k]}, expected less than {hi} "
                              f"({params[hi_k]})")
    if params["hibufspace"] > params["maxbufspace"]:
        raise ConfigError(f"cache.hibufspace: got {params['hibufspace']}, expected at most "
                          f"cache.ram ({params['maxbufspace']})")
    if params["lobufspace"] < params["block_size"]:
        raise ConfigError(f"cache.lobufspace: got {params['lobufspace']}, expected at least one "
                          f"block ({params['block_size']})")
    if params["hidirtybufspace"] > params["hibufspace"]:
        raise ConfigError(f"cache.hidirtybufspace: got {params['hidirtybufspace']}, expected at "
                          f"most cache.hibufspace ({params['hibufspace']})")
    if params["lodirtybufspace"] < params["block_size"]:
        raise ConfigError(f"cache.lodirtybufspace: got {params['lodirtybufspace']}, expected at "
                          f"least one block ({params['block_size']})")
    if params["hirunningspace"] < params["block_size"]:
        raise ConfigError(f"cache.hirunningspace: got {params['hirunningspace']}, expected at "
                          f"least one block ({params['block_size']})")


# --------------------------------------------------------------------------- generated text

def _fmt_default(t: Tunable) -> str:
    if t.derivation:
        return "derived: " + t.derivation
    if t.default is None:
        return "(unset)"
    if t.kind == "size":
        return format_size(t.default)
    if t.kind == "duration":
        return f"{t.default:g}s"
    if t.kind == "bool":
        return "true" if t.default else "false"
    return str(t.default)


def format_size(n: int) -> str:
    for unit, mult in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def config_help() -> str:
    """The text nbdkit prints for ``nbdkit python plugin.py --help``."""
    lines = ["config=FILE            YAML configuration file (see docs/tunables.md)."]
    for t in TUNABLES:
        lines.append(f"{t.key}=<{t.kind}>")
        lines.append(f"    {t.help} Default: {_fmt_default(t)}.")
    return "\n".join(lines)


def tunables_markdown() -> str:
    """The body of docs/tunables.md, generated from TUNABLES."""
    out = [
        "# Tunables",
        "",
        "Generated from `nbdcache/config.py` by `nbdcache tunables --markdown`; a test fails "
        "when this file and the table differ. Set them in the YAML file (nested by the dotted "
        "key), with `nbdcache serve --set KEY=VALUE`, or as nbdkit `KEY=VALUE` arguments. "
        "Sizes take K, M, G, T suffixes (binary); durations take ms, s, m.",
        "",
        "| key | type | default or derivation | unit | kernel ancestor | changes | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in TUNABLES:
        kind = t.kind + (" (" + ", ".join(t.choices) + ")" if t.choices else "")
        out.append(f"| `{t.key}` | {kind} | {_fmt_default(t)} | {t.unit} | "
                   f"{('`' + t.ancestor + '`') if t.ancestor else ''} | {t.mutability} | "
                   f"{t.help} |")
    out += [
        "",
        "## How the watermarks relate (worked example)",
        "",
    ]
    out += _worked_example()
    return "\n".join(out)


def _worked_example(ram: int = 256 * MiB, bs: int = 64 * KiB) -> list[str]:
    from nbdcache.core.bufinit import bufinit, midpoints
    p = bufinit({"cache.ram": ram, "cache.block_size": bs})
    mid1, mid2 = midpoints(p)

    def m(n: int) -> str:
        return f"{n / MiB:.1f}M"

    return [
        f"With `cache.ram: {format_size(ram)}` and `cache.block_size: {format_size(bs)}` (the "
        f"defaults), `bufinit()` gives {p['nbuf']} buffers and:",
        "",
        "```",
        f"maxbufspace     = {m(p['maxbufspace'])}   cache.ram, whole buffers",
        f"hibufspace      = {m(p['hibufspace'])}   max(3/4 of it, it - 10 buffers)",
        f"lobufspace      = {m(p['lobufspace'])}   hibufspace*7/8",
        f"hidirtybufspace = {m(p['hidirtybufspace'])}   hibufspace/2",
        f"lodirtybufspace = {m(p['lodirtybufspace'])}    hidirtybufspace/2",
        f"hirunningspace  = {m(p['hirunningspace'])}    max(hibufspace/16, 1M)",
        f"mid1            = {m(mid1)}    lodirty + (hidirty-lodirty)/2",
        f"mid2            = {m(mid2)}   mid1 + (hidirty-mid1)/2",
        "```",
        "",
        f"Once dirty+running bytes reach {m(mid1)} (mid1), every newly dirtied buffer kicks the "
        f"flush daemons. Past {m(mid2)} (mid2) a guest write waits in `bd_wait` until "
        "write-back has retired about as many bytes as the excess, and goes on waiting while "
        f"the total is above {m(p['hidirtybufspace'])} (hidirtybufspace). Each daemon then "
        f"writes back until dirty+running is at {m(p['lodirtybufspace'] // 2)} "
        "(lodirtybufspace/2), pausing whenever more than "
        f"{m(p['hirunningspace'] * 4 // 6)} (4/6 of hirunningspace) is in flight, and polls "
        f"once a second. When bufspace reaches {m(p['hibufspace'])}, getnewbuf recycles clean "
        f"buffers until it is below {m(p['lobufspace'])}; the "
        f"{(p['maxbufspace'] - p['hibufspace']) // KiB}K between hibufspace and the end of the "
        "arena is kept for `buf_daemon_hw`.",
        "",
    ]
