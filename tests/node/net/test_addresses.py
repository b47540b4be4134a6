"""Tests for node.netpolicy: the LAN-only peer address policy."""

from __future__ import annotations

import pytest

from node.net.addresses import PeerAddressRefused, check_peer_address, is_allowed, is_lan_address


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
