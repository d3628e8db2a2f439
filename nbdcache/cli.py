"""The ``nbdcache`` command: serve, check-config, tunables (and more as they land).

``serve`` runs nbdkit in the foreground with this plugin, the project's
interpreter (``PYTHONEXECUTABLE`` points the embedded Python at this
virtualenv) and ``PYTHONPATH`` set to the source tree, and ends it cleanly on
SIGINT/SIGTERM (nbdkit's ``cleanup`` then flushes the cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from nbdcache import config as configmod

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
PLUGIN = PACKAGE_DIR / "plugin.py"


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for text in pairs or []:
        k, v = configmod.parse_override(text)
        out[k] = v
    return out


def plugin_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment under which nbdkit's embedded Python finds this package and its deps."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH"))
                                        if p)
    env["PYTHONEXECUTABLE"] = sys.executable
    return env


def nbdkit_command(cfg: configmod.Config, config_path: str | None, overrides: dict[str, str],
                   socket: str | None, port: int | None, extra: list[str] | None = None
                   ) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise SystemExit("nbdcache: error: nbdkit is not installed (run `make setup`)")
    cmd = [nbdkit, "--foreground", "--threads", str(cfg["server.threads"])]
    if port:
        cmd += ["--ipaddr", "127.0.0.1", "--port", str(port)]
    else:
        cmd += ["--unix", socket]
    cmd += list(extra or [])
    cmd += ["python", str(PLUGIN)]
    if config_path:
        cmd.append(f"config={Path(config_path).resolve()}")
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    return cmd


def default_socket(cfg: configmod.Config) -> str:
    base = cfg.source.parent if cfg.source else Path.cwd()
    return str(base / "var" / "run" / "nbdcache.sock")


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = _overrides(args.set)
    if args.socket:
        overrides["server.socket"] = args.socket
    if args.port:
        overrides["server.port"] = str(args.port)
    try:
        cfg = configmod.load(args.config, overrides)
    except configmod.ConfigError as e:
        print(f"nbdcache: error: {e}", file=sys.stderr)
        return 2
    port = cfg["server.port"]
    socket = None if port else (cfg["server.socket"] or default_socket(cfg))
    if socket:
        d = Path(socket).parent
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        if Path(socket).is_socket():
            Path(socket).unlink()      # left behind by a killed server; nbdkit would refuse it
    from nbdcache.cli_observe import default_control_socket
    cmd = nbdkit_command(cfg, args.config, {**_overrides(args.set), "server.control_socket":
                                            default_control_socket(cfg)}, socket, port)
    where = f"nbd+unix:///?socket={socket}" if socket else f"nbd://127.0.0.1:{port}"
    print(f"nbdcache: serving {where}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=plugin_env())

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    rc = proc.wait()
    if socket and Path(socket).is_socket():
        Path(socket).unlink()
    return 0 if rc in (0, -signal.SIGTERM) else rc


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = configmod.load(args.file, _overrides(args.set))
    except configmod.ConfigError as e:
        print(f"nbdcache: error: {e}", file=sys.stderr)
        return 2
    from nbdcache.core.bufinit import bufinit
    p = bufinit(cfg)
    print(f"{args.file}: ok ({cfg['backend.type']} backend, {p['nbuf']} buffers of "
          f"{configmod.format_size(p['block_size'])})")
    return 0


def cmd_tunables(args: argparse.Namespace) -> int:
    print(configmod.tunables_markdown() if args.markdown else configmod.config_help())
    return 0


def cmd_vm(args: argparse.Namespace) -> int:
    from nbdcache.runner import run_vm
    return run_vm(Path(args.config), args.workload, _overrides(args.set), timeout=args.timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from nbdcache.runner import demo
    return demo()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbdcache", description="A write-back buffer cache for "
                                "QEMU disks, served by nbdkit.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a cached disk with nbdkit until interrupted")
    s.add_argument("--config", required=True, help="YAML configuration file")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a tunable, e.g. --set cache.ram=64M (repeatable)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--socket", help="Unix socket to listen on (its directory is made 0700)")
    g.add_argument("--port", type=int, help="TCP port on 127.0.0.1 to listen on")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("check-config", help="validate a configuration file (exit 0 or 2)")
    c.add_argument("file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", default=[])
    c.set_defaults(func=cmd_check_config)
    v = sub.add_parser("vm", help="serve a config's disk and run a workload in a QEMU guest")
    v.add_argument("--config", required=True, help="YAML configuration file")
    v.add_argument("--workload", default="fs", choices=["fs", "fio", "fsync", "smoke"])
    v.add_argument("--set", action="append", metavar="KEY=VALUE", default=[])
    v.add_argument("--timeout", type=float, default=600, help="seconds for the guest run")
    v.set_defaults(func=cmd_vm)
    d = sub.add_parser("demo", help="what `make run` does: the default disk, the fs workload")
    d.set_defaults(func=cmd_demo)
    from nbdcache import cli_observe
    cli_observe.add_parsers(sub)
    t = sub.add_parser("tunables", help="print the tunables table")
    t.add_argument("--markdown", action="store_true", help="as docs/tunables.md")
    t.set_defaults(func=cmd_tunables)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except configmod.ConfigError as e:
        print(f"nbdcache: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
