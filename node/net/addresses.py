"""LAN-only address policy: which peer addresses a node may talk to.

enjambre is a LAN cluster. Peers, bootstrap addresses and beacon sources whose
address is not private, loopback or link-local are refused unless the operator
set ``network.allow_public = true``. Every network component (DHT, beacon,
transport) asks this module instead of deciding on its own.
"""

from __future__ import annotations

import ipaddress

__all__ = [
    "PeerAddressRefused",
    "check_peer_address",
    "is_allowed",
    "is_lan_address",
]


class PeerAddressRefused(ValueError):
    """A peer address is outside the LAN ranges and public peers are not allowed."""


def _parse(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    # Scoped IPv6 link-local addresses ("fe80::1%eth0") carry an interface name.
    text = text.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


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
    addr = _parse(host)
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
    if _parse(host) is None:
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
