"""Config values: how one key's value is checked and turned into its Python type.

Each converter takes the value as TOML gave it and the file's ``Ctx`` (relative paths
resolve against the config file's directory) and returns the typed value, or raises
``Invalid`` with a message saying what is allowed. The loader adds the file and the
dotted key, so the messages here never repeat them. Checks between keys live in the
loader (``node.config``), not here: a converter sees one value.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.net.addresses import is_ip, parse_hostport, valid_hostname
from node.system.units import format_size, parse_size

__all__ = [
    "Convert",
    "Ctx",
    "Invalid",
    "api_host",
    "as_bool",
    "as_float",
    "as_int",
    "as_str",
    "bootstrap",
    "choice",
    "int_range",
    "listen_address",
    "multicast_group",
    "node_name",
    "node_names",
    "path",
    "port",
    "positive_seconds",
    "size",
]


class Invalid(Exception):
    """Raised by a converter; the loader adds the file and the key to the message."""


@dataclass(frozen=True)
class Ctx:
    path: Path  # the config file
    base: Path  # what relative paths in it are relative to


Convert = Callable[[Any, Ctx], Any]


def _type_error(expected: str, value: Any) -> Invalid:
    return Invalid(f"must be {expected}, got {type(value).__name__} {value!r}")


def as_str(value: Any, ctx: Ctx) -> str:
    if not isinstance(value, str):
        raise _type_error("a string", value)
    return value


def as_bool(value: Any, ctx: Ctx) -> bool:
    if not isinstance(value, bool):
        raise _type_error("true or false", value)
    return value


def as_int(value: Any, ctx: Ctx) -> int:
    # bool is an int subclass; `peer_port = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error("an integer", value)
    return value


def as_float(value: Any, ctx: Ctx) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error("a number", value)
    if not math.isfinite(value):
        raise Invalid(f"must be a finite number, got {value!r}")
    return float(value)


def positive_seconds(value: Any, ctx: Ctx) -> float:
    number = as_float(value, ctx)
    if number <= 0:
        raise Invalid(f"must be a positive number of seconds, got {value!r}")
    return number


def int_range(low: int, high: int | None = None) -> Convert:
    def convert(value: Any, ctx: Ctx) -> int:
        number = as_int(value, ctx)
        if number < low or (high is not None and number > high):
            allowed = f"{low}-{high}" if high is not None else f">= {low}"
            raise Invalid(f"must be an integer {allowed}, got {number}")
        return number

    return convert


def port(*, allow_zero: bool) -> Convert:
    def convert(value: Any, ctx: Ctx) -> int:
        number = as_int(value, ctx)
        if allow_zero and number == 0:
            return 0
        if not 1 <= number <= 65535:
            allowed = "1-65535, or 0 to let the OS pick a free port" if allow_zero else "1-65535"
            raise Invalid(f"port {number} is out of range; allowed: {allowed}")
        return number

    return convert


def choice(options: tuple[str, ...]) -> Convert:
    def convert(value: Any, ctx: Ctx) -> str:
        text = as_str(value, ctx).lower()
        if text not in options:
            raise Invalid(f"{value!r} is not allowed; choose one of {', '.join(options)}")
        return text

    return convert


def size(*, minimum: int = 0, maximum: int | None = None) -> Convert:
    def convert(value: Any, ctx: Ctx) -> int:
        try:
            number = parse_size(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if number < minimum or (maximum is not None and number > maximum):
            top = f" and at most {format_size(maximum)}" if maximum is not None else ""
            raise Invalid(f"must be at least {format_size(minimum)}{top}, got {value!r}")
        return number

    return convert


def path(value: Any, ctx: Ctx) -> Path:
    text = as_str(value, ctx)
    if not text.strip():
        raise Invalid("must be a path, got an empty string")
    result = Path(text).expanduser()
    if not result.is_absolute():
        result = ctx.base / result
    return result


def node_name(value: Any, ctx: Ctx) -> str:
    text = as_str(value, ctx).strip()
    if not text:
        raise Invalid("must not be empty")
    if len(text) > 64 or not text.isprintable():
        raise Invalid(f"must be at most 64 printable characters, got {value!r}")
    return text


def node_names(value: Any, ctx: Ctx) -> tuple[str, ...]:
    """Node names or node ids (64 hex digits), as `nodectl status` shows them."""
    if not isinstance(value, list):
        raise _type_error('a list of node names or ids such as ["workstation-1"]', value)
    if len(value) > 1024:
        raise Invalid(f"lists at most 1024 nodes, got {len(value)}")
    out: list[str] = []
    for index, item in enumerate(value):
        try:
            out.append(node_name(item, ctx))
        except Invalid as exc:
            raise Invalid(f"entry {index}: {exc}") from None
    return tuple(out)


def listen_address(value: Any, ctx: Ctx) -> str:
    text = as_str(value, ctx).strip()
    # Strictly one IP literal, not node.net.addresses.parse_ip: this text is bound and
    # advertised as it is, so brackets must not be forgiven and a scope must not be lost.
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(
            f"{value!r} is not an IP address; use this machine's LAN address, e.g. '192.168.1.20'"
        ) from None
    if addr.is_unspecified:
        raise Invalid(
            f"{value!r} cannot be advertised to peers; use this machine's LAN address, "
            f"e.g. '192.168.1.20'"
        )
    return str(addr)


def api_host(value: Any, ctx: Ctx) -> str:
    text = as_str(value, ctx).strip()
    if text.startswith("["):
        # The host is handed to bind() as written, and bind() takes no brackets.
        raise Invalid(f"{value!r}: write an IPv6 address without brackets, e.g. '::1'")
    if not (is_ip(text) or valid_hostname(text)):
        raise Invalid(f"{value!r} is neither an IP address nor a host name")
    return text


def multicast_group(value: Any, ctx: Ctx) -> str:
    text = as_str(value, ctx).strip()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(f"{value!r} is not an IP address") from None
    if not addr.is_multicast:
        raise Invalid(
            f"{value!r} is not a multicast address (IPv4 224.0.0.0/4, e.g. '239.255.74.20')"
        )
    return str(addr)


def bootstrap(value: Any, ctx: Ctx) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise _type_error("a list of 'HOST:PORT' strings", value)
    out: list[tuple[str, int]] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise Invalid(f"entry {index} must be a 'HOST:PORT' string, got {item!r}")
        try:
            out.append(parse_hostport(item))
        except ValueError as exc:
            raise Invalid(f"entry {index}: {exc}") from None
    return tuple(out)


def origins(value: Any, ctx: Ctx) -> tuple[str, ...]:
    """Web origins ("http://host:port", as a browser sends them in the Origin header)."""
    if not isinstance(value, list):
        raise _type_error('a list of origins such as "http://192.168.1.20:8080"', value)
    out: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise Invalid(f"entry {index} must be a string, got {item!r}")
        text = item.strip().rstrip("/").lower()
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            raise Invalid(
                f"entry {index} ({item!r}) is not an origin; write scheme and host with an optional "
                'port and no path, e.g. "http://192.168.1.20:8080"'
            )
        out.append(text)
    return tuple(out)
