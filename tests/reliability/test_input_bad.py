"""Bad input: configurations, NBD requests and export names that must be refused cleanly.

* A corpus of bad YAML files, each given to a real nbdkit: it must exit non-zero
  before listening (no socket), with an ``nbdcache: error:`` line that names the
  problem (the key, or the file).  tests/test_config.py checks the loader in
  process; this goes through nbdkit and covers what only shows there (the
  backend, the arena, the log file, encodings, resource exhaustion).
* Hypothesis draws values for every real key: the loader raises nothing but
  ConfigError, and through nbdkit a refused configuration always comes with an
  ``nbdcache: error:`` line.
* Malformed NBD requests with libnbd's strict mode off (out of range, zero
  length, larger than the advertised maximum, unknown flags) get the protocol's
  errno, and the server stays up.
* Export names are never used to build paths: names such as ``../../etc/passwd``
  open nothing and create nothing.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import nbd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliakit import MiB

from nbdcache import config as configmod
from nbdcache.cli import PLUGIN, plugin_env

MEM = "backend: {type: memory, size: 16M}\n"


def nbdkit_config(path: Path, sock: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run nbdkit on config ``path``; a valid one serves, runs `true` and exits 0."""
    return subprocess.run(["nbdkit", "-f", "-U", str(sock), "python", str(PLUGIN),
                           f"config={path}", "--run", "true"], env=plugin_env(),
                          capture_output=True, timeout=timeout)


def bomb(levels: int) -> str:
    lines = [MEM.strip(), "cache:", "  ram:", '    - &a ["lol","lol","lol","lol","lol","lol",'
             '"lol","lol","lol"]']
    prev = "a"
    for i in range(1, levels):
        name = f"l{i}"
        lines.append(f"    - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n"


def deep_list(n: int) -> str:
    return "[" * n + "]" * n


def deep_map(n: int) -> str:
    return "a: {" * n + "1" + "}" * n


# (id, config text ({tmp} is the test's directory), text the error must contain, xfail reason)
CORPUS = [
    ("syntax-unclosed-brace", "backend: {path: d.img, size: 64M\n", "not valid YAML", None),
    ("syntax-tab-indent", "backend:\n\tpath: d.img\n", "not valid YAML", None),
    ("syntax-bad-scalar", "cache: {ram: 64M]\n" + MEM, "not valid YAML", None),
    ("not-a-mapping", "- backend\n- cache\n", "expected a mapping", None),
    ("section-not-mapping", MEM + "cache: 5\n", "cache: got 5", None),
    ("wrong-type-size", MEM + "cache: {ram: lots}\n", "cache.ram: got 'lots'", None),
    ("wrong-type-bool", MEM + "cache: {ram: true}\n", "cache.ram", None),
    ("wrong-type-list", MEM + "cache: {readahead: [1, 2]}\n", "cache.readahead", None),
    ("wrong-type-duration", MEM + "cache: {daemon_interval: soon}\n", "cache.daemon_interval",
     None),
    ("negative-size", "backend: {path: d.img, size: -64}\n", "backend.size: got -64", None),
    ("negative-size-string", MEM + "cache: {ram: -5M}\n", "cache.ram", None),
    ("negative-int", MEM + "backend: {connections: -1}\n", "backend.connections", None),
    ("negative-duration", MEM + "cache: {daemon_interval: -1}\n", "cache.daemon_interval",
     None),
    ("nan-duration", MEM + "cache: {daemon_interval: .nan}\n", "cache.daemon_interval", None),
    ("huge-threads", MEM + "server: {threads: 99999999999999999999999}\n", "server.threads",
     None),
    ("huge-ram-enomem", MEM + "cache: {ram: 4T}\n", "cache.ram", None),
    ("huge-ram-overflow", MEM + "cache: {ram: 99999999999999999999999T}\n", "cache.ram", None),
    ("huge-memory-backend", "backend: {type: memory, size: 100000T}\n", "backend.size", None),
    ("huge-file-backend", "backend: {path: '{tmp}/huge.img', size: 100000T}\n", "backend.size",
     None),
    ("lo-above-hi", MEM + "cache: {lodirtybufspace: 64M, hidirtybufspace: 1M}\n",
     "expected less than", None),
    ("block-size-not-power-of-two", MEM + "cache: {block_size: 3000}\n", "power of two", None),
    ("size-not-multiple-of-512", "backend: {path: d.img, size: 10000}\n", "multiple of 512",
     None),
    ("unknown-key", MEM + "cache: {rma: 64M}\n", "did you mean cache.ram", None),
    ("unknown-section", MEM + "frobnicate: {x: 1}\n", "frobnicate.x: unknown setting", None),
    ("python-object-tag", "!!python/object/apply:os.system ['touch {tmp}/PWNED']\n",
     "not valid YAML", None),
    ("python-tag-in-value", MEM + "cache: {ram: !!python/object/apply:os.getcwd []}\n",
     "not valid YAML", None),
    ("python-name-tag", MEM + "log: {file: !!python/name:os.system}\n", "not valid YAML", None),
    ("deep-list", deep_list(20000), "nested too deeply", None),
    ("deep-mapping", deep_map(3000), "nested too deeply", None),
    ("alias-bomb", bomb(6), "cache.ram", None),
    ("alias-bomb-9-levels", bomb(9), "cache.ram", None),
    ("missing-backend", "cache: {ram: 64M}\n", "backend.path: missing", None),
    ("empty-file", "", "backend.path: missing", None),
    ("nbd-without-uri", "backend: {type: nbd}\n", "backend.uri: missing", None),
    ("nbd-bad-scheme", "backend: {type: nbd, uri: 'http://x'}\n", "backend.uri", None),
    ("nbd-unreachable", "backend: {type: nbd, uri: 'nbd+unix:///?socket={tmp}/none.sock'}\n",
     "backend.uri", None),
    ("path-in-missing-dir", "backend: {path: '{tmp}/no/such/dir/d.img', size: 64M}\n",
     "backend.path", None),
    ("path-unwritable", "backend: {path: /proc/nbdcache-test.img, size: 64M}\n",
     "backend.path", None),
    ("path-is-directory", "backend: {path: '{tmp}'}\n", "backend.path", None),
    ("path-nul-byte", "backend: {path: \"{tmp}/a\\0b\", size: 64M}\n", "backend.path", None),
    ("existing-image-size-mismatch", "backend: {path: '{tmp}/small.img', size: 128M}\n",
     "backend.size", None),
    ("log-file-unwritable", MEM + "log: {file: /proc/version}\n", "log.file", None),
    ("log-file-missing-dir", MEM + "log: {file: '{tmp}/no/dir/x.log'}\n", "log.file", None),
    ("not-utf8", b"\xff\xfe\x00cache: {ram: 1}\n", "config file", None),
]


@pytest.mark.parametrize(
    "text,expect",
    [pytest.param(t, e, id=i, marks=[pytest.mark.xfail(strict=True, reason=x)] if x else [])
     for i, t, e, x in CORPUS])
def test_bad_config_is_refused_by_nbdkit(tmp_path: Path, text, expect, figures, request):
    (tmp_path / "small.img").write_bytes(bytes(1 * MiB))
    cfg = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text.replace("{tmp}", str(tmp_path)))
    sock = tmp_path / "bad.sock"
    try:
        r = nbdkit_config(cfg, sock)
        rc, err = r.returncode, r.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        rc, err = "timeout (30 s)", ""
    lines = [ln for ln in err.splitlines() if ln.startswith("nbdcache: error:")]
    clean = (rc not in (0, "timeout (30 s)") and not sock.exists() and len(err) < 64 * 1024
             and bool(lines) and expect in lines[0])
    figures.tally("bad config (corpus, through nbdkit)", "refused, no socket, message names it",
                  clean, request.node.callspec.id)
    assert rc != 0 and rc != "timeout (30 s)", f"nbdkit accepted or hung: rc={rc}"
    assert not sock.exists(), "nbdkit listened on a bad configuration"
    assert not (tmp_path / "PWNED").exists(), "a YAML tag ran code"
    assert len(err) < 64 * 1024, f"{len(err)} bytes of error output"
    assert lines, f"no 'nbdcache: error:' line: {err[:600]}"
    assert expect in lines[0], f"{lines[0]!r} does not name {expect!r}"


KEYS = [t.key for t in configmod.TUNABLES if not t.key.startswith(("backend.", "log.file",
                                                                    "server.socket",
                                                                    "server.control"))]
# None is an empty YAML value (key: with nothing), which keeps the default.
VALUES = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
          | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from(["0", "1", "-1", "4K", "64K", "1M", "3000", "1G", "4T", "1E",
                             "99999999999999999999T", "ms", "1.5s", "nan", "inf", "true",
                             "parallel", "json", "debug", ""])
          | st.text(max_size=12) | st.lists(st.integers(), max_size=2)
          | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
TREES = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4)


def nest(flat: dict) -> dict:
    tree: dict = {"backend": {"type": "memory", "size": "16M"}}
    for k, v in flat.items():
        sec, key = k.split(".", 1)
        tree.setdefault(sec, {})[key] = v
    return tree


@settings(max_examples=300, deadline=None)
@given(TREES)
def test_generated_values_for_real_keys_raise_only_config_error(tmp_path_factory, flat):
    f = tmp_path_factory.mktemp("gen") / "c.yaml"
    f.write_text(yaml.safe_dump(nest(flat)))
    try:
        configmod.load(f)
    except configmod.ConfigError:
        pass


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(TREES)
def test_generated_configs_through_nbdkit_fail_only_with_a_message(tmp_path_factory, flat):
    d = tmp_path_factory.mktemp("gen")
    f = d / "c.yaml"
    f.write_text(yaml.safe_dump(nest(flat)))
    r = nbdkit_config(f, d / "gen.sock")
    err = r.stderr.decode(errors="replace")
    if r.returncode != 0:
        assert "nbdcache: error:" in err, f"refused without a message: {err[:800]}"
        assert not (d / "gen.sock").exists()


EMPTY_KEYS = ["cache.block_size", "cache.ram", "cache.max_io", "cache.flushperqueue",
              "cache.daemon_interval", "log.stats_interval", "server.thread_model"]


def test_empty_value_is_refused_or_takes_the_default(serve, tmp_path: Path, figures):
    kept_none = []
    for key in EMPTY_KEYS:
        sec, name = key.split(".")
        f = tmp_path / f"{name}.yaml"
        f.write_text(MEM + f"{sec}:\n  {name}:\n")
        try:
            if configmod.load(f)[key] is None:
                kept_none.append(key)
        except configmod.ConfigError:
            pass
        except Exception as e:  # noqa: BLE001 - the finding
            kept_none.append(f"{key} ({type(e).__name__})")
    # the worst case, end to end: the server starts, then refuses every write
    s = serve(MEM + "log:\n  stats_interval:\n", name="empty")
    h = s.connect()
    time.sleep(1.2)                               # the stats task runs (and dies) once
    try:
        h.pwrite(b"x" * 4096, 0)
        write = "ok"
    except nbd.Error as e:
        write = e.errno
    figures.add("bad config: empty values", "keys left None / write with stats_interval:",
                f"{', '.join(kept_none) or 'none'} / {write}", "none / ok")
    assert not kept_none, f"empty values became None: {kept_none}"
    assert write == "ok"


# ------------------------------------------------------------------------ NBD requests

DISK = 128 * MiB
MAX = 32 * MiB

REQUESTS = [
    ("pread past the end", lambda h: h.pread(4096, DISK), {"EINVAL"}),
    ("pread across the end", lambda h: h.pread(8192, DISK - 4096), {"EINVAL"}),
    ("pread of zero bytes", lambda h: h.pread(0, 0), {"EINVAL"}),
    ("pread at offset 2^63", lambda h: h.pread(512, 1 << 63), {"EINVAL"}),
    ("pread wrapping 2^64", lambda h: h.pread(1024, (1 << 64) - 512), {"EINVAL"}),
    # nbdkit 1.32 advertises the plugin's maximum (32 MiB) but does not enforce it: the
    # spec lets a server either serve such a request or fail it with EINVAL.
    ("pread above the maximum", lambda h: h.pread(MAX + 4096, 0), {"ok", "EINVAL", "ENOMEM"}),
    ("pwrite past the end", lambda h: h.pwrite(b"x" * 4096, DISK), {"ENOSPC"}),
    ("pwrite across the end", lambda h: h.pwrite(b"x" * 8192, DISK - 4096), {"ENOSPC"}),
    ("pwrite of zero bytes", lambda h: h.pwrite(b"", 0), {"EINVAL", "ENOSPC"}),
    ("pwrite above the maximum", lambda h: h.pwrite(b"x" * (MAX + 4096), 64 * MiB),
     {"ok", "EINVAL", "ENOSPC", "ENOMEM"}),
    ("write_zeroes past the end", lambda h: h.zero(4096, DISK), {"ENOSPC"}),
    ("write_zeroes of zero bytes", lambda h: h.zero(0, 0), {"EINVAL", "ENOSPC"}),
    ("write_zeroes of 4 GiB - 1", lambda h: h.zero((1 << 32) - 1, 0), {"ENOSPC", "EINVAL"}),
    ("trim past the end", lambda h: h.trim(4096, DISK), {"EINVAL", "ENOSPC"}),
    ("cache past the end", lambda h: h.cache(4096, DISK), {"EINVAL"}),
    ("pread with an unknown flag", lambda h: h.pread(512, 0, 0x8000), {"EINVAL"}),
    ("pwrite with an unknown flag", lambda h: h.pwrite(b"x" * 512, 0, 0x8000), {"EINVAL"}),
]


def loose(uri: str) -> "nbd.NBD":
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def test_malformed_requests_get_the_protocol_errno_and_the_server_stays_up(serve, figures):
    s = serve(f"backend: {{type: memory, size: {DISK}}}\ncache: {{ram: 8M}}\n", name="proto")
    h = loose(s.uri)
    h.pwrite(b"K" * 4096, 0)
    wrong: list[str] = []
    seen: list[str] = []
    for what, fn, allowed in REQUESTS:
        try:
            fn(h)
            got = "ok"
        except nbd.Error as e:
            got = e.errno
        if got not in allowed:
            wrong.append(f"{what}: {got}, expected {'/'.join(sorted(allowed))}")
        if h.aio_is_dead():
            wrong.append(f"{what}: the connection died")
            h = loose(s.uri)
        seen.append(f"{what}={got}")
    figures.add("bad requests (strict mode off)", "errno per request", "; ".join(seen))
    figures.add("bad requests (strict mode off)", "wrong errno / server up",
                f"{len(wrong)} / {s.proc.poll() is None}", "0 / True",
                not wrong and s.proc.poll() is None)
    assert s.proc.poll() is None, "the server died"
    assert h.pread(4096, 0) == b"K" * 4096, "data changed"
    h.shutdown()
    assert not wrong, "; ".join(wrong)


EXPORT_NAMES = ["../../etc/passwd", "/etc/shadow", "../../../../tmp/nbdcache-export-probe",
                "nbdcache-export-probe", "..", "/", "%s%n%x", "a\nb", "x" * 4096]


def open_paths(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_export_names_never_become_paths(serve, tmp_path: Path, figures):
    img = tmp_path / "disk.img"
    s = serve(f"backend: {{path: {img}, size: 16M}}\ncache: {{ram: 4M}}\n", name="exports")
    h0 = s.connect()
    h0.pwrite(b"E" * 512, 0)
    before = open_paths(s.proc.pid)
    accepted = 0
    for name in EXPORT_NAMES:
        h = nbd.NBD()
        h.set_export_name(name)
        try:
            h.connect_unix(str(s.sock))
        except nbd.Error:
            continue
        accepted += 1
        assert h.pread(512, 0) == b"E" * 512, f"export {name!r} is not the one disk"
        new = {p for p in open_paths(s.proc.pid) - before
               if not p.startswith(("socket:", "pipe:", "anon_inode:"))}
        assert not new, f"export name {name!r} opened {new}"
        h.shutdown()
    created = [q for p in (Path("/tmp"), tmp_path, Path.cwd(), Path("/"))
               for q in p.glob("*nbdcache-export-probe*")]
    figures.add("export names", "hostile names accepted / paths opened or created",
                f"{accepted} of {len(EXPORT_NAMES)} / {len(created)}", "0 created",
                not created)
    assert not created, created
    assert s.proc.poll() is None
