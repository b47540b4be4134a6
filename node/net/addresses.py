"""Addresses: parsing and printing hosts and ports, and the LAN-only peer policy.

The one place that turns text into an IP address (``parse_ip``), a ``"HOST:PORT"``
string into ``(host, port)`` (``parse_hostport``) and back (``format_hostport``,
``format_address`` for asyncio peernames). Everything else asks here instead of
splitting on ``:`` itself, so brackets, ``%scope`` suffixes and IPv4-mapped IPv6 are
handled the same way everywhere.

It also owns the LAN policy. enjambre is a LAN cluster: peers, bootstrap addresses and
beacon sources whose address is not private, loopback or link-local are refused unless
the operator set ``network.allow_public = true``. Every network component (DHT, beacon,
transport) and the config loader ask this module instead of deciding on their own.

Pure: standard library ``ipaddress`` and ``re`` only, no name resolution, no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

__all__ = [
    "PeerAddressRefused",
    "check_peer_address",
    "format_address",
    "format_hostport",
    "is_allowed",
    "is_ip",
    "is_lan_address",
    "is_loopback_host",
    "parse_hostport",
    "parse_ip",
    "valid_hostname",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---------------------------------------------------------------------------------------
# Hosts


def _ip_literal(text: str) -> IPAddress | None:
    # The scope ("fe80::1%eth0") names an interface, not a different address.
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def parse_ip(text: str) -> IPAddress | None:
    """The IP address ``text`` names, or None when it is not an IP literal.

    Lenient about spelling, strict about meaning: surrounding spaces and brackets
    (``"[::1]"``) are removed, a ``%scope`` suffix is dropped, and an IPv4-mapped IPv6
    address (``"::ffff:10.0.0.1"``, what a dual-stack socket reports for an IPv4 peer)
    comes back as the IPv4 address, so policy checks see what the peer really is.
    Host names are not resolved: they are None here.
    """
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        stripped = stripped[1:-1]
    addr = _ip_literal(stripped)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_ip(host: str) -> bool:
    """True if ``host`` is an IP literal (in any spelling ``parse_ip`` accepts)."""
    return parse_ip(host) is not None


_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def valid_hostname(host: str) -> bool:
    """True if ``host`` is a syntactically valid DNS name (labels of letters, digits, '-')."""
    if not host or len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def is_loopback_host(host: str) -> bool:
    """True if ``host`` can only reach this machine: ``localhost`` or a loopback IP."""
    if host.strip().lower() in {"localhost", "localhost."}:
        return True
    addr = parse_ip(host)
    return addr is not None and addr.is_loopback


# ---------------------------------------------------------------------------------------
# HOST:PORT


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` / ``"[::1]:7421"`` / ``"10.0.0.2"`` into ``(host, port)``.

    IPv6 addresses with a port need brackets. Without a port, ``default_port`` is used
    (or it is an error when there is none). The host must be an IP address or a valid
    host name; brackets are removed from the returned host, a ``%scope`` is kept (a
    link-local peer is dialled through it). Raises ``ValueError`` saying what to write.
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
        inside = _ip_literal(host)
        if inside is None or inside.version != 6:
            raise ValueError(f"{text!r}: {host!r} inside brackets is not an IPv6 address")
    elif raw.count(":") > 1:
        # A bare IPv6 address: only unambiguous when there is no port to split off.
        bare = _ip_literal(raw)
        if bare is None or bare.version != 6:
            raise ValueError(f"{text!r} is not a valid address; write IPv6 as '[::1]:7421'")
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
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    # _ip_literal, not parse_ip: the host is returned as written, so it must not carry
    # the spaces or brackets parse_ip would forgive.
    if _ip_literal(host) is None and not valid_hostname(host):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a valid host name")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """``"host:port"``, with the brackets IPv6 needs (``"[fe80::1%eth0]:7421"``).

    The inverse of ``parse_hostport`` for any host it returns.
    """
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def format_address(address: Any) -> str:
    """An asyncio peername / sockname (``(host, port, ...)``) as ``HOST:PORT`` for logs.

    IPv6 peernames carry flowinfo and scope id as extra items; they are left out.
    Anything else (a Unix socket path, None) is printed as it is.
    """
    if isinstance(address, tuple) and len(address) >= 2:
        return format_hostport(str(address[0]), address[1])
    return str(address)


# ---------------------------------------------------------------------------------------
# LAN policy


class PeerAddressRefused(ValueError):
    """A peer address is outside the LAN ranges and public peers are not allowed."""


# Explicit ranges rather than ``ipaddress.is_private``: that property also
# covers documentation and benchmark ranges (e.g. 203.0.113.0/24) and its
# meaning changed between Python releases. Carrier-grade NAT (100.64.0.0/10)
# is shared with strangers on the ISP side, so it is not LAN.
_LAN_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fc00::/7"),
)


def is_lan_address(host: str) -> bool:
    """True if ``host`` is a literal IP in a private, loopback or link-local range.

    Hostnames are not resolved here (that would make a policy check do I/O);
    they count as not-LAN, so callers resolve first and check the address.
    """
    addr = parse_ip(host)
    if addr is None:
        return False
    return any(addr.version == net.version and addr in net for net in _LAN_NETWORKS)


def is_allowed(host: str, allow_public: bool) -> bool:
    """True if a peer at ``host`` may be contacted under the given policy."""
    if allow_public:
        return bool(host.strip())
    return is_lan_address(host)


def check_peer_address(host: str, allow_public: bool) -> None:
    """Raise :class:`PeerAddressRefused` if ``host`` is not allowed as a peer."""
    if is_allowed(host, allow_public):
        return
    if parse_ip(host) is None:
        raise PeerAddressRefused(
            f"peer address {host!r} is not an IP address; use the peer's LAN IP "
            "(e.g. 192.168.1.20), or set network.allow_public = true to allow "
            "names and public addresses"
        )
    raise PeerAddressRefused(
        f"peer address {host} is not a private, loopback or link-local address; "
        "enjambre talks only to LAN peers by default. Use the peer's LAN address, "
        "or set network.allow_public = true in the node config if you really "
        "want to reach peers over a public network"
    )
