"""``nbdcache stats``, ``nbdcache set`` and ``nbdcache plot``: watching and steering a server.

``add_parsers(subparsers)`` adds the three subcommands to the ``nbdcache``
command (``nbdcache.cli``).  ``stats`` and ``set`` talk to the server's control
socket (``nbdcache.control``), found from ``--socket PATH``; or from
``--config FILE`` through ``server.control_socket``; or by the default rule,
the export socket's path with ``.ctl`` appended, the export socket being
``server.socket`` or ``<config dir>/var/run/nbdcache.sock`` (the current
directory without ``--config``), as ``nbdcache serve`` uses.

Every handler returns an exit code: 0 success; 1 the server could not be
reached (``stats``); 2 a refused value, a bad argument or an unusable file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Mapping, TextIO

from nbdcache import config as configmod
from nbdcache import statistics as statmod
from nbdcache.control import ControlClient, ControlError
from nbdcache.histogram import delta as hist_delta
from nbdcache.histogram import is_snapshot

CLEAR = "\x1b[H\x1b[2J"


# --------------------------------------------------------------------------- the socket

def control_socket_path(socket: str | None, config: str | None) -> str:
    """The control socket of the server: ``socket``, the config's, or the default rule.
    Raises ConfigError for an invalid config file."""
    if socket:
        return socket
    if config:
        return default_control_socket(configmod.load(config))
    return default_control_socket(configmod.Config(values={}, source=None))


def default_control_socket(cfg: configmod.Config) -> str:
    """``server.control_socket``, else the export socket (``server.socket`` or
    ``<config dir>/var/run/nbdcache.sock``) + ``.ctl``.  ``nbdcache serve`` passes this
    to the plugin so that ``stats`` and ``set`` find the server by the same rule."""
    from nbdcache.cli import default_socket
    if cfg.get("server.control_socket"):
        return cfg["server.control_socket"]
    return (cfg.get("server.socket") or default_socket(cfg)) + ".ctl"


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--socket", metavar="PATH", help="the server's control socket")
    g.add_argument("--config", metavar="FILE",
                   help="the server's YAML configuration (its server.control_socket, or the "
                        "export socket + .ctl)")


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(control_socket_path(args.socket, args.config))


# --------------------------------------------------------------------------- stats

def render(stats: Mapping[str, Any], prev: tuple[float, Mapping[str, Any]] | None = None,
           now: float | None = None) -> str:
    """Statistics grouped as in the table, with units; with ``prev`` (time, stats) and
    ``now``, counters also show their per-second rate over the interval."""
    dt = (now - prev[0]) if prev is not None and now is not None else 0.0
    old = prev[1] if prev is not None and dt > 0 else None
    lines = []
    if "uptime" in stats:
        head = f"uptime {statmod.human_seconds(stats['uptime'])}"
        lines.append(head + (f", rates over {dt:.1f}s" if old is not None else ""))
    for group, names in statmod.grouped(stats):
        lines.append(f"{group}")
        for name in names:
            lines.append("  " + _line(name, stats, old, dt))
    return "\n".join(lines)


def _line(name: str, stats: Mapping[str, Any], old: Mapping[str, Any] | None,
          dt: float) -> str:
    st = statmod.lookup(name)
    value = stats[name]
    unit = st.unit if st and st.unit in ("buffers", "blocks", "slots") else ""
    text = f"{name:<28} {statmod.format_value(name, value):>10} {unit:<7}"
    if old is None or name not in old:
        return text.rstrip()
    if is_snapshot(value):
        d = hist_delta(value, old[name])
        if d["count"]:
            text += (f"  {d['count'] / dt:.1f}/s  interval p50="
                     f"{statmod.human_seconds(d['p50'])} p99={statmod.human_seconds(d['p99'])}")
    elif name == "hit_ratio":
        r = interval_hit_ratio(stats, old)
        if r is not None:
            text += f"  interval {100 * r:.1f}%"
    elif st is not None and st.kind == "counter" and isinstance(value, (int, float)):
        rate = (value - old[name]) / dt
        shown = statmod.human_size(rate) if st.unit == "bytes" else f"{rate:.1f}"
        text += f"  {shown}/s"
    return text.rstrip()


def interval_hit_ratio(stats: Mapping[str, Any], old: Mapping[str, Any]) -> float | None:
    dh = stats.get("hits", 0) - old.get("hits", 0)
    dm = stats.get("misses", 0) - old.get("misses", 0)
    return dh / (dh + dm) if dh >= 0 and dm >= 0 and dh + dm > 0 else None


def counter_rates(stats: Mapping[str, Any], prev: tuple[float, Mapping[str, Any]] | None,
                  now: float) -> dict[str, float]:
    """Per-second rates of every counter (histograms: observations per second)."""
    if prev is None or now <= prev[0]:
        return {}
    dt, old = now - prev[0], prev[1]
    out = {}
    for name, value in stats.items():
        st = statmod.lookup(name)
        if name not in old:
            continue
        if is_snapshot(value):
            out[name] = hist_delta(value, old[name])["count"] / dt
        elif st is not None and st.kind == "counter" and isinstance(value, (int, float)):
            out[name] = (value - old[name]) / dt
    return out


def cmd_stats(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.markdown:
        print(statmod.statistics_markdown(), file=out)
        return 0
    try:
        client = _client(args)
    except configmod.ConfigError as e:
        print(f"nbdcache: error: {e}", file=sys.stderr)
        return 2
    interval = args.watch
    prev: tuple[float, dict[str, Any]] | None = None
    n = 0
    try:
        while True:
            now, stats = client.sample()
            if args.json:
                rec: dict[str, Any] = {"time": now, "stats": stats}
                if interval is not None:
                    rec["rates"] = counter_rates(stats, prev, now)
                print(json.dumps(rec, default=str), file=out, flush=True)
            else:
                text = render(stats, prev, now)
                if interval is not None:
                    if out.isatty():
                        out.write(CLEAR)
                    else:
                        print(f"--- {client.path}", file=out)
                print(text, file=out, flush=True)
            n += 1
            if interval is None or (args.count and n >= args.count):
                return 0
            prev = (now, stats)
            time.sleep(interval)
    except ControlError as e:
        print(f"nbdcache: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=out)
        return 0


# --------------------------------------------------------------------------- set

def cmd_set(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        key, value = configmod.parse_override(args.assignment)
        old, new = _client(args).set(key, value)
    except (configmod.ConfigError, ControlError) as e:
        print(f"nbdcache: error: {e}", file=sys.stderr)
        return 2
    t = configmod.BY_KEY.get(key)
    human = ""
    if t is not None and t.kind == "size" and isinstance(old, int) and isinstance(new, int):
        human = f" ({configmod.format_size(old)} -> {configmod.format_size(new)})"
    print(f"{key}: {old} -> {new}{human}", file=out)
    return 0


# --------------------------------------------------------------------------- plot

def cmd_plot(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from nbdcache.plot import PlotError, plot
    out = out or sys.stdout
    target = args.output or str(args.log).rsplit(".", 1)[0] + ".png"
    try:
        path = plot(args.log, target)
    except PlotError as e:
        print(f"nbdcache: error: {e}", file=sys.stderr)
        return 2
    print(f"nbdcache: wrote {path}", file=out)
    return 0


# --------------------------------------------------------------------------- parsers

def _watch_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, such as 1 or 0.5")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected more than 0 seconds")
    return v


def add_parsers(subparsers: Any) -> None:
    """Add ``stats``, ``set`` and ``plot`` to the ``nbdcache`` command's subparsers."""
    s = subparsers.add_parser("stats", help="print a running server's statistics",
                              description="Print every statistic of a running server, "
                              "grouped, with units (see docs/statistics.md).")
    _add_target(s)
    s.add_argument("--json", action="store_true",
                   help="one JSON object {time, stats[, rates]} per sample")
    s.add_argument("--watch", nargs="?", const=1.0, type=_watch_seconds, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) with per-second rates; Ctrl-C "
                        "stops")
    s.add_argument("--count", type=int, metavar="N", default=0,
                   help="with --watch, stop after N samples")
    s.add_argument("--markdown", action="store_true",
                   help="print docs/statistics.md (the statistics table) and exit")
    s.set_defaults(func=cmd_stats)

    p = subparsers.add_parser("set", help="change a live tunable of a running server",
                              description="Change a live tunable (see docs/tunables.md, "
                              "'changes: live'); prints KEY: OLD -> NEW, or the error and "
                              "exits 2.")
    p.add_argument("assignment", metavar="KEY=VALUE",
                   help="for example cache.hidirtybufspace=64M")
    _add_target(p)
    p.set_defaults(func=cmd_set)

    g = subparsers.add_parser("plot", help="draw a run's JSON log as a PNG",
                              description="Draw the `stats` events of a JSON-lines log "
                              "against the watermarks (see nbdcache/plot.py).")
    g.add_argument("log", metavar="LOG.jsonl", help="the server's log.file")
    g.add_argument("-o", "--output", metavar="PNG", help="output file (default: LOG.png)")
    g.set_defaults(func=cmd_plot)
