"""Requests to other members by node id, for the swarm and the pipeline: the directory
gives the address, the transport the authenticated connection. A request to this node
itself for a method with a local handler calls it directly, no socket.

Addresses are cached: a known address is used at once whatever its age (the directory is
re-read in the background when it is older than ``ADDRESS_TTL``), because reading the
directory right after a node died waits for the DHT's lookups to time out on it; a dead
node's old address fails at once instead. When the cached address does not answer, the
directory is read again and the request retried once if the address changed (a node that
restarted on new ports). A node whose address refuses the connection is reported through
``on_unreachable`` (the DHT drops it from its routing table instead of waiting on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from node.net.errors import ConnectFailed, HandshakeError
from node.net.transport import Transport

__all__ = ["PeerUnknown", "Peers"]

Members = Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]
LocalHandler = Callable[[str, Any], Awaitable[Any]]  # (the sender's node id: ours, body)
# Reading the directory is 16 DHT lookups: once every few seconds, not once a step.
ADDRESS_TTL = 5.0
# A node missing from the directory keeps its last address this long: a node frozen for a
# while (its record expired) is still reachable when it answers again.
FORGET_AFTER = 300.0


class PeerUnknown(LookupError):
    pass


class Peers:
    def __init__(self, self_id: str, transport: Transport, members: Members, *,
                 on_unreachable: Callable[[str], None] = lambda _n: None) -> None:
        self.self_id = self_id
        self.local: dict[str, LocalHandler] = {}
        self.transport = transport
        self.members = members
        self.on_unreachable = on_unreachable
        self._addresses: dict[str, tuple[str, int]] = {}
        self._seen: dict[str, float] = {}
        self._at = -ADDRESS_TTL
        self._refresh: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        records = await self.members()
        now = time.monotonic()
        for pid, r in records.items():
            with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
                self._addresses[pid] = (str(r["addresses"][0]), int(r["peer_port"]))
                self._seen[pid] = now
        for pid in [p for p, at in self._seen.items() if now - at > FORGET_AFTER]:
            self._addresses.pop(pid, None)
            del self._seen[pid]
        self._at = now

    def _refresh_soon(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._read())
            self._refresh.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def address(self, node_id: str) -> tuple[str, int]:
        found = self._addresses.get(node_id)
        if found is None:
            await self._read()
            found = self._addresses.get(node_id)
        elif time.monotonic() - self._at > ADDRESS_TTL:
            self._refresh_soon()
        if found is None:
            raise PeerUnknown(f"node {node_id[:12]} is not in the directory")
        return found

    async def request(self, node_id: str, method: str, body: Any, *, timeout: float) -> Any:  # noqa: ASYNC109
        if node_id == self.self_id and method in self.local:
            async with asyncio.timeout(timeout):  # the same bound as a request over the wire
                return await self.local[method](self.self_id, body)
        host, port = await self.address(node_id)
        try:
            conn = await self.transport.connect(host, port, expect_node_id=node_id)
        except ConnectFailed as exc:
            if not isinstance(exc, HandshakeError) and isinstance(exc.__cause__, ConnectionRefusedError):
                self.on_unreachable(node_id)
            await self._read()
            again = self._addresses.get(node_id)
            if again is None or again == (host, port):
                raise
            conn = await self.transport.connect(*again, expect_node_id=node_id)
        return await conn.request(method, body, timeout=timeout)
