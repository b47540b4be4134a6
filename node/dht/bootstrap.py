"""Bootstrap of the DHT: configured and discovered peers, retried forever with backoff.

Configured peers that do not answer are retried with exponential backoff and
never given up on; peers from the LAN beacon join the same retry list. A
reached peer is checked again at the slowest pace, so it is re-contacted if
it falls out of the routing table.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kademlia.crawling import NodeSpiderCrawl
from kademlia.node import Node

from node.dht.types import DHTError, bump
from node.dht.wire import ID_LEN
from node.net.addresses import check_peer_address, is_allowed

if TYPE_CHECKING:
    from node.dht.node import DHTNode

__all__ = ["Bootstrapper"]


class Bootstrapper:
    """The bootstrap peers of one DHTNode and the background task that retries them."""

    def __init__(self, dht: DHTNode) -> None:
        self._dht = dht
        self.peers: dict[tuple[str, int], _PeerState] = {}
        self._wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def bootstrap(self, peers: Iterable[tuple[str, int]]) -> int:
        """Contact configured peers; returns how many answered. Unreachable ones are
        retried in the background with exponential backoff, never given up on."""
        addrs = []
        for host, port in peers:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise DHTError(f"bootstrap peer {host}:{port} has an invalid port; use HOST:PORT")
            if _is_ip(host):
                check_peer_address(host, self._dht.allow_public)
            addrs.append((host, port))
        for addr in addrs:
            self.peers.setdefault(addr, _PeerState(self._dht.bootstrap_backoff[0]))
        reached = await self._round(addrs)
        self._ensure_loop()
        return reached

    def add_peer(self, host: str, port: int) -> None:
        """A peer learned at run time (LAN beacon); refused quietly if not allowed."""
        if not is_allowed(host, self._dht.allow_public) or not 0 < port < 65536:
            bump(self._dht._metrics, "refused_address")
            return
        addr = (host, port)
        if addr == (self._dht.host, self._dht.port):
            return
        state = self.peers.setdefault(addr, _PeerState(self._dht.bootstrap_backoff[0]))
        state.next_try = 0.0
        self._ensure_loop()
        self._wakeup.set()

    def _ensure_loop(self) -> None:
        if self.task is None and not self._dht._stopped:
            self.task = asyncio.ensure_future(self._retry_loop())

    async def _resolve(self, host: str, port: int) -> tuple[str, int] | None:
        if _is_ip(host):
            return (host, port)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
        except OSError:
            return None
        for info in infos:
            ip = str(info[4][0])
            if is_allowed(ip, self._dht.allow_public):
                return (ip, port)
        bump(self._dht._metrics, "refused_address")
        return None

    async def _round(self, addrs: list[tuple[str, int]]) -> int:
        dht = self._dht

        async def reach(addr: tuple[str, int]) -> Node | None:
            bump(dht._metrics, "bootstrap_attempts")
            state = self.peers.get(addr)
            resolved = await self._resolve(*addr)
            node = None
            if resolved is not None:
                ok, result = await dht.protocol.ping(resolved, dht.node.id)
                if ok and isinstance(result, bytes) and len(result) == ID_LEN:
                    node = Node(result, resolved[0], resolved[1])
            if state is not None:
                state.record(node is not None, dht.clock(), dht.bootstrap_backoff)
            if node is None:
                bump(dht._metrics, "bootstrap_failures")
            return node

        found = [n for n in await asyncio.gather(*(reach(a) for a in addrs)) if n is not None]
        if found:
            for node in found:
                dht.protocol.welcome_if_new(node)
            await NodeSpiderCrawl(dht.protocol, dht.node, found, dht.ksize, dht.alpha).find()
        return len(found)

    async def _retry_loop(self) -> None:
        """Retry bootstrap peers that are not in the routing table, with backoff."""
        dht = self._dht
        while not dht._stopped:
            now = dht.clock()
            known = {(n.ip, n.port) for b in dht.protocol.router.buckets for n in b.get_nodes()}
            due = []
            for addr, state in self.peers.items():
                if addr in known:
                    state.record(True, now, dht.bootstrap_backoff)
                elif state.next_try <= now:
                    due.append(addr)
            if due:
                with contextlib.suppress(Exception):
                    await self._round(due)
            waits = [s.next_try - dht.clock() for s in self.peers.values()]
            delay = min([dht.bootstrap_backoff[1], *waits])
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), max(0.05, delay))


@dataclass
class _PeerState:
    backoff: float
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


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True
