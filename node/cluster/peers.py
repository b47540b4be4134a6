"""Requests to other members by node id, for the swarm and the pipeline: the directory
gives the address, the transport the authenticated connection. A request to this node
itself for a method with a local handler calls it directly, no socket."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from node.net.transport import Transport

__all__ = ["PeerUnknown", "Peers"]

Members = Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]
LocalHandler = Callable[[str, Any], Awaitable[Any]]  # (the sender's node id: ours, body)
# Reading the directory is 16 DHT lookups: once every few seconds, not once a step.
ADDRESS_TTL = 5.0


class PeerUnknown(LookupError):
    pass


class Peers:
    def __init__(self, self_id: str, transport: Transport, members: Members) -> None:
        self.self_id = self_id
        self.local: dict[str, LocalHandler] = {}
        self.transport = transport
        self.members = members
        self._addresses: dict[str, tuple[str, int]] = {}
        self._at = -ADDRESS_TTL

    async def address(self, node_id: str) -> tuple[str, int]:
        if node_id not in self._addresses or time.monotonic() - self._at > ADDRESS_TTL:
            records = await self.members()
            self._addresses = {
                pid: (str(r["addresses"][0]), int(r["peer_port"])) for pid, r in records.items()
            }
            self._at = time.monotonic()
        found = self._addresses.get(node_id)
        if found is None:
            raise PeerUnknown(f"node {node_id[:12]} is not in the directory")
        return found

    async def request(self, node_id: str, method: str, body: Any, *, timeout: float) -> Any:  # noqa: ASYNC109
        if node_id == self.self_id and method in self.local:
            return await self.local[method](self.self_id, body)
        host, port = await self.address(node_id)
        conn = await self.transport.connect(host, port, expect_node_id=node_id)
        return await conn.request(method, body, timeout=timeout)
