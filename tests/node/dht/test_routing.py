"""The routing table's neighbour search returns the k closest contacts (kademlia's did not)."""

from __future__ import annotations

import asyncio
import heapq
import random

from kademlia.node import Node
from kademlia.routing import RoutingTable

from node.dht.routing import ExactRoutingTable


class _NoPing:
    """Full buckets make kademlia ping the oldest contact; nobody answers here."""

    async def call_ping(self, node: Node) -> None:
        return None


async def _table(rng: random.Random, contacts: int, ksize: int) -> tuple[RoutingTable, list[Node]]:
    table = ExactRoutingTable(_NoPing(), ksize, Node(rng.randbytes(20), "127.0.0.1", 1))
    for i in range(contacts):
        table.add_contact(Node(rng.randbytes(20), "127.0.0.1", 1000 + i))
    await asyncio.sleep(0)
    return table, [n for b in table.buckets for n in b.nodes.values()]


async def test_returns_k_closest_of_all_contacts() -> None:
    rng = random.Random(7)
    library_misses = 0
    for _ in range(40):
        table, contacts = await _table(rng, 150, 8)
        for _ in range(20):
            target = Node(rng.randbytes(20))
            expected = heapq.nsmallest(8, contacts, key=target.distance_to)
            assert table.find_neighbors(target) == expected
            library_misses += RoutingTable.find_neighbors(table, target) != expected
    # The library's traversal really is wrong on such tables (why we override it).
    assert library_misses > 0


async def test_exclude_and_self() -> None:
    table, contacts = await _table(random.Random(3), 30, 20)
    target = contacts[0]
    result = table.find_neighbors(target, exclude=contacts[1])
    assert target not in result and contacts[1] not in result
    assert len(result) == min(20, len(contacts) - 2)
