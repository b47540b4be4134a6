"""`nodectl`: set up a node, run the daemon, and ask it about the cluster.

Client commands find the daemon like Ollama's `OLLAMA_HOST`: `--host HOST:PORT`,
else `$ENJAMBRE_HOST`, else the API address in the config (`--config`,
`$ENJAMBRE_CONFIG`, default path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from node import __version__
from node.cli_models import add_model_commands
from node.cli_run import add_run_commands
from node.client import CliError, call, load_config_for
from node.config import (
    DEFAULT_API_HOST,
    DEFAULT_API_PORT,
    DEFAULT_DHT_PORT,
    DEFAULT_LISTEN,
    DEFAULT_PEER_PORT,
    LOG_LEVELS,
    default_config_path,
)
from node.demo import add_demo_command
from node.net.addresses import format_hostport, parse_hostport

# ---------------------------------------------------------------------------- init / secret


def _secret_text(args: argparse.Namespace) -> tuple[str, bool]:
    """The cluster secret text for init, and whether it is new."""
    from node.identity import IdentityError, generate_secret, parse_secret

    if args.new_cluster:
        return generate_secret(), True
    if args.secret_file:
        try:
            text = Path(args.secret_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read secret file {args.secret_file}: {exc.strerror}") from None
        origin = str(args.secret_file)
    elif os.environ.get("ENJAMBRE_SECRET"):
        text, origin = os.environ["ENJAMBRE_SECRET"], "$ENJAMBRE_SECRET"
    else:
        raise CliError(
            "say which cluster this node joins: --new-cluster for the first machine, or "
            "--secret-file FILE (or $ENJAMBRE_SECRET) holding the secret another node printed"
        )
    try:
        parse_secret(text)
    except IdentityError as exc:
        raise CliError(f"{origin}: {exc}") from None
    return text.strip(), False


def cmd_init(args: argparse.Namespace) -> int:
    from node.config import ConfigError, default_data_dir, load_config, render_config, write_config
    from node.identity import NodeKey, write_secret_file

    config_path = Path(args.config or default_config_path()).expanduser().absolute()
    if config_path.exists() and not args.force:
        raise CliError(f"{config_path} already exists; use --force to overwrite it (the node keeps its key)")
    secret, is_new = _secret_text(args)
    for hp in args.bootstrap:
        try:
            parse_hostport(hp)
        except ValueError as exc:
            raise CliError(f"--bootstrap {hp}: {exc}") from None
    data_dir = Path(args.data_dir).expanduser().absolute() if args.data_dir else default_data_dir()
    secret_path = config_path.parent / "cluster.secret"
    key_path = data_dir / "node.key"
    values: dict[str, dict[str, Any]] = {
        "node": {"name": args.name or socket.gethostname(), "data_dir": str(data_dir), "key_file": str(key_path)},
        "cluster": {"secret_file": str(secret_path)},
        "network": {
            "listen": args.listen, "peer_port": args.peer_port, "dht_port": args.dht_port,
            "bootstrap": list(args.bootstrap), "discovery": not args.no_discovery,
        },
        "api": {"host": args.api_host, "port": args.api_port},
    }
    if args.max_memory:
        values["resources"] = {"max_memory": args.max_memory}
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret_file(secret_path, secret)
    if key_path.exists():
        key = NodeKey.load(key_path)
    else:
        key = NodeKey.generate()
        key.save(key_path)
    write_config(config_path, render_config(values))
    try:
        load_config(config_path)
    except ConfigError as exc:  # a flag value the schema refuses
        config_path.unlink()
        raise CliError(str(exc)) from None
    print(f"config:  {config_path}")
    print(f"node id: {key.node_id}")
    if is_new:
        print("\nNew cluster secret (copy it to every other machine of this cluster, e.g. into a file, then run")
        print("`nodectl init --secret-file FILE` there; `nodectl secret` prints it again):\n")
        print(f"    {secret}\n")
    print(f"start the node with: nodectl serve --config {config_path}")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    from node.identity import (
        IdentityError,
        format_secret,
        generate_secret,
        read_secret_file,
        write_secret_file,
    )

    if args.new:  # the first step of rotating the secret: nothing is installed yet
        print(generate_secret())
        return 0
    cfg = load_config_for(args)
    try:
        if args.set:
            text, _ = _secret_text(argparse.Namespace(new_cluster=False, secret_file=args.set))
            write_secret_file(cfg.cluster.secret_file, text)
            print(f"installed the new cluster secret in {cfg.cluster.secret_file}; restart the daemon "
                  "(`systemctl restart enjambre`) to join the cluster that uses it")
            return 0
        print(format_secret(read_secret_file(cfg.cluster.secret_file)))
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    return 0


# ---------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from node.daemon import Daemon, DaemonError
    from node.system.logs import configure_logging

    cfg = load_config_for(args)
    configure_logging(args.log_level or cfg.log.level, cfg.log.format)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - platforms without uvloop
        runner = asyncio.run
    daemon = Daemon(cfg)
    try:
        runner(daemon.run_until_signalled())
    except DaemonError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        pass
    return 0


def cmd_service_install(args: argparse.Namespace) -> int:
    from node.system.install import InstallError, install

    try:
        install(
            args.kind, nodectl_path=args.nodectl, config_path=args.config, dry_run=args.dry_run,
            dest_root=args.dest_root, user=args.user, templates=args.templates,
        )
    except InstallError as exc:
        raise CliError(f"service: {exc}") from None
    return 0


# ---------------------------------------------------------------------------- client side


def _gib(n: Any) -> str:
    return f"{float(n) / 2**30:.1f}" if isinstance(n, int | float) else "?"


def _layers_memory(node: Mapping[str, Any]) -> int:
    # "used" is what the node's loaded layers hold, comparable with what it lends; the
    # process's resident memory (jax, the runtime) is the record's "rss".
    serving = node.get("serving")
    entries = serving if isinstance(serving, list) else []
    return sum(e["memory"] for e in entries if isinstance(e, dict) and isinstance(e.get("memory"), int))


def _ms(value: Any) -> str:
    return f"{value:.0f} ms" if isinstance(value, int | float) and not isinstance(value, bool) else "?"


def _ago(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    return "now" if seconds < 1 else f"{seconds:.0f}s ago"


def _printable(value: Any, limit: int = 64) -> str:
    # Names and devices come from other members' records: never let them move the
    # cursor, clear the screen or forge lines on the operator's terminal.
    return "".join(ch if ch.isprintable() else "?" for ch in str(value)[:limit])


def render_status(data: dict[str, Any]) -> str:
    nodes = data.get("nodes", [])
    header = ["", "NAME", "ID", "ADDRESS", "STATE", "DEVICE", "MEMORY GiB used/allowed/total", "TFLOPS", "LAG",
              "SEEN"]
    rows = [header]
    for n in nodes:
        addr = (n.get("addresses") or ["?"])[0]
        rows.append([
            "*" if n.get("id") == data.get("self") else "",
            _printable(n.get("name", "?")),
            _printable(n.get("id", ""), 12),
            _printable(format_hostport(str(addr), n.get("peer_port", "?"))),
            _printable(n.get("state", "?")),
            _printable(n.get("device", "?"), 32),
            f"{_gib(_layers_memory(n))} / {_gib(n.get('memory_allowed'))} / {_gib(n.get('memory_total'))}",
            f"{float(n.get('tflops', 0.0)):.2f}",
            _ms(n.get("loop_lag_ms")),
            _ago(n.get("last_seen_s")),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    mem_allowed = sum(float(n.get("memory_allowed", 0)) for n in nodes)
    mem_total = sum(float(n.get("memory_total", 0)) for n in nodes)
    tflops = sum(float(n.get("tflops", 0.0)) for n in nodes)
    lines.append("")
    lines.append(
        f"cluster {data.get('cluster', '?')}: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
        f"{_gib(mem_allowed)} GiB allowed of {_gib(mem_total)} GiB, {tflops:.2f} TFLOPS  (* = this node)"
    )
    serving = [(n, e) for n in nodes for e in (n.get("serving") or []) if isinstance(e, dict)]
    if serving:
        lines.append("")
        lines.append("loaded models:")
        for n, e in sorted(serving, key=lambda ne: (str(ne[1].get("name")), ne[1].get("start", 0))):
            lines.append(
                f"  {_printable(e.get('name', '?'))}  layers [{e.get('start')}, {e.get('end')})  on "
                f"{_printable(n.get('name', '?'))}  {e.get('sessions', 0)} session(s)"
            )
    for n in nodes:
        for doubt in (n.get("doubtful") or [])[:4]:
            lines.append(f"warning: {_printable(n.get('name', '?'))} {_printable(str(doubt), 200)}; "
                         "planners count it capped (cluster.deny keeps a node from serving)")
        offset = n.get("clock_offset_s")
        if isinstance(offset, int | float) and abs(offset) >= 10:
            side = "ahead of" if offset > 0 else "behind"
            lines.append(
                f"warning: {_printable(n.get('name', '?'))}'s clock is {abs(offset):.0f} s {side} its peers'; "
                "synchronise it (NTP): beyond 60 s the DHT drops its traffic"
            )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/api/cluster/status")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render_status(data))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    data = call(args, "POST", f"/api/cluster/ping/{args.node_id}")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"{data['name']} ({data['id'][:12]}) at {data['address']}: "
              f"connect {data['connect_ms']:.2f} ms, round trip {data['rtt_ms']:.2f} ms over mutual TLS")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodectl", description="enjambre: one private LLM server from the machines on your LAN")
    p.add_argument("--version", action="version", version=f"enjambre {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="node config (default $ENJAMBRE_CONFIG or ~/.config/enjambre/node.toml)")

    def client(sp: argparse.ArgumentParser) -> None:
        with_config(sp)
        sp.add_argument("--host", help="daemon API as HOST:PORT (default $ENJAMBRE_HOST, else the config's)")
        sp.add_argument("--token-file", help="file holding the API bearer token "
                        "(default $ENJAMBRE_TOKEN, else the config's api.token_file)")
        sp.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the daemon")
        sp.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("init", help="write this node's config and key")
    with_config(s)
    s.add_argument("--data-dir", help="where the node keeps its key and pieces")
    s.add_argument("--name", help="a name for this node (default: host name)")
    s.add_argument("--listen", default=DEFAULT_LISTEN,
                   help="address this node binds and advertises to peers (default: %(default)s)")
    s.add_argument("--peer-port", type=int, default=DEFAULT_PEER_PORT,
                   help="TCP port for encrypted node-to-node streams (default: %(default)s)")
    s.add_argument("--dht-port", type=int, default=DEFAULT_DHT_PORT, help="UDP port for the DHT (default: %(default)s)")
    s.add_argument("--api-host", default=DEFAULT_API_HOST, help="address of the local HTTP API (default: %(default)s)")
    s.add_argument("--api-port", type=int, default=DEFAULT_API_PORT, help="port of the local HTTP API (default: %(default)s)")
    s.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT",
                   help="another node's DHT address (its --listen and --dht-port); repeatable")
    s.add_argument("--no-discovery", action="store_true", help="do not use the LAN multicast beacon")
    s.add_argument("--max-memory", help='memory this node may use, e.g. "8GiB" (default: a safe share of free memory)')
    group = s.add_mutually_exclusive_group()
    group.add_argument("--new-cluster", action="store_true", help="start a new cluster and print its secret")
    group.add_argument("--secret-file", help="file holding the secret of the cluster to join")
    s.add_argument("--force", action="store_true", help="overwrite an existing config")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("secret", help="print the cluster secret, to copy it to another machine; rotate it")
    with_config(s)
    action = s.add_mutually_exclusive_group()
    action.add_argument("--new", action="store_true", help="print a new random secret (installs nothing)")
    action.add_argument("--set", metavar="FILE", help="replace this node's secret with the one in FILE "
                        "(then restart the daemon)")
    s.set_defaults(func=cmd_secret)

    s = sub.add_parser("serve", help="run the node daemon in the foreground")
    with_config(s)
    s.add_argument("--log-level", choices=LOG_LEVELS, help="overrides log.level of the config")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="show the cluster")
    client(s)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("ping", help="measure the encrypted round trip to another node")
    client(s)
    s.add_argument("node_id", help="node id or a unique prefix (see `nodectl status`)")
    s.set_defaults(func=cmd_ping)

    add_model_commands(sub, client)
    add_run_commands(sub, client)
    add_demo_command(sub)

    s = sub.add_parser("service", help="install the systemd unit or launchd agent")
    service = s.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    si = service.add_parser(
        "install", help="install the systemd unit (Linux) or launchd agent (macOS)",
        description="Write the service file with the real nodectl and config paths, create the "
        "system user (Linux) and print the commands that start the service.",
    )
    si.add_argument("--kind", choices=["systemd", "launchd"], help="default: from this OS")
    si.add_argument("--nodectl", type=Path, help="path of nodectl (default: the one of this Python)")
    si.add_argument("--config", type=Path, help="node config the service reads (systemd default: "
                    "/etc/enjambre/node.toml; launchd default: ~/.config/enjambre/node.toml)")
    si.add_argument("--user", help="system user of the service (systemd; default: enjambre)")
    si.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    si.add_argument("--dest-root", type=Path, help="write under this directory instead of /")
    si.add_argument("--templates", type=Path, help="directory of the templates (default: the packaged ones)")
    si.set_defaults(func=cmd_service_install)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"nodectl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while waiting for the daemon: no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
