"""Tests for node.net.addresses: parsing and printing addresses, and the LAN policy."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.net.addresses import (
    PeerAddressRefused,
    check_peer_address,
    format_address,
    format_hostport,
    is_allowed,
    is_ip,
    is_lan_address,
    is_loopback_host,
    parse_hostport,
    parse_ip,
    valid_hostname,
)

# --- parse_ip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", "10.0.0.1"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        (" [fe80::1] ", "fe80::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%eth0]", "fe80::1"),
        ("FE80::0:1", "fe80::1"),
        # A dual-stack socket reports an IPv4 peer like this; policy must see the IPv4.
        ("::ffff:192.168.1.1", "192.168.1.1"),
        ("[::ffff:8.8.8.8]", "8.8.8.8"),
    ],
)
def test_parse_ip(text: str, expected: str) -> None:
    assert parse_ip(text) == ipaddress.ip_address(expected)
    assert is_ip(text)


@pytest.mark.parametrize(
    "text", ["", "  ", "example.com", "localhost", "10.0.0", "10.0.0.256", "[10.0.0.1", "::1]", "[]", "1.2.3.4:80"]
)
def test_parse_ip_refuses_non_addresses(text: str) -> None:
    assert parse_ip(text) is None
    assert not is_ip(text)


@given(st.ip_addresses())
def test_parse_ip_reads_what_ipaddress_prints(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    parsed = parse_ip(str(addr))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        assert parsed == addr.ipv4_mapped
    else:
        assert parsed == addr
    assert parse_ip(f"[{addr}]") == parsed


# --- host names and loopback ------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("node-b.local", True),
        ("localhost", True),
        ("a.b.c.", True),
        ("x" * 63, True),
        ("x" * 64, False),
        (".".join(["a" * 63] * 4), False),  # 255 characters
        ("-bad", False),
        ("bad-", False),
        ("bad_host", False),
        ("two words", False),
        ("", False),
        ("a..b", False),
    ],
)
def test_valid_hostname(host: str, valid: bool) -> None:
    assert valid_hostname(host) is valid


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.2", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --- parse_hostport ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("10.0.0.1:7421", None, ("10.0.0.1", 7421)),
        (" 10.0.0.1:1 ", None, ("10.0.0.1", 1)),
        ("[::1]:7421", None, ("::1", 7421)),
        ("[fe80::1%eth0]:80", None, ("fe80::1%eth0", 80)),
        ("[::ffff:10.0.0.1]:80", None, ("::ffff:10.0.0.1", 80)),
        ("[::1]", 7421, ("::1", 7421)),
        ("::1", 7421, ("::1", 7421)),
        ("node-b.local:65535", None, ("node-b.local", 65535)),
        ("localhost", 7421, ("localhost", 7421)),
    ],
)
def test_parse_hostport(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default_port=default) == expected
    assert parse_hostport(text, default) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("host", "has no port"),
        ("::1", "has no port"),
        ("fe80::1:7421", "has no port"),
        ("[::1]x", "expected ':PORT'"),
        ("[fe80::1:7421", "missing ']'"),
        ("[nothost]:7421", "not an IPv6 address"),
        ("[10.0.0.1]:7421", "not an IPv6 address"),
        ("host:", "port '' is not a number"),
        ("host:-1", "not a number"),
        ("host:0", "out of range 1-65535"),
        ("host:65536", "out of range"),
        ("-bad-:1", "neither an IP address"),
        ("bad_host!:7421", "neither an IP address nor a valid host name"),
        ("10.0.0.1 :7421", "neither an IP address"),
        ("a::b::c:1", "not a valid address"),
    ],
)
def test_parse_hostport_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        parse_hostport(text)


def test_parse_hostport_refuses_non_strings() -> None:
    bad: Any = 7421
    with pytest.raises(ValueError, match="as a string"):
        parse_hostport(bad)


# --- format_hostport / format_address ---------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("10.0.0.1", 7421, "10.0.0.1:7421"),
        ("node-b.local", 1, "node-b.local:1"),
        ("::1", 7421, "[::1]:7421"),
        ("fe80::1%eth0", 7420, "[fe80::1%eth0]:7420"),
        ("[::1]", 80, "[::1]:80"),  # already bracketed: not twice
    ],
)
def test_format_hostport(host: str, port: int, text: str) -> None:
    assert format_hostport(host, port) == text


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (("10.0.0.1", 7420), "10.0.0.1:7420"),
        (("::1", 7420, 0, 0), "[::1]:7420"),
        (("fe80::1%eth0", 7420, 0, 2), "[fe80::1%eth0]:7420"),
        ("/run/enjambre.sock", "/run/enjambre.sock"),
        (None, "None"),
        (("only-one",), "('only-one',)"),
    ],
)
def test_format_address(address: Any, text: str) -> None:
    assert format_address(address) == text


_hosts = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"{a}%eth0"),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)


@given(_hosts, st.integers(min_value=1, max_value=65535))
def test_format_then_parse_round_trips(host: str, port: int) -> None:
    assert parse_hostport(format_hostport(host, port)) == (host, port)
    assert format_address((host, port, 0, 0)) == format_hostport(host, port)


# --- LAN policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.20",
        "127.0.0.1",
        "127.5.5.5",
        "169.254.10.10",
        "::1",
        "[::1]",
        "fe80::1",
        "fe80::1%eth0",
        "fd12:3456:789a::1",
        "::ffff:192.168.1.1",
        " 10.0.0.1 ",
    ],
)
def test_lan_addresses_allowed(host: str) -> None:
    assert is_lan_address(host)
    assert is_allowed(host, allow_public=False)
    check_peer_address(host, allow_public=False)


@pytest.mark.parametrize(
    "host",
    [
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",
        "192.169.0.1",
        "203.0.113.5",
        "100.64.0.1",
        "0.0.0.0",
        "::",
        "239.255.74.20",
        "2001:4860:4860::8888",
        "::ffff:8.8.8.8",
        "example.com",
        "localhost",
        "",
        "not an address",
    ],
)
def test_public_and_odd_addresses_refused(host: str) -> None:
    assert not is_lan_address(host)
    assert not is_allowed(host, allow_public=False)
    with pytest.raises(PeerAddressRefused):
        check_peer_address(host, allow_public=False)


def test_allow_public_lets_public_addresses_through() -> None:
    assert is_allowed("8.8.8.8", allow_public=True)
    check_peer_address("8.8.8.8", allow_public=True)
    check_peer_address("example.com", allow_public=True)
    with pytest.raises(PeerAddressRefused):
        check_peer_address("  ", allow_public=True)


def test_refusal_message_says_what_to_do() -> None:
    with pytest.raises(PeerAddressRefused, match="allow_public") as info:
        check_peer_address("8.8.8.8", allow_public=False)
    assert "8.8.8.8" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(PeerAddressRefused, match="not an IP address"):
        check_peer_address("example.com", allow_public=False)


def test_module_is_pure() -> None:
    # Used on every packet's source address and from protocol code: standard library
    # address handling only, no sockets or name resolution.
    import node.net.addresses as module

    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "ipaddress", "re", "typing"}
