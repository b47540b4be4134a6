"""The node's TOML config file: loading and validating it (and the public names).

Owns ``load_config`` (TOML -> frozen, fully validated ``Config``) and the default
config location. What the file may contain is declared once in ``node.config_schema``
(sections, keys, defaults, doc texts); how one value is checked is in
``node.config_values``; writing files (``render_config``, ``write_config``, the shipped
example) is in ``node.config_render``. This module re-exports all of it, so callers
import from ``node.config`` only. Every mistake a user can make in the file becomes a
``ConfigError`` whose message names the file, the dotted key and what is allowed, so
the daemon never starts with a half-understood config.

Regenerate ``configs/node.example.toml`` after changing the schema with::

    python -m node.config --example > configs/node.example.toml

Decisions:

* Relative paths resolve against the directory of the config file (not the working
  directory), so a service and a shell read the same file the same way. ``~`` expands.
* Port 0 means "let the OS pick" and is allowed for ``network.peer_port``,
  ``network.dht_port`` and ``api.port`` (tests and throw-away nodes use it). The beacon
  port must be fixed (1-65535): every node of the LAN has to listen on the same one.
* ``network.listen`` is the address peers are told to dial, so it must be a concrete IP
  address (not 0.0.0.0 / ::).
* Secret material (``cluster.secret_file``, ``node.key_file``, ``api.token_file``) must
  not be readable by group or others; the error says which ``chmod`` fixes it.
* A renamed key (``schema.RENAMED``) is an error naming the new key, not a silent
  alias: two spellings of one setting in the wild is how files end up disagreeing.
"""

from __future__ import annotations

import argparse
import difflib
import os
import stat
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from node.config_render import render_config, render_example, update_config, write_config
from node.config_schema import (
    COMPUTE_DTYPES,
    DEFAULT_API_HOST,
    DEFAULT_API_PORT,
    DEFAULT_BEACON_GROUP,
    DEFAULT_BEACON_PORT,
    DEFAULT_DHT_PORT,
    DEFAULT_LISTEN,
    DEFAULT_PEER_PORT,
    LOG_FORMATS,
    LOG_LEVELS,
    RENAMED,
    ApiSection,
    ClusterSection,
    Config,
    DhtSection,
    EngineSection,
    LogSection,
    NetworkSection,
    NodeSection,
    ResourcesSection,
    SwarmSection,
    default_data_dir,
    keys,
    sections,
)
from node.config_values import Ctx, Invalid
from node.net.addresses import is_ip, is_lan_address, is_loopback_host

__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_API_HOST",
    "DEFAULT_API_PORT",
    "DEFAULT_BEACON_GROUP",
    "DEFAULT_BEACON_PORT",
    "DEFAULT_DHT_PORT",
    "DEFAULT_LISTEN",
    "DEFAULT_PEER_PORT",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ApiSection",
    "ClusterSection",
    "Config",
    "ConfigError",
    "DhtSection",
    "EngineSection",
    "LogSection",
    "NetworkSection",
    "NodeSection",
    "ResourcesSection",
    "SwarmSection",
    "default_config_path",
    "default_data_dir",
    "load_config",
    "render_config",
    "render_example",
    "update_config",
    "write_config",
]


class ConfigError(Exception):
    """A config file that cannot be used; the message says where and how to fix it."""

    def __init__(self, message: str, *, path: Path | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        prefix = ""
        if path is not None:
            prefix += f"{path}: "
        if key is not None:
            prefix += f"{key}: "
        super().__init__(prefix + message)


def default_config_path() -> Path:
    """``$ENJAMBRE_CONFIG``, else ``$XDG_CONFIG_HOME/enjambre/node.toml`` (``~/.config``)."""
    env = os.environ.get("ENJAMBRE_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".config"
    return root / "enjambre" / "node.toml"


# ---------------------------------------------------------------------------------------
# Loading


def load_config(path: Path) -> Config:
    """Read, check and return the config at ``path``; raise ``ConfigError`` on any problem.

    Checks everything the daemon relies on: types and ranges of every key, that the
    cluster secret file exists and is private, that the node key (if present) and API
    token file are private, and that a non-loopback API has a token.
    """
    path = Path(path).expanduser()
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            "config file not found; create one with `nodectl init` or pass --config PATH",
            path=path,
        ) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", path=path) from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text (byte {exc.start}); save it as UTF-8", path=path
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message already carries "(at line N, column M)".
        raise ConfigError(f"invalid TOML: {exc}", path=path) from None
    return _build(document, path.absolute())


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _build(document: Mapping[str, Any], path: Path) -> Config:
    ctx = Ctx(path=path, base=path.parent)
    schema = {name: keys(cls) for name, cls in sections().items()}
    home = {key: section for section, fields in schema.items() for key in fields}

    for name, value in document.items():
        if name not in schema:
            if name in home:
                hint = f"; it belongs in the [{home[name]}] section"
            else:
                hint = _suggest(name, schema)
            raise ConfigError(
                f"unknown section or top-level key{hint} (sections: {', '.join(schema)})",
                path=path,
                key=name,
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"must be a table ([{name}] section), got {type(value).__name__}",
                path=path,
                key=name,
            )

    built: dict[str, Any] = {}
    for section, cls in sections().items():
        fields = schema[section]
        given: dict[str, Any] = document.get(section, {})
        for key in given:
            if key not in fields:
                raise ConfigError(
                    _unknown_key_hint(section, key, fields, home), path=path, key=f"{section}.{key}"
                )
        values: dict[str, Any] = {}
        for key, spec in fields.items():
            dotted = f"{section}.{key}"
            if key in given:
                try:
                    values[key] = spec.convert(given[key], ctx)
                except Invalid as exc:
                    raise ConfigError(str(exc), path=path, key=dotted) from None
            elif spec.required:
                raise ConfigError(_missing_hint(dotted), path=path, key=dotted)
            elif spec.computed is not None:
                values[key] = spec.computed(values)
            elif spec.default is not None:
                # Defaults are written as in the file, so they convert like a user's value.
                values[key] = spec.convert(spec.default, ctx)
            else:
                values[key] = None
        built[section] = cls(**values)

    config = Config(path=path, **built)
    _check_relations(config)
    _check_files(config)
    return config


def _unknown_key_hint(
    section: str, key: str, fields: Mapping[str, Any], home: Mapping[str, str]
) -> str:
    new = RENAMED.get(f"{section}.{key}")
    if new is not None:
        new_section, new_key = new.split(".", 1)
        return (
            f"this key is now called {new}; rename `{key} = ...` to `{new_key} = ...` "
            f"under [{new_section}]"
        )
    allowed = ", ".join(fields)
    hint = _suggest(key, fields)
    if not hint and key in home and home[key] != section:
        hint = f"; it belongs in the [{home[key]}] section"
    return f"unknown key{hint} (keys in [{section}]: {allowed})"


def _missing_hint(dotted: str) -> str:
    if dotted == "cluster.secret_file":
        return (
            'is required; add `secret_file = "cluster.secret"` under [cluster] (a path '
            "relative to this file). `nodectl init --new-cluster` creates a new secret; to join "
            "a cluster, save the output of `nodectl secret` (run on a member) to a file and run "
            "`nodectl init --secret-file FILE`"
        )
    return "is required"


def _check_relations(config: Config) -> None:
    path = config.path
    net = config.network
    if not net.allow_public:
        if not is_lan_address(net.listen):
            raise ConfigError(
                f"{net.listen} is a public address; enjambre is LAN-only by default. "
                f"Use a private address or set network.allow_public = true",
                path=path,
                key="network.listen",
            )
        for host, port in net.bootstrap:
            # Host names are resolved (and checked) when the node dials them.
            if is_ip(host) and not is_lan_address(host):
                raise ConfigError(
                    f"{host}:{port} is a public address; peers must be on the LAN unless "
                    f"network.allow_public = true",
                    path=path,
                    key="network.bootstrap",
                )
    for name in ("peer_port", "dht_port"):
        if (
            getattr(net, name) != 0
            and getattr(net, name) == config.api.port
            and _same_host(net.listen, config.api.host)
        ):
            raise ConfigError(
                f"network.{name} and api.port are both {config.api.port}; give them different ports",
                path=path,
                key="api.port",
            )
    if net.peer_port != 0 and net.peer_port == net.dht_port:
        # Different protocols (TCP vs UDP) could share a number, but one port per role
        # keeps firewall rules and error messages unambiguous.
        raise ConfigError(
            f"network.peer_port and network.dht_port are both {net.peer_port}; "
            "give them different ports",
            path=path,
            key="network.dht_port",
        )
    dht = config.dht
    if dht.record_ttl <= dht.republish_interval:
        raise ConfigError(
            f"must be longer than dht.republish_interval ({dht.republish_interval:g} s), "
            f"otherwise records expire before they are re-published; got {dht.record_ttl:g} s",
            path=path,
            key="dht.record_ttl",
        )
    if dht.alpha > dht.ksize:
        raise ConfigError(
            f"must not exceed dht.ksize ({dht.ksize}), got {dht.alpha}",
            path=path,
            key="dht.alpha",
        )
    if not config.api.is_loopback and config.api.token_file is None:
        raise ConfigError(
            f"api.host = {config.api.host!r} exposes the HTTP API to the network, which needs a "
            "bearer token: set api.token_file to a file holding the token (chmod 600), "
            "or bind the API to 127.0.0.1",
            path=path,
            key="api.token_file",
        )


def _same_host(a: str, b: str) -> bool:
    # Binding all interfaces collides with any specific address on the same port.
    wildcard = {"0.0.0.0", "::", "", "*"}
    return (
        a == b or a in wildcard or b in wildcard or (is_loopback_host(a) and is_loopback_host(b))
    )


def _check_files(config: Config) -> None:
    path = config.path
    secret = config.cluster.secret_file
    if not secret.exists():
        raise ConfigError(
            f"{secret} does not exist. To start a new cluster, run `nodectl init --new-cluster`; "
            f"to join an existing one, run `nodectl secret` on a node of that cluster, save its "
            f"output to a file and run `nodectl init --secret-file FILE` (or save it as {secret} "
            f"and run `chmod 600 {secret}`)",
            path=path,
            key="cluster.secret_file",
        )
    _check_private_file(secret, path, "cluster.secret_file", must_be_nonempty=True)
    if config.node.key_file.exists():
        _check_private_file(config.node.key_file, path, "node.key_file")
    token = config.api.token_file
    if token is not None:
        if not token.exists():
            raise ConfigError(
                f"{token} does not exist; write a long random token to it, e.g. "
                f"`python -c 'import secrets; print(secrets.token_urlsafe(32))' > {token} "
                f"&& chmod 600 {token}`",
                path=path,
                key="api.token_file",
            )
        _check_private_file(token, path, "api.token_file", must_be_nonempty=True)


def _check_private_file(
    file: Path, config_path: Path, key: str, *, must_be_nonempty: bool = False
) -> None:
    try:
        info = file.stat()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {file}: {exc.strerror or exc}", path=config_path, key=key
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{file} is not a regular file", path=config_path, key=key)
    if os.name == "posix" and info.st_mode & 0o077:
        raise ConfigError(
            f"{file} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"it holds secret material: run `chmod 600 {file}`",
            path=config_path,
            key=key,
        )
    if must_be_nonempty and info.st_size == 0:
        raise ConfigError(f"{file} is empty", path=config_path, key=key)
    if not os.access(file, os.R_OK):
        raise ConfigError(
            f"{file} is not readable by this user (uid {os.getuid()}); fix its owner with chown",
            path=config_path,
            key=key,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.config --example``: print the example config."""
    parser = argparse.ArgumentParser(
        prog="python -m node.config", description="Print the example node config."
    )
    parser.add_argument(
        "--example", action="store_true", help="print configs/node.example.toml as it should be"
    )
    args = parser.parse_args(argv)
    if not args.example:
        parser.print_usage(sys.stderr)
        return 2
    sys.stdout.write(render_example())
    return 0


if __name__ == "__main__":
    sys.exit(main())
