"""nbdcache.control: the protocol without sockets, then the server and client on a real
Unix socket in front of an Engine on the memory backend."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from nbdcache import config
from nbdcache import log as logmod
from nbdcache.control import (
    MAX_LINE, ControlClient, ControlError, ControlServer, handle_request, start_observers,
    stop_observers,
)
from nbdcache.engine import Engine

MiB = 1024 * 1024


@pytest.fixture
def engine(tmp_path):
    logmod.configure("info", str(tmp_path / "log.jsonl"))
    cfg = config.load(None, {"backend.type": "memory", "backend.size": "64M",
                             "cache.ram": "8M", "cache.daemon_interval": "60"})
    e = Engine(cfg)
    e.start()
    yield e
    e.stop()


@pytest.fixture
def server(engine, tmp_path):
    srv = ControlServer(engine, tmp_path / "run" / "c.ctl")
    srv.start()
    yield srv
    srv.stop()


def raw_exchange(path: Path, payload: bytes) -> list[dict]:
    """Send raw bytes, half-close, return every reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


# --------------------------------------------------------------------------- the protocol

def test_protocol_stats_and_tunables(engine):
    r = handle_request(engine, {"op": "stats"})
    assert r["ok"] and r["stats"]["nbuf"] == 128 and isinstance(r["time"], float)
    r = handle_request(engine, {"op": "tunables"})
    assert r["ok"] and r["tunables"]["cache.max_io"] == MiB


def test_protocol_set_changes_a_live_tunable(engine):
    r = handle_request(engine, {"op": "set", "key": "cache.max_io", "value": "2M"})
    assert r == {"ok": True, "key": "cache.max_io", "old": MiB, "new": 2 * MiB}
    assert engine.tunables()["cache.max_io"] == 2 * MiB


@pytest.mark.parametrize("req, message", [
    ({"op": "set", "key": "cache.ram", "value": "1G"}, "can only be set at startup"),
    ({"op": "set", "key": "cache.hidirtybufspace", "value": "banana"}, "expected a size"),
    ({"op": "set", "key": "cache.lodirtybufspace", "value": "100M"}, "expected less than"),
    ({"op": "set", "key": "cache.max_io", "value": "100K"}, "multiple of cache.block_size"),
    ({"op": "set", "key": "cache.hidirtybufsapce", "value": "1M"}, "did you mean"),
    ({"op": "set", "key": "cache.max_io"}, "expected \"value\""),
    ({"op": "set", "value": 3}, "expected \"key\""),
    ({"op": "set", "key": "cache.max_io", "value": [1]}, "expected \"value\""),
    ({"op": "reboot"}, "unknown op 'reboot'"),
    ({}, "unknown op None"),
    ([1, 2], "expected a JSON object"),
    ("stats", "expected a JSON object"),
])
def test_protocol_refusals_change_nothing(engine, req, message):
    before = engine.tunables()
    r = handle_request(engine, req)
    assert r["ok"] is False and message in r["error"]
    assert engine.tunables() == before


def test_protocol_survives_an_engine_that_raises():
    class Broken:
        def stats(self):
            raise RuntimeError("boom")
    r = handle_request(Broken(), {"op": "stats"})
    assert r["ok"] is False and "boom" in r["error"]


# --------------------------------------------------------------------------- the socket

def test_socket_file_is_0600_in_a_0700_directory_and_removed_at_stop(engine, tmp_path):
    path = tmp_path / "new" / "dir" / "c.ctl"
    srv = ControlServer(engine, path)
    srv.start()
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    finally:
        srv.stop()
    assert not path.exists()


def test_client_round_trip(server, engine):
    c = ControlClient(server.path)
    engine.pwrite(memoryview(b"a" * 65536), 0)
    engine.pread(memoryview(bytearray(65536)), 0)
    s = c.stats()
    assert s["writes"] == 1 and s["hits"] == 1 and s["dirtybufspace"] == 65536
    t, s2 = c.sample()
    assert t > 0 and s2["reads"] == 1
    assert c.tunables() == engine.tunables()
    assert c.set("cache.readahead", 8) == (4, 8)
    assert engine.cache.readahead == 8


def test_client_raises_the_server_message(server):
    c = ControlClient(server.path)
    with pytest.raises(ControlError, match="cache.ram: can only be set at startup"):
        c.set("cache.ram", "1G")
    with pytest.raises(ControlError, match="unknown op"):
        c.request({"op": "nope"})


def test_bad_input_never_stops_the_server(server):
    replies = raw_exchange(server.path, b"\xff\xfe\n[1]\nnot json\n\n{\"op\": \"stats\"}\n")
    assert [r["ok"] for r in replies] == [False, False, False, True]
    assert "not a JSON object" in replies[0]["error"]
    replies = raw_exchange(server.path, b"x" * (MAX_LINE + 10))
    assert replies == [{"ok": False, "error": f"bad request: longer than {MAX_LINE} bytes"}]
    # A client that disconnects mid-line, then many at once: the server still answers.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(server.path))
        s.sendall(b'{"op": "st')
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            ControlClient(server.path).stats()
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []


def test_many_requests_on_one_connection(server):
    replies = raw_exchange(server.path, b'{"op": "tunables"}\n' * 50)
    assert len(replies) == 50 and all(r["ok"] for r in replies)


def test_missing_socket_is_a_clear_error(tmp_path):
    path = tmp_path / "nothing.ctl"
    with pytest.raises(ControlError) as e:
        ControlClient(path).stats()
    assert str(e.value) == f"no nbdcache control socket at {path}: is the server running?"


def test_stale_socket_is_replaced_and_reported_to_clients(engine, tmp_path):
    path = tmp_path / "stale.ctl"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                                   # a killed server leaves the file behind
    with pytest.raises(ControlError, match="is the server running.*nothing listens"):
        ControlClient(path).stats()
    srv = ControlServer(engine, path)
    srv.start()
    try:
        assert ControlClient(path).stats()["nbuf"] == 128
    finally:
        srv.stop()


def test_refuses_a_live_socket_or_a_regular_file(server, engine, tmp_path):
    with pytest.raises(ControlError, match="another server is listening"):
        ControlServer(engine, server.path).start()
    assert ControlClient(server.path).stats()            # the first one is untouched
    f = tmp_path / "file.ctl"
    f.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(engine, f).start()
    assert f.read_text() == "precious"


def test_stop_closes_idle_connections(engine, tmp_path):
    srv = ControlServer(engine, tmp_path / "idle.ctl")
    srv.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(srv.path))
    s.settimeout(5)
    s.sendall(b'{"op": "tunables"}\n')
    assert json.loads(s.recv(65536))["ok"]     # accepted and served; now idle
    srv.stop()
    assert s.recv(10) == b""                    # shut down by stop(), not left hanging
    s.close()
    assert not any(t.name.startswith("nbdcache-control") for t in threading.enumerate())


def test_start_observers_follows_the_config(tmp_path):
    logmod.configure("warning", str(tmp_path / "log.jsonl"))
    path = tmp_path / "o.ctl"
    cfg = config.load(None, {"backend.type": "memory", "backend.size": "16M",
                             "cache.ram": "2M", "server.control_socket": str(path)})
    e = Engine(cfg)
    observers = start_observers(e)
    try:
        assert [type(o).__name__ for o in observers] == ["ControlServer"]
        assert ControlClient(path).stats()["nbuf"] == 32
    finally:
        stop_observers(observers)
    assert not path.exists()
    cfg = config.load(None, {"backend.type": "memory", "backend.size": "16M", "cache.ram": "2M"})
    assert start_observers(Engine(cfg)) == []
