"""Configuration: parsing, sizes, derived defaults, every rejection path, docs drift."""

from __future__ import annotations

import subprocess
import sys
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
