"""The node's TOML config file: schema, defaults, validation, and writing it back.

Owns ``load_config`` (TOML -> frozen, fully validated ``Config``), ``render_config`` /
``write_config`` (what ``nodectl init`` writes), ``parse_hostport`` and the default
locations. Every mistake a user can make in the file becomes a ``ConfigError`` whose
message names the file, the dotted key and what is allowed, so the daemon never starts
with a half-understood config.

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
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import stat
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.net.addresses import is_lan_address
from node.system.units import format_size, parse_size

__all__ = [
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
    "config_to_dict",
    "default_config_path",
    "default_data_dir",
    "known_keys",
    "load_config",
    "parse_hostport",
    "render_config",
    "write_config",
]

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
MIN_PIECE_SIZE = 16 * 1024
MAX_PIECE_SIZE = 64 * 1024 * 1024


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


# ---------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, slots=True)
class NodeSection:
    name: str
    data_dir: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class ClusterSection:
    secret_file: Path


@dataclass(frozen=True, slots=True)
class NetworkSection:
    listen: str
    peer_port: int
    dht_port: int
    bootstrap: tuple[tuple[str, int], ...]
    discovery: bool
    beacon_group: str
    beacon_port: int
    beacon_interval: float
    allow_public: bool


@dataclass(frozen=True, slots=True)
class ApiSection:
    host: str
    port: int
    token_file: Path | None

    @property
    def is_loopback(self) -> bool:
        """True when the API is reachable only from this machine."""
        return _is_loopback_host(self.host)


@dataclass(frozen=True, slots=True)
class ResourcesSection:
    max_memory: int | None  # bytes; None = decided at start by node.capabilities


@dataclass(frozen=True, slots=True)
class DhtSection:
    refresh_interval: float
    record_ttl: float
    ksize: int
    alpha: int


@dataclass(frozen=True, slots=True)
class EngineSection:
    max_context: int
    compute_dtype: str


@dataclass(frozen=True, slots=True)
class SwarmSection:
    piece_size: int
    max_upload_rate: int  # bytes/s, 0 = unlimited
    max_download_rate: int  # bytes/s, 0 = unlimited


@dataclass(frozen=True, slots=True)
class LogSection:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeSection
    cluster: ClusterSection
    network: NetworkSection
    api: ApiSection
    resources: ResourcesSection
    dht: DhtSection
    engine: EngineSection
    swarm: SwarmSection
    log: LogSection
    path: Path


# ---------------------------------------------------------------------------------------
# Default locations


def default_config_path() -> Path:
    """``$ENJAMBRE_CONFIG``, else ``$XDG_CONFIG_HOME/enjambre/node.toml`` (``~/.config``)."""
    env = os.environ.get("ENJAMBRE_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".config"
    return root / "enjambre" / "node.toml"


def default_data_dir() -> Path:
    """Where a node keeps its key, pieces and caches when the config does not say.

    ``$STATE_DIRECTORY`` first (systemd sets it from ``StateDirectory=``; a service
    with ``ProtectHome=yes`` cannot write under a home directory), then
    ``$XDG_DATA_HOME/enjambre``, then ``~/.local/share/enjambre``.
    """
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd passes a colon-separated list when several are configured.
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_DATA_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".local" / "share"
    return root / "enjambre"


# ---------------------------------------------------------------------------------------
# Host and port parsing

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _valid_hostname(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def _check_port(port: int, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}-65535")
    return port


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` / ``"[::1]:7421"`` / ``"10.0.0.2"`` into ``(host, port)``.

    IPv6 addresses with a port need brackets. Without a port, ``default_port`` is used
    (or it is an error when there is none). The host must be an IP address or a valid
    host name; brackets are removed from the returned host. Raises ``ValueError``.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected 'HOST:PORT' as a string, got {text!r}")
    raw = text.strip()
    if not raw:
        raise ValueError("empty address; expected 'HOST:PORT', e.g. '192.168.1.20:7421'")
    port_text: str | None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host = raw[1:end]
        rest = raw[end + 1 :]
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} inside brackets is not an IPv6 address") from None
    elif raw.count(":") > 1:
        # A bare IPv6 address: only unambiguous when there is no port to split off.
        try:
            ipaddress.IPv6Address(raw.split("%")[0])
        except ValueError:
            raise ValueError(
                f"{text!r} is not a valid address; write IPv6 as '[::1]:7421'"
            ) from None
        host, port_text = raw, None
    elif ":" in raw:
        host, port_text = raw.rsplit(":", 1)
    else:
        host, port_text = raw, None

    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port; write it as 'HOST:PORT', e.g. '{host}:7421'")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: port {port_text!r} is not a number")
        port = int(port_text)
    _check_port(port)
    if not _is_ip(host) and not _valid_hostname(host):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a valid host name")
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


def _is_loopback_host(host: str) -> bool:
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------
# Schema: every key, its default and how to check it


class _Invalid(Exception):
    """Raised by a field converter; load_config adds the file and the key."""


@dataclass(frozen=True)
class _Ctx:
    path: Path
    base: Path


Convert = Callable[[Any, _Ctx], Any]


@dataclass(frozen=True)
class _Field:
    convert: Convert
    default: Callable[[dict[str, Any]], Any] | None  # None = required


def _type_error(expected: str, value: Any) -> _Invalid:
    return _Invalid(f"must be {expected}, got {type(value).__name__} {value!r}")


def _as_str(value: Any, ctx: _Ctx) -> str:
    if not isinstance(value, str):
        raise _type_error("a string", value)
    return value


def _as_bool(value: Any, ctx: _Ctx) -> bool:
    if not isinstance(value, bool):
        raise _type_error("true or false", value)
    return value


def _as_int(value: Any, ctx: _Ctx) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error("an integer", value)
    return value


def _as_float(value: Any, ctx: _Ctx) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error("a number", value)
    if not math.isfinite(value):
        raise _Invalid(f"must be a finite number, got {value!r}")
    return float(value)


def _positive_float(value: Any, ctx: _Ctx) -> float:
    number = _as_float(value, ctx)
    if number <= 0:
        raise _Invalid(f"must be a positive number of seconds, got {value!r}")
    return number


def _int_range(low: int, high: int | None = None) -> Convert:
    def convert(value: Any, ctx: _Ctx) -> int:
        number = _as_int(value, ctx)
        if number < low or (high is not None and number > high):
            allowed = f"{low}-{high}" if high is not None else f">= {low}"
            raise _Invalid(f"must be an integer {allowed}, got {number}")
        return number

    return convert


def _port(*, allow_zero: bool) -> Convert:
    def convert(value: Any, ctx: _Ctx) -> int:
        number = _as_int(value, ctx)
        if allow_zero and number == 0:
            return 0
        if not 1 <= number <= 65535:
            allowed = "1-65535, or 0 to let the OS pick a free port" if allow_zero else "1-65535"
            raise _Invalid(f"port {number} is out of range; allowed: {allowed}")
        return number

    return convert


def _choice(options: tuple[str, ...]) -> Convert:
    def convert(value: Any, ctx: _Ctx) -> str:
        text = _as_str(value, ctx).lower()
        if text not in options:
            raise _Invalid(f"{value!r} is not allowed; choose one of {', '.join(options)}")
        return text

    return convert


def _size(*, minimum: int = 0, maximum: int | None = None) -> Convert:
    def convert(value: Any, ctx: _Ctx) -> int:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if size < minimum or (maximum is not None and size > maximum):
            top = f" and at most {format_size(maximum)}" if maximum is not None else ""
            raise _Invalid(f"must be at least {format_size(minimum)}{top}, got {value!r}")
        return size

    return convert


def _optional_size(value: Any, ctx: _Ctx) -> int | None:
    return int(_size(minimum=1)(value, ctx))


def _path(value: Any, ctx: _Ctx) -> Path:
    text = _as_str(value, ctx)
    if not text.strip():
        raise _Invalid("must be a path, got an empty string")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = ctx.base / path
    return path


def _node_name(value: Any, ctx: _Ctx) -> str:
    text = _as_str(value, ctx).strip()
    if not text:
        raise _Invalid("must not be empty")
    if len(text) > 64 or not text.isprintable():
        raise _Invalid(f"must be at most 64 printable characters, got {value!r}")
    return text


def _listen(value: Any, ctx: _Ctx) -> str:
    text = _as_str(value, ctx).strip()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise _Invalid(
            f"{value!r} is not an IP address; use this machine's LAN address, e.g. '192.168.1.20'"
        ) from None
    if addr.is_unspecified:
        raise _Invalid(
            f"{value!r} cannot be advertised to peers; use this machine's LAN address, "
            f"e.g. '192.168.1.20'"
        )
    return str(addr)


def _api_host(value: Any, ctx: _Ctx) -> str:
    text = _as_str(value, ctx).strip()
    if not (_is_ip(text) or _valid_hostname(text)):
        raise _Invalid(f"{value!r} is neither an IP address nor a host name")
    return text


def _multicast_group(value: Any, ctx: _Ctx) -> str:
    text = _as_str(value, ctx).strip()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise _Invalid(f"{value!r} is not an IP address") from None
    if not addr.is_multicast:
        raise _Invalid(
            f"{value!r} is not a multicast address (IPv4 224.0.0.0/4, e.g. '239.255.74.20')"
        )
    return str(addr)


def _bootstrap(value: Any, ctx: _Ctx) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise _type_error("a list of 'HOST:PORT' strings", value)
    out: list[tuple[str, int]] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _Invalid(f"entry {index} must be a 'HOST:PORT' string, got {item!r}")
        try:
            out.append(parse_hostport(item))
        except ValueError as exc:
            raise _Invalid(f"entry {index}: {exc}") from None
    return tuple(out)


def _hostname(_: dict[str, Any]) -> str:
    return socket.gethostname() or "node"


_SCHEMA: dict[str, dict[str, _Field]] = {
    "node": {
        "name": _Field(_node_name, _hostname),
        "data_dir": _Field(_path, lambda _: default_data_dir()),
        "key_file": _Field(_path, lambda sec: Path(sec["data_dir"]) / "node.key"),
    },
    "cluster": {
        "secret_file": _Field(_path, None),
    },
    "network": {
        "listen": _Field(_listen, lambda _: "127.0.0.1"),
        "peer_port": _Field(_port(allow_zero=True), lambda _: 7420),
        "dht_port": _Field(_port(allow_zero=True), lambda _: 7421),
        "bootstrap": _Field(_bootstrap, lambda _: ()),
        "discovery": _Field(_as_bool, lambda _: True),
        "beacon_group": _Field(_multicast_group, lambda _: "239.255.74.20"),
        "beacon_port": _Field(_port(allow_zero=False), lambda _: 7423),
        "beacon_interval": _Field(_positive_float, lambda _: 5.0),
        "allow_public": _Field(_as_bool, lambda _: False),
    },
    "api": {
        "host": _Field(_api_host, lambda _: "127.0.0.1"),
        "port": _Field(_port(allow_zero=True), lambda _: 7422),
        "token_file": _Field(_path, lambda _: None),
    },
    "resources": {
        "max_memory": _Field(_optional_size, lambda _: None),
    },
    "dht": {
        "refresh_interval": _Field(_positive_float, lambda _: 10.0),
        "record_ttl": _Field(_positive_float, lambda _: 30.0),
        "ksize": _Field(_int_range(1, 256), lambda _: 20),
        "alpha": _Field(_int_range(1, 64), lambda _: 3),
    },
    "engine": {
        "max_context": _Field(_int_range(1), lambda _: 4096),
        "compute_dtype": _Field(_choice(COMPUTE_DTYPES), lambda _: "auto"),
    },
    "swarm": {
        "piece_size": _Field(
            _size(minimum=MIN_PIECE_SIZE, maximum=MAX_PIECE_SIZE), lambda _: 4 * 1024 * 1024
        ),
        "max_upload_rate": _Field(_size(), lambda _: 0),
        "max_download_rate": _Field(_size(), lambda _: 0),
    },
    "log": {
        "level": _Field(_choice(LOG_LEVELS), lambda _: "info"),
        "format": _Field(_choice(LOG_FORMATS), lambda _: "auto"),
    },
}

_SECTION_TYPES: dict[str, type] = {
    "node": NodeSection,
    "cluster": ClusterSection,
    "network": NetworkSection,
    "api": ApiSection,
    "resources": ResourcesSection,
    "dht": DhtSection,
    "engine": EngineSection,
    "swarm": SwarmSection,
    "log": LogSection,
}


def known_keys() -> dict[str, tuple[str, ...]]:
    """Section -> key names, in schema order (for docs, ``nodectl init`` and tests)."""
    return {section: tuple(fields) for section, fields in _SCHEMA.items()}


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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


def _build(document: Mapping[str, Any], path: Path) -> Config:
    ctx = _Ctx(path=path, base=path.parent)
    all_keys = {key: section for section, fields in _SCHEMA.items() for key in fields}

    for name, value in document.items():
        if name not in _SCHEMA:
            if name in all_keys:
                hint = f"; it belongs in the [{all_keys[name]}] section"
            else:
                hint = _suggest(name, _SCHEMA)
            raise ConfigError(
                f"unknown section or top-level key{hint} (sections: {', '.join(_SCHEMA)})",
                path=path,
                key=name,
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"must be a table ([{name}] section), got {type(value).__name__}",
                path=path,
                key=name,
            )

    sections: dict[str, Any] = {}
    for section, fields in _SCHEMA.items():
        given: dict[str, Any] = document.get(section, {})
        for key in given:
            if key not in fields:
                hint = _suggest(key, fields)
                if not hint and key in all_keys and all_keys[key] != section:
                    hint = f"; it belongs in the [{all_keys[key]}] section"
                allowed = ", ".join(fields)
                raise ConfigError(
                    f"unknown key{hint} (keys in [{section}]: {allowed})",
                    path=path,
                    key=f"{section}.{key}",
                )
        values: dict[str, Any] = {}
        for key, spec in fields.items():
            dotted = f"{section}.{key}"
            if key in given:
                try:
                    values[key] = spec.convert(given[key], ctx)
                except _Invalid as exc:
                    raise ConfigError(str(exc), path=path, key=dotted) from None
            elif spec.default is None:
                raise ConfigError(_missing_hint(dotted), path=path, key=dotted)
            else:
                values[key] = spec.default(values)
        sections[section] = _SECTION_TYPES[section](**values)

    config = Config(path=path, **sections)
    _check_relations(config)
    _check_files(config)
    return config


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
            if _is_ip(host) and not is_lan_address(host.split("%")[0]):
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
    if config.dht.record_ttl <= config.dht.refresh_interval:
        raise ConfigError(
            f"must be longer than dht.refresh_interval ({config.dht.refresh_interval:g} s), "
            f"otherwise records expire before they are refreshed; got {config.dht.record_ttl:g} s",
            path=path,
            key="dht.record_ttl",
        )
    if config.dht.alpha > config.dht.ksize:
        raise ConfigError(
            f"must not exceed dht.ksize ({config.dht.ksize}), got {config.dht.alpha}",
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
        a == b or a in wildcard or b in wildcard or (_is_loopback_host(a) and _is_loopback_host(b))
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


# ---------------------------------------------------------------------------------------
# Writing

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        # repr gives "1e+20" for big floats; TOML needs a '.' or an exponent, both fine.
        return text
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, os.PathLike):
        return _toml_string(os.fspath(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item, where) for item in value) + "]"
    raise ValueError(
        f"{where}: cannot write {type(value).__name__} {value!r} to TOML "
        "(strings, ints, floats, bools, paths and lists of those only)"
    )


def render_config(values: dict[str, dict[str, Any]]) -> str:
    """Render ``{section: {key: value}}`` as TOML text; keys whose value is None are left out.

    A small writer for this flat schema (strings, ints, floats, bools, paths and lists of
    those), so ``nodectl init`` needs no TOML-writing dependency. The result parses back
    with ``tomllib`` to the same values.
    """
    blocks: list[str] = []
    for section, table in values.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"section {section!r} must be a dict of key -> value")
        lines = [f"[{_toml_key(section)}]"]
        for key, value in table.items():
            if value is None:
                continue
            lines.append(f"{_toml_key(key)} = {_toml_value(value, f'{section}.{key}')}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def write_config(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename); create parent dirs."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; a config holds no secrets, so use the usual mode.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain-data view of a ``Config`` (paths as strings, bootstrap as 'HOST:PORT')."""
    out: dict[str, dict[str, Any]] = {}
    for field in dataclasses.fields(config):
        if field.name == "path":
            continue
        section = getattr(config, field.name)
        table: dict[str, Any] = {}
        for sub in dataclasses.fields(section):
            value = getattr(section, sub.name)
            if isinstance(value, Path):
                value = str(value)
            elif sub.name == "bootstrap":
                value = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in value]
            table[sub.name] = value
        out[field.name] = table
    return out
