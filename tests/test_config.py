"""Configuration: parsing, sizes, derived defaults, every rejection path, docs drift."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcache import config
from nbdcache.config import ConfigError, load, parse_duration, parse_size
from nbdcache.core.bufinit import bufinit

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3


@pytest.mark.parametrize("text,value", [
    (4096, 4096), ("4096", 4096), ("64K", 64 * KiB), ("64k", 64 * KiB), ("16M", 16 * MiB),
    ("1G", GiB), ("2T", 2 * 1024 * GiB), ("512MiB", 512 * MiB), ("1 G", GiB), ("0", 0),
])
def test_parse_size_accepts(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["-1", -5, "1.5G", "G", "12X", "", True, 3.0, None, [1]])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text,value", [(1, 1.0), ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0),
                                        (0.25, 0.25)])
def test_parse_duration(text, value):
    assert parse_duration(text) == value


def test_defaults_derive_like_bufinit(tmp_path):
    cfg = load(None, {"backend.type": "memory", "backend.size": "64M"})
    p = bufinit(cfg)
    assert p["maxbufspace"] == 256 * MiB and p["nbuf"] == 4096
    assert p["hibufspace"] == 256 * MiB - 10 * 64 * KiB          # max(3/4, max - 10 bufs)
    assert p["lobufspace"] == p["hibufspace"] * 7 // 8
    assert p["hidirtybufspace"] == p["hibufspace"] // 2
    assert p["lodirtybufspace"] == p["hidirtybufspace"] // 2
    assert p["hirunningspace"] == p["hibufspace"] // 16


def test_small_cache_derivations():
    p = bufinit({"cache.ram": 1 * MiB, "cache.block_size": 64 * KiB})
    assert p["hibufspace"] == 3 * MiB // 4              # 3/4 wins over max - 10 buffers
    assert p["lobufspace"] == p["hibufspace"] * 7 // 8
    assert p["hirunningspace"] == 1 * MiB                # floor of 1 MiB
    tiny = bufinit({"cache.ram": 512 * KiB, "cache.block_size": 64 * KiB})
    assert tiny["lobufspace"] == tiny["hibufspace"] - 64 * KiB  # clamp: one buffer apart


def test_large_cache_lobufspace_capped():
    p = bufinit({"cache.ram": 4 * GiB, "cache.block_size": 64 * KiB})
    assert p["hibufspace"] - p["lobufspace"] == 64 * MiB


def test_yaml_nested_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backend:\n  path: disk.img\n  size: 1G\ncache:\n  ram: 64M\n"
                 "  hidirtybufspace: 8M\n")
    cfg = load(f, {"cache.ram": "32M"})
    assert cfg["cache.ram"] == 32 * MiB
    assert cfg["backend.path"] == str(tmp_path / "disk.img")    # relative to the file
    assert bufinit(cfg)["hidirtybufspace"] == 8 * MiB


REJECTIONS = [
    ("cache: {ram: 1K}", "cache.ram"),
    ("cache: {rma: 1G}", "did you mean cache.ram"),
    ("cache: {block_size: 3000}", "power of two"),
    ("cache: {block_size: 2M}", "power of two"),
    ("cache: {ram: [1, 2]}", "cache.ram: got [1, 2], expected a size"),
    ("cache: {readahead: lots}", "cache.readahead: got 'lots', expected a whole number"),
    ("cache: {readahead: -1}", "expected at least 0"),
    ("cache: {max_io: 100K}", "cache.max_io"),
    ("cache: {lodirtybufspace: 64M, hidirtybufspace: 32M}", "expected less than"),
    ("cache: {hidirtybufspace: 1T}", "at most cache.hibufspace"),
    ("cache: 5", "cache: got 5, expected a mapping"),
    ("backend: {type: tape}", "expected one of file, nbd, memory"),
    ("backend: {type: nbd}", "backend.uri: missing"),
    ("backend: {type: nbd, uri: 'http://x'}", "expected nbd://"),
    ("backend: {type: memory}", "backend.size: missing"),
    ("backend: {path: d.img, size: 10000}", "multiple of 512"),
    ("server: {thread_model: fast}", "server.thread_model"),
    ("server: {port: 70000}", "at most 65535"),
    ("log: {level: loud}", "log.level"),
    ("{backend: {path: x", "not valid YAML"),
    ("!!python/object:os.system {}", "not valid YAML"),
    ("- 1\n- 2", "expected a mapping"),
    ("backend:\n  path: 5\n", "backend.path: got 5, expected a string"),
    ("cache: {ram: 1M}\n\0\n", "not valid YAML: unacceptable character #x0000"),
]


@pytest.mark.parametrize("text,message", REJECTIONS)
def test_rejections_name_the_problem(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    if "backend" not in text:
        text = "backend: {path: d.img, size: 1M}\n" + text if not text.startswith(("{", "!", "-")) \
            else text
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(f)
    assert message in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load("/nonexistent/nbdcache.yaml")


def test_deep_nesting_is_a_clean_error(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("a: " * 50 + "1")
    with pytest.raises(ConfigError):
        load(f)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown setting"):
        load(None, {"backend.type": "memory", "backend.size": "1M", "nope": "1"})


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) |
                    st.floats(allow_nan=True),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(
                        st.sampled_from(["backend", "cache", "type", "ram", "size", "path",
                                         "log", "level", "x"]), c, max_size=4),
                    max_leaves=12))
def test_generated_configs_never_crash(tmp_path_factory, tree):
    import yaml
    f = tmp_path_factory.mktemp("gen") / "c.yaml"
    f.write_text(yaml.safe_dump(tree))
    try:
        load(f)
    except ConfigError:
        pass


def test_docs_tunables_are_generated_from_the_table():
    committed = (ROOT / "docs" / "tunables.md").read_text()
    assert committed == config.tunables_markdown() + "\n", \
        "docs/tunables.md is stale: run `make docs`"


def test_config_help_lists_every_key():
    text = config.config_help()
    for t in config.TUNABLES:
        assert t.key in text


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("backend: {path: d.img, size: 1G}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {ram: huge}\n")
    cli = [sys.executable, "-m", "nbdcache", "check-config"]
    r = subprocess.run(cli + [str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout
    r = subprocess.run(cli + [str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "cache.ram: got 'huge'" in r.stderr


def test_quickstart_example_is_valid():
    cfg = load(ROOT / "examples" / "quickstart.yaml")
    assert cfg["backend.type"] == "file"


# -- empty values, hostile files, impossible sizes ------------------------------------------

MEM = "backend: {type: memory, size: 16M}\n"


def test_empty_value_keeps_the_default(tmp_path):
    """``key:`` with nothing after it is YAML's null: the default stays, a derived key stays
    derived, an empty section is a section without settings."""
    f = tmp_path / "c.yaml"
    f.write_text(MEM + "cache:\n  ram:\n  block_size:\n  hibufspace:\n  daemon_interval:\n"
                 "log:\n  stats_interval:\nserver:\n")
    cfg = load(f)
    assert cfg["cache.ram"] == config.BY_KEY["cache.ram"].default
    assert cfg["cache.block_size"] == 64 * KiB
    assert cfg["cache.daemon_interval"] == 1.0 and cfg["log.stats_interval"] == 10.0
    assert cfg["cache.hibufspace"] is None                                # still derived
    assert bufinit(cfg)["hibufspace"] == 256 * MiB - 10 * 64 * KiB
    f.write_text(MEM + "cache:\n  rma:\n")
    with pytest.raises(ConfigError, match="did you mean cache.ram"):    # still checked
        load(f)


def test_file_that_is_not_utf8_names_the_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"\xff\xfe\x00cache: {ram: 1}\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml' is not UTF-8 text: byte 0xff"):
        load(f)


@pytest.mark.parametrize("key", sorted(config.PATH_KEYS))
def test_nul_byte_in_a_path_names_the_key(tmp_path, key):
    with pytest.raises(ConfigError) as e:
        load(None, {"backend.type": "memory", "backend.size": "16M", key: "/tmp/a\0b"})
    assert str(e.value) == f"{key}: got '/tmp/a\\x00b', expected a path without NUL bytes"


def alias_bomb(levels: int) -> str:
    lines = [MEM.strip(), "cache:", "  ram:", "    - &l0 [lol, lol, lol, lol, lol, lol, lol, "
             "lol, lol]"]
    for i in range(1, levels):
        lines.append(f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast_without_expanding(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text(alias_bomb(9))                         # 9^9 strings once expanded
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load(f)
    assert time.monotonic() - t0 < 1.0
    assert str(e.value).startswith(f"config file {str(f)!r}: cache.ram: more than 10000 "
                                   "YAML nodes")


def test_too_many_nodes_or_levels_are_refused(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text(MEM + "cache: {ram: [" + ", ".join(["1"] * 20000) + "]}\n")
    with pytest.raises(ConfigError, match="cache.ram: more than 10000 YAML nodes"):
        load(f)
    f.write_text(MEM + "cache: {ram: " + "[" * 40 + "]" * 40 + "}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load(f)


def test_messages_show_values_cut_to_80_characters(tmp_path):
    f = tmp_path / "long.yaml"
    f.write_text(MEM + "cache: {ram: '" + "x" * 5000 + "'}\n")
    with pytest.raises(ConfigError) as e:
        load(f)
    msg = str(e.value)
    got = msg.split("got ", 1)[1].split(", expected")[0]
    assert len(got) <= 80 and "..." in got, msg
    assert len(config.show(list(range(10**6)))) <= 80
    assert config.show(10 ** 5000).startswith("<int of")      # past int's str() digit limit


@pytest.mark.parametrize("text,message", [
    (MEM + "cache: {ram: 99999999999999999999999T}",
     "cache.ram: got '99999999999999999999999T', expected a size below 8E"),
    (MEM + "cache: {ram: '" + "9" * 5000 + "'}", "cache.ram: got '99"),
    (MEM + "cache: {hirunningspace: 9223372036854775808}",
     "cache.hirunningspace: got 9223372036854775808, expected a size below 8E"),
    ("backend: {path: d.img, size: 9223372036854775808}", "backend.size: got 92233"),
    (MEM + "cache: {ram: " + "9" * 5000 + "}", "is not valid YAML"),
])
def test_sizes_beyond_a_file_offset_name_the_key(tmp_path, text, message):
    f = tmp_path / "huge.yaml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load(f)
    assert message in str(e.value)
    assert len(str(e.value)) < 400


def test_ram_beyond_the_machine_memory_names_the_key(monkeypatch):
    monkeypatch.setattr(config, "machine_memory", lambda: 4 * GiB)
    with pytest.raises(ConfigError) as e:
        load(None, {"backend.type": "memory", "backend.size": "16M", "cache.ram": "8G"})
    assert str(e.value) == ("cache.ram: got 8589934592 (8.0G), expected at most the machine's "
                            "memory (4294967296 bytes, 4.0G)")
    with pytest.raises(ConfigError, match=r"^backend.size: got 6442450944 \(6.0G\), expected "
                       "at most the machine's memory .* for backend.type=memory"):
        load(None, {"backend.type": "memory", "backend.size": "6G", "cache.ram": "64M"})
    # a file or NBD disk may be larger than memory: it is not held in RAM
    assert load(None, {"backend.path": "d.img", "backend.size": "6G"})["backend.size"] == \
        6 * GiB
    assert config.machine_memory() > 0
