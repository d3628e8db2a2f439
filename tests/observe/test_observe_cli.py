"""nbdcache.cli_observe: stats, set and plot as the command line runs them, and how the
control socket is found."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from nbdcache import cli_observe, config
from nbdcache import log as logmod
from nbdcache.control import ControlServer
from nbdcache.engine import Engine
from nbdcache.statistics import statistics_markdown


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nbdcache")
    sub = p.add_subparsers(dest="command", required=True)
    cli_observe.add_parsers(sub)
    return p.parse_args(list(argv))


def run(*argv: str) -> tuple[int, str]:
    args = parse(*argv)
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


@pytest.fixture
def ctl(tmp_path):
    logmod.configure("warning", str(tmp_path / "log.jsonl"))
    cfg = config.load(None, {"backend.type": "memory", "backend.size": "64M",
                             "cache.ram": "8M"})
    e = Engine(cfg)
    e.start()
    srv = ControlServer(e, tmp_path / "c.ctl")
    srv.start()
    yield e, str(srv.path)
    srv.stop()
    e.stop()


# --------------------------------------------------------------------------- socket rule

def test_socket_path_rule(tmp_path, monkeypatch):
    assert cli_observe.control_socket_path("/x/y.ctl", None) == "/x/y.ctl"
    base = "backend: {type: memory, size: 16M}\n"
    c1 = tmp_path / "a.yaml"
    c1.write_text(base + f"server: {{control_socket: {tmp_path / 'explicit.ctl'}}}\n")
    assert cli_observe.control_socket_path(None, str(c1)) == str(tmp_path / "explicit.ctl")
    c2 = tmp_path / "b.yaml"
    c2.write_text(base + "server: {socket: run/export.sock}\n")
    assert cli_observe.control_socket_path(None, str(c2)) == \
        str(tmp_path / "run" / "export.sock.ctl")
    c3 = tmp_path / "sub" / "c.yaml"
    c3.parent.mkdir()
    c3.write_text(base)
    assert cli_observe.control_socket_path(None, str(c3)) == \
        str(tmp_path / "sub" / "var" / "run" / "nbdcache.sock.ctl")
    monkeypatch.chdir(tmp_path)
    assert cli_observe.control_socket_path(None, None) == \
        str(tmp_path / "var" / "run" / "nbdcache.sock.ctl")


def test_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {ram: lots}\n")
    assert run("stats", "--config", str(bad))[0] == 2
    assert "cache.ram: got 'lots'" in capsys.readouterr().err


# --------------------------------------------------------------------------- stats

def test_stats_text_is_grouped_with_units(ctl):
    e, path = ctl
    e.pwrite(memoryview(b"q" * 3 * 65536), 0)
    rc, out = run("stats", "--socket", path)
    assert rc == 0
    lines = out.splitlines()
    assert lines.index("buffer cache") < lines.index("throttle") < lines.index("daemons") \
        < lines.index("backend")
    assert any(ln.split()[:2] == ["dirtykvaspace", "192.0K"] for ln in lines)
    assert any(ln.split() == ["nbuf", "128", "buffers"] for ln in lines)


def test_stats_json(ctl):
    e, path = ctl
    rc, out = run("stats", "--socket", path, "--json")
    rec = json.loads(out)
    assert rc == 0 and rec["stats"] == {**e.stats(), "uptime": rec["stats"]["uptime"]}


def test_stats_watch_shows_rates_and_stops_after_count(ctl):
    e, path = ctl
    rc, out = run("stats", "--socket", path, "--watch", "0.05", "--count", "3")
    assert rc == 0 and out.count("--- " + path) == 3
    assert "/s" in out and "rates over" in out
    rc, out = run("stats", "--socket", path, "--json", "--watch", "0.05", "--count", "2")
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert len(recs) == 2 and recs[0]["rates"] == {} and "writes" in recs[1]["rates"]


def test_stats_watch_exits_cleanly_on_ctrl_c(ctl, monkeypatch):
    _, path = ctl

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_observe.time, "sleep", interrupt)
    rc, out = run("stats", "--socket", path, "--watch")
    assert rc == 0 and "buffer cache" in out


def test_stats_without_a_server(tmp_path, capsys):
    rc, _ = run("stats", "--socket", str(tmp_path / "none.ctl"))
    assert rc == 1
    assert "is the server running?" in capsys.readouterr().err


def test_stats_markdown_needs_no_server():
    rc, out = run("stats", "--markdown")
    assert rc == 0 and out == statistics_markdown() + "\n"


def test_watch_rejects_nonsense():
    with pytest.raises(SystemExit):
        parse("stats", "--watch", "0")


# --------------------------------------------------------------------------- set

def test_set_prints_old_and_new(ctl):
    e, path = ctl
    rc, out = run("set", "cache.hirunningspace=2M", "--socket", path)
    assert rc == 0 and out == "cache.hirunningspace: 1048576 -> 2097152 (1M -> 2M)\n"
    assert e.tunables()["cache.hirunningspace"] == 2 * 1024 * 1024
    rc, out = run("set", "cache.readahead=0", "--socket", path)
    assert rc == 0 and out == "cache.readahead: 4 -> 0\n"


@pytest.mark.parametrize("assignment, message", [
    ("cache.ram=1G", "cache.ram: can only be set at startup"),
    ("cache.hidirtybufspace=banana", "expected a size"),
    ("cache.lodirtybufspace=512M", "expected less than cache.hidirtybufspace"),
    ("no-equals-sign", "expected KEY=VALUE"),
])
def test_set_refusals_exit_2_and_change_nothing(ctl, capsys, assignment, message):
    e, path = ctl
    before = e.tunables()
    rc, out = run("set", assignment, "--socket", path)
    assert rc == 2 and out == ""
    assert message in capsys.readouterr().err
    assert e.tunables() == before


def test_set_without_a_server_exits_2(tmp_path, capsys):
    assert run("set", "cache.readahead=1", "--socket", str(tmp_path / "x.ctl"))[0] == 2
    assert "is the server running?" in capsys.readouterr().err


# --------------------------------------------------------------------------- plot

def test_plot_command(tmp_path, capsys):
    from test_observe_plot import write_log
    log = write_log(tmp_path / "run.jsonl", 6)
    rc, out = run("plot", str(log))
    assert rc == 0 and (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    rc, out = run("plot", str(log), "-o", str(tmp_path / "other.png"))
    assert rc == 0 and Path(tmp_path / "other.png").exists()
    rc, _ = run("plot", str(write_log(tmp_path / "one.jsonl", 1)))
    assert rc == 2 and "at least 2" in capsys.readouterr().err
