"""LAN beacon on loopback only: multicast via 127.0.0.1 (TTL 1) or unicast to 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from node.net.discovery import Beacon, BeaconError

pytestmark = pytest.mark.timeout(30)

Found = list[tuple[str, int, str]]


def new_cluster() -> ClusterKeys:
    return ClusterKeys.from_secret(parse_secret(generate_secret()))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def beacons() -> AsyncIterator[Callable[..., Awaitable[Beacon]]]:
    started: list[Beacon] = []

    async def make(cluster: ClusterKeys, found: Found, **kw: Any) -> Beacon:
        kw.setdefault("interface", "127.0.0.1")
        kw.setdefault("interval", 0.1)
        beacon = await Beacon.create(
            cluster,
            key=kw.pop("key", None) or NodeKey.generate(),
            dht_host="127.0.0.1",
            dht_port=kw.pop("dht_port", 4000),
            on_peer=lambda h, p, n: found.append((h, p, n)),
            **kw,
        )
        started.append(beacon)
        return beacon

    try:
        yield make
    finally:
        for beacon in started:
            await beacon.stop()


async def wait_for(cond: Callable[[], bool], limit: float = 5.0) -> None:
    for _ in range(int(limit / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_two_beacons_find_each_other_multicast_on_loopback(
    beacons: Callable[..., Awaitable[Beacon]],
) -> None:
    cluster = new_cluster()
    port = free_udp_port()
    found_a: Found = []
    found_b: Found = []
    a = await beacons(cluster, found_a, port=port, dht_port=5001)
    b = await beacons(cluster, found_b, port=port, dht_port=5002)
    await wait_for(lambda: bool(found_a) and bool(found_b))
    assert found_a[0] == ("127.0.0.1", 5002, b.node_id)
    assert found_b[0] == ("127.0.0.1", 5001, a.node_id)
    await asyncio.sleep(0.3)
    # Repeated beacons do not repeat the callback; own beacons are ignored.
    assert len(found_a) == 1
    assert a.counters["own_beacons"] >= 1
    assert a.counters["beacons_sent"] >= 2
    assert a.counters["peers_seen"] == 1


async def test_other_cluster_ignored_and_counted(beacons: Callable[..., Awaitable[Beacon]]) -> None:
    port = free_udp_port()
    found: Found = []
    mine = await beacons(new_cluster(), found, port=port)
    await beacons(new_cluster(), [], port=port)
    await wait_for(lambda: mine.counters.get("dropped", "bad_seal") >= 2)
    assert found == []
    assert mine.counters["beacons_received"] == 0


async def test_unicast_targets(beacons: Callable[..., Awaitable[Beacon]]) -> None:
    cluster = new_cluster()
    pa, pb = free_udp_port(), free_udp_port()
    found_a: Found = []
    found_b: Found = []
    await beacons(cluster, found_a, port=pa, targets=[("127.0.0.1", pb)], dht_port=6001)
    await beacons(cluster, found_b, port=pb, targets=[("127.0.0.1", pa)], dht_port=6002)
    await wait_for(lambda: bool(found_a) and bool(found_b))
    assert found_a[0][:2] == ("127.0.0.1", 6002)
    assert found_b[0][:2] == ("127.0.0.1", 6001)


async def test_public_source_refused_unless_allowed(
    beacons: Callable[..., Awaitable[Beacon]],
) -> None:
    # No traffic leaves the host: the public source is simulated by calling the handler.
    cluster = new_cluster()
    sender_key = NodeKey.generate()
    sender = Beacon(cluster, key=sender_key, dht_host="0.0.0.0", dht_port=7000, on_peer=lambda *_: None)
    datagram = sender.beacon_datagram()
    found: Found = []
    strict = await beacons(cluster, found, port=free_udp_port(), interval=60)
    strict.handle_datagram(datagram, ("8.8.8.8", 7423))
    assert found == [] and strict.counters.get("dropped", "address") == 1
    relaxed_found: Found = []
    relaxed = await beacons(
        cluster, relaxed_found, port=free_udp_port(), interval=60, allow_public=True
    )
    relaxed.handle_datagram(datagram, ("8.8.8.8", 7423))
    # dht_host 0.0.0.0 means "use the beacon's source address".
    assert relaxed_found == [("8.8.8.8", 7000, sender_key.node_id)]
    # The same datagram again is a replay.
    relaxed.handle_datagram(datagram, ("8.8.8.8", 7423))
    assert relaxed.counters.get("dropped", "replay") == 1


async def test_beacon_claiming_public_dht_host_refused(
    beacons: Callable[..., Awaitable[Beacon]],
) -> None:
    cluster = new_cluster()
    sender = Beacon(cluster, key=NodeKey.generate(), dht_host="8.8.4.4", dht_port=7000, on_peer=lambda *_: None)
    found: Found = []
    strict = await beacons(cluster, found, port=free_udp_port(), interval=60)
    strict.handle_datagram(sender.beacon_datagram(), ("127.0.0.1", 9999))
    assert found == [] and strict.counters.get("dropped", "address") == 1


async def test_garbage_dropped(beacons: Callable[..., Awaitable[Beacon]]) -> None:
    found: Found = []
    beacon = await beacons(new_cluster(), found, port=free_udp_port(), interval=60)
    beacon.handle_datagram(b"hello", ("127.0.0.1", 1))
    beacon.handle_datagram(b"x" * 2000, ("127.0.0.1", 1))
    assert beacon.counters.get("dropped", "garbage") == 2 and found == []


def test_config_errors_are_clear() -> None:
    cluster = new_cluster()

    def make(**kw: Any) -> Beacon:
        args: dict[str, Any] = {
            "key": NodeKey.generate(),
            "dht_host": "",
            "dht_port": 1,
            "on_peer": lambda *_: None,
        }
        args.update(kw)
        return Beacon(cluster, **args)

    with pytest.raises(BeaconError, match="multicast"):
        make(group="10.0.0.1")
    with pytest.raises(BeaconError, match="interface"):
        make(interface="no-such-iface0")
    with pytest.raises(BeaconError, match="port"):
        make(dht_port=0)
    with pytest.raises(BeaconError, match="interval"):
        make(interval=0)
    assert make(interface="lo").interface == "127.0.0.1"
    assert make(interface="0.0.0.0").interface is None
    assert make(interface=None).interface is None


async def test_forged_identities_fill_a_bounded_table(beacons: Callable[..., Awaitable[Beacon]]) -> None:
    # A member with the secret mints keys and forges beacons: at most max_peers are kept.
    cluster = new_cluster()
    found: Found = []
    victim = await beacons(cluster, found, port=free_udp_port(), interval=60, max_peers=16)
    for i in range(100):
        forger = Beacon(cluster, key=NodeKey.generate(), dht_host="127.0.0.1", dht_port=10000 + i,
                        on_peer=lambda *_: None)
        victim.handle_datagram(forger.beacon_datagram(), ("127.0.0.1", 7423))
    assert len(victim.peers) == 16 and victim.counters["peers_forgotten"] == 84
    assert len(found) == 100  # each new one told the DHT, which bounds its own list


async def test_a_beacon_speaks_only_for_its_own_key(beacons: Callable[..., Awaitable[Beacon]]) -> None:
    cluster = new_cluster()
    found: Found = []
    victim = await beacons(cluster, found, port=free_udp_port(), interval=60)
    honest = Beacon(cluster, key=NodeKey.generate(), dht_host="127.0.0.1", dht_port=7001, on_peer=lambda *_: None)
    datagram = bytearray(honest.beacon_datagram())
    victim.handle_datagram(bytes(datagram), ("127.0.0.1", 7423))
    assert found == [("127.0.0.1", 7001, honest.node_id)]
