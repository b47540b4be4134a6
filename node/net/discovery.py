"""LAN beacon: find DHT bootstrap peers on the local network without configuration.

Every few seconds a node multicasts a beacon, signed with its node key and sealed
with the cluster's ``beacon_key`` (protocol/beacon.py), carrying only its DHT
address; the node id is the signing key's. At most ``max_peers`` identities are
remembered (the least recently heard are forgotten), so a member that mints keys
to forge beacons fills a bounded table; the DHT forgets peers learned this way
that do not answer. Beacons of
other clusters, forged, replayed, stale or from non-LAN addresses are dropped
and counted; valid ones from other nodes call ``on_peer(host, dht_port,
node_id)``, which the daemon turns into ``DHTNode.add_bootstrap_peer``.

Multicast uses TTL 1 so beacons never leave the link. ``interface`` picks the
interface to send and join on (an IPv4 address or an interface name; the daemon
passes ``network.listen``); tests pass 127.0.0.1, or ``targets`` for plain unicast,
so nothing reaches a real network. The payload format is protocol/beacon.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog

from node.config_schema import DEFAULT_BEACON_GROUP, DEFAULT_BEACON_PORT
from node.identity import ClusterKeys, NodeKey
from node.net.addresses import is_allowed, parse_ip
from node.system.clock import ClockOffsets
from node.system.counters import Counters
from protocol.beacon import build_beacon, parse_beacon
from protocol.seal import DEFAULT_MAX_SKEW, Drop, ReplayGuard

__all__ = ["Beacon", "BeaconError"]

log = structlog.get_logger("enjambre.discovery")



class BeaconError(Exception):
    """The beacon could not start (message says what was wrong and what to do)."""


def _interface_address(interface: str | None) -> str | None:
    """An IPv4 address for ``interface`` (an address already, or an interface name)."""
    if interface is None:
        return None
    try:
        addr = ipaddress.IPv4Address(interface)
    except ValueError:
        pass
    else:
        # A daemon listening on all interfaces lets the OS pick the route.
        return None if addr.is_unspecified else str(addr)
    import psutil  # only needed when an interface is given by name

    for family_addr in psutil.net_if_addrs().get(interface, []):
        if family_addr.family == socket.AF_INET:
            return str(family_addr.address)
    raise BeaconError(
        f"beacon interface {interface!r} is neither an IPv4 address nor an interface with an "
        "IPv4 address; the beacon uses network.listen: set it to this machine's LAN address "
        "(e.g. 192.168.1.20), or turn discovery off (network.discovery = false)"
    )


class _BeaconProtocol(asyncio.DatagramProtocol):
    def __init__(self, beacon: Beacon) -> None:
        self.beacon = beacon

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.beacon.handle_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.beacon.counters.inc("send_errors")


class Beacon:
    """Sends this node's beacon and listens for others'. Build with :meth:`create`."""

    def __init__(
        self,
        cluster: ClusterKeys,
        *,
        key: NodeKey,
        dht_host: str,
        dht_port: int,
        on_peer: Callable[[str, int, str], None],
        group: str = DEFAULT_BEACON_GROUP,
        port: int = DEFAULT_BEACON_PORT,
        interface: str | None = "127.0.0.1",
        interval: float = 5.0,
        allow_public: bool = False,
        targets: list[tuple[str, int]] | None = None,
        max_skew: float = DEFAULT_MAX_SKEW,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        clock_offsets: ClockOffsets | None = None,
        max_peers: int = 256,
    ) -> None:
        if not 0 < dht_port < 65536:
            raise BeaconError(f"beacon DHT port {dht_port} is not a valid UDP port")
        if interval <= 0:
            raise BeaconError(f"beacon interval must be positive, got {interval}")
        try:
            if not ipaddress.IPv4Address(group).is_multicast:
                raise ValueError
        except ValueError:
            raise BeaconError(
                f"beacon group {group!r} is not an IPv4 multicast address (224.0.0.0/4); "
                f"use the default {DEFAULT_BEACON_GROUP}"
            ) from None
        self.cluster = cluster
        self.key = key
        self.node_id = key.node_id
        self.dht_host = dht_host
        self.dht_port = dht_port
        self.on_peer = on_peer
        self.group = group
        self.port = port
        self.interface = _interface_address(interface)
        self.interval = interval
        self.allow_public = allow_public
        self.targets = list(targets) if targets is not None else None
        self.max_skew = max_skew
        self.clock = clock
        self.wall_clock = wall_clock
        self.counters = Counters(("beacons_sent", "beacons_received", "peers_seen"), by_reason=("dropped",))
        self.max_peers = max_peers
        self.clock_offsets = clock_offsets
        self.peers: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._notified_at: dict[str, float] = {}
        self._replay = ReplayGuard(max_skew, max_entries=10_000)
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        cluster: ClusterKeys,
        *,
        key: NodeKey,
        dht_host: str,
        dht_port: int,
        on_peer: Callable[[str, int, str], None],
        group: str = DEFAULT_BEACON_GROUP,
        port: int = DEFAULT_BEACON_PORT,
        interface: str | None = "127.0.0.1",
        interval: float = 5.0,
        allow_public: bool = False,
        **options: Any,
    ) -> Beacon:
        """Start listening and beaconing. ``interface`` None lets the OS pick (daemon use)."""
        beacon = cls(
            cluster,
            key=key,
            dht_host=dht_host,
            dht_port=dht_port,
            on_peer=on_peer,
            group=group,
            port=port,
            interface=interface,
            interval=interval,
            allow_public=allow_public,
            **options,
        )
        await beacon._start()
        return beacon

    def _make_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.targets is not None:
                # Unicast mode (tests, networks without multicast).
                sock.bind((self.interface or "127.0.0.1", self.port))
            else:
                # Several nodes on one host (tests, dev) share the port.
                if hasattr(socket, "SO_REUSEPORT"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                # Binding to the group (Linux) receives only this group's traffic.
                sock.bind((self.group, self.port))
                iface = socket.inet_aton(self.interface or "0.0.0.0")
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton(self.group) + iface,
                )
                if self.interface is not None:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise BeaconError(
                f"cannot start the LAN beacon on group {self.group} port {self.port} "
                f"(interface {self.interface or 'default'}): {exc.strerror or exc}; check "
                "network.listen and network.beacon_port, or turn discovery off "
                "(network.discovery = false) and list network.bootstrap peers"
            ) from None
        return sock

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self._make_socket()
        transport, _ = await loop.create_datagram_endpoint(lambda: _BeaconProtocol(self), sock=sock)
        self._transport = transport
        self._task = asyncio.ensure_future(self._send_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # ---------------------------------------------------------------- sending

    def beacon_datagram(self) -> bytes:
        return build_beacon(
            self.dht_host, self.dht_port, key=self.cluster.beacon_key, public_key=self.key.public_bytes,
            sign=self.key.sign, now=self.wall_clock(),
        )

    def send_now(self) -> None:
        if self._transport is None:
            return
        datagram = self.beacon_datagram()
        destinations = self.targets if self.targets is not None else [(self.group, self.port)]
        for destination in destinations:
            self._transport.sendto(datagram, destination)
            self.counters.inc("beacons_sent")
            self.counters.inc("bytes_sent", len(datagram))

    async def _send_loop(self) -> None:
        while True:
            try:
                self.send_now()
            except OSError as exc:
                self.counters.inc("send_errors")
                log.warning("beacon send failed", error=str(exc))
            # Jitter keeps many nodes that started together from beaconing in step.
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))

    # -------------------------------------------------------------- receiving

    def handle_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self.counters.inc("bytes_received", len(data))
        if not is_allowed(addr[0], self.allow_public):
            self.counters.inc("dropped", reason="address")
            return
        now = self.wall_clock()
        beacon = parse_beacon(data, key=self.cluster.beacon_key, now=now, max_skew=self.max_skew, replay=self._replay)
        if self.clock_offsets is not None and beacon.sent_at:
            self.clock_offsets.observe(addr[0], beacon.sent_at, now)
        if isinstance(beacon, Drop):
            # Another cluster on the same LAN lands here too: silently counted.
            self.counters.inc("dropped", reason=beacon.reason)
            return
        if beacon.node_id == self.node_id:
            self.counters.inc("own_beacons")
            return
        self.counters.inc("beacons_received")
        host = self._peer_host(beacon.dht_host, addr[0])
        if not is_allowed(host, self.allow_public):
            self.counters.inc("dropped", reason="address")
            return
        self._notify(beacon.node_id, host, beacon.dht_port)

    @staticmethod
    def _peer_host(claimed: str, source: str) -> str:
        addr = parse_ip(claimed)
        return source if addr is None or addr.is_unspecified else claimed

    def _notify(self, node_id: str, host: str, dht_port: int) -> None:
        now = self.clock()
        previous = self.peers.pop(node_id, None)
        if previous is None:
            self.counters.inc("peers_seen")
        self.peers[node_id] = (host, dht_port)  # the most recently heard last
        while len(self.peers) > self.max_peers:
            forgotten, _ = self.peers.popitem(last=False)
            self._notified_at.pop(forgotten, None)
            self.counters.inc("peers_forgotten")
        last = self._notified_at.get(node_id)
        # Re-announce now and then, so a DHT that lost the peer relearns it.
        if previous == (host, dht_port) and last is not None and now - last < 10 * self.interval:
            return
        self._notified_at[node_id] = now
        try:
            self.on_peer(host, dht_port, node_id)
        except Exception as exc:
            self.counters.inc("callback_errors")
            log.warning("beacon on_peer callback failed", error=repr(exc))
