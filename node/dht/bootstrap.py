"""Bootstrap of the DHT: configured and discovered peers, retried forever with backoff.

Configured peers that do not answer are retried with exponential backoff and
never given up on (exo's bug #2191 was dropping them). Peers from the LAN beacon
join the same retry list, but at most ``MAX_DISCOVERED`` of them, and one that
fails ``FORGET_AFTER`` times in a row is forgotten: beacons can be forged by a
member, configured peers cannot. A reached peer is checked again at the slowest
pace, so it is re-contacted if it falls out of the routing table.

A Bootstrapper gets the protocol it pings through, this node's own contact and
address, the settings and counters it needs; it never sees the DHT node.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kademlia.crawling import NodeSpiderCrawl
from kademlia.node import Node

from node.dht.errors import DHTError
from node.dht.protocol import SealedProtocol
from node.net.addresses import check_peer_address, is_allowed, is_ip
from node.system.counters import Counters
from protocol.dht import ID_LEN

__all__ = ["FORGET_AFTER", "MAX_DISCOVERED", "Bootstrapper"]

MAX_DISCOVERED = 256
FORGET_AFTER = 3


@dataclass
class _PeerState:
    backoff: float
    discovered: bool = False
    next_try: float = 0.0
    failures: int = 0

    def record(self, ok: bool, now: float, limits: tuple[float, float]) -> None:
        if ok:
            self.failures = 0
            self.backoff = limits[0]
            # A reached peer is checked again at the slowest pace, so it is
            # re-contacted if it falls out of the routing table.
            self.next_try = now + limits[1]
        else:
            self.failures += 1
            self.next_try = now + self.backoff
            self.backoff = min(self.backoff * 2, limits[1])


class Bootstrapper:
    """The bootstrap peers of one DHT node and the background task that retries them."""

    def __init__(
        self,
        protocol: SealedProtocol,
        own: Node,
        own_address: tuple[str, int],
        *,
        ksize: int,
        alpha: int,
        allow_public: bool,
        backoff: tuple[float, float],
        clock: Callable[[], float],
        counters: Counters,
    ) -> None:
        self._protocol = protocol
        self._own = own
        self._own_address = own_address
        self._ksize = ksize
        self._alpha = alpha
        self._allow_public = allow_public
        self._backoff = backoff
        self._clock = clock
        self._counters = counters
        self.peers: dict[tuple[str, int], _PeerState] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def bootstrap(self, peers: Iterable[tuple[str, int]]) -> int:
        """Contact configured peers; returns how many answered. Unreachable ones are
        retried in the background with exponential backoff, never given up on."""
        addrs = []
        for host, port in peers:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise DHTError(f"bootstrap peer {host}:{port} has an invalid port; use HOST:PORT")
            if is_ip(host):
                check_peer_address(host, self._allow_public)
            addrs.append((host, port))
        for addr in addrs:
            self.peers.setdefault(addr, _PeerState(self._backoff[0]))
        reached = await self._round(addrs)
        self._ensure_loop()
        return reached

    def add_peer(self, host: str, port: int) -> None:
        """A peer learned at run time (LAN beacon); refused quietly if not allowed."""
        if not is_allowed(host, self._allow_public) or not 0 < port < 65536:
            self._counters.inc("refused_address")
            return
        addr = (host, port)
        if addr == self._own_address:
            return
        state = self.peers.get(addr)
        if state is None:
            if sum(1 for s in self.peers.values() if s.discovered) >= MAX_DISCOVERED:
                self._counters.inc("discovered_refused")
                return
            state = self.peers[addr] = _PeerState(self._backoff[0], discovered=True)
        state.next_try = 0.0
        self._ensure_loop()
        self._wakeup.set()

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _ensure_loop(self) -> None:
        if self._task is None and not self._stopped:
            self._task = asyncio.ensure_future(self._retry_loop())

    async def _resolve(self, host: str, port: int) -> tuple[str, int] | None:
        if is_ip(host):
            return (host, port)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
        except OSError:
            return None
        for info in infos:
            ip = str(info[4][0])
            if is_allowed(ip, self._allow_public):
                return (ip, port)
        self._counters.inc("refused_address")
        return None

    async def _round(self, addrs: list[tuple[str, int]]) -> int:
        protocol = self._protocol

        async def reach(addr: tuple[str, int]) -> Node | None:
            self._counters.inc("bootstrap_attempts")
            state = self.peers.get(addr)
            resolved = await self._resolve(*addr)
            node = None
            if resolved is not None:
                ok, result = await protocol.ping(resolved, self._own.id)
                if ok and isinstance(result, bytes) and len(result) == ID_LEN:
                    node = Node(result, resolved[0], resolved[1])
            if state is not None:
                state.record(node is not None, self._clock(), self._backoff)
                if state.discovered and state.failures >= FORGET_AFTER:
                    self.peers.pop(addr, None)
                    self._counters.inc("discovered_forgotten")
            if node is None:
                self._counters.inc("bootstrap_failures")
            return node

        found = [n for n in await asyncio.gather(*(reach(a) for a in addrs)) if n is not None]
        if found:
            for node in found:
                protocol.welcome_if_new(node)
            await NodeSpiderCrawl(protocol, self._own, found, self._ksize, self._alpha).find()
        return len(found)

    async def _retry_loop(self) -> None:
        """Retry bootstrap peers that are not in the routing table, with backoff."""
        while not self._stopped:
            now = self._clock()
            known = {(n.ip, n.port) for b in self._protocol.router.buckets for n in b.get_nodes()}
            due = []
            for addr, state in self.peers.items():
                if addr in known:
                    state.record(True, now, self._backoff)
                elif state.next_try <= now:
                    due.append(addr)
            if due:
                with contextlib.suppress(Exception):
                    await self._round(due)
            waits = [s.next_try - self._clock() for s in self.peers.values()]
            delay = min([self._backoff[1], *waits])
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), max(0.05, delay))
