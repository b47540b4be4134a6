"""Finding nodes and records near a key: the routing table and the record crawl.

_RoutingTable fixes kademlia's neighbour search; _RecordCrawl is the lookup
that crawls to the k closest nodes merging every record it sees, instead of
stopping at the first value.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from kademlia.crawling import SpiderCrawl
from kademlia.node import Node
from kademlia.routing import RoutingTable

from node.dht.types import bump
from node.dht.wire import valid_node_tuple
from protocol.records import Record, RecordError, decode_record, expiry_for

if TYPE_CHECKING:
    from node.dht.node import DHTNode

__all__ = ["_RecordCrawl", "_RoutingTable"]


class _RoutingTable(RoutingTable):
    """kademlia's table with a correct ``find_neighbors``.

    The library walks buckets with TableTraverser, which stops as soon as it
    runs out of buckets on one side (so a key in the last bucket can yield no
    neighbours at all even with dozens of contacts) and returns the first k
    nodes met rather than the k closest. Measured with 200 nodes, that lost
    4-8% of lookups. A routing table holds at most a few hundred contacts, so
    a full scan is cheap.
    """

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        k = k or self.ksize
        candidates = [
            n
            for bucket in self.buckets
            for n in bucket.nodes.values()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
        ]
        return heapq.nsmallest(k, candidates, key=node.distance_to)


class _RecordCrawl(SpiderCrawl):
    """Iterative lookup toward a key that collects every record on the way.

    Unlike kademlia's ValueSpiderCrawl it does not stop at the first value:
    each publisher's newest record may sit on a different holder.
    """

    def __init__(self, owner: DHTNode, node: Node, peers: list[Node], key: str) -> None:
        super().__init__(owner.protocol, node, peers, owner.ksize, owner.alpha)
        self.owner = owner
        self.key = key
        self.records: list[Record] = []
        self.truncated = False
        self.rounds = 0
        self.queried = 0
        self.responded = 0
        self.first_hit_round = 0
        self.rejected: dict[str, int] = {}

    async def find(self) -> None:
        self.rounds += 1
        await self._find(self._counted_find_value)

    async def _counted_find_value(self, peer: Node, target: Node) -> tuple[bool, Any]:
        self.queried += 1
        result: tuple[bool, Any] = await self.protocol.call_find_value(peer, target)
        return result

    async def _nodes_found(self, responses: dict[bytes, tuple[bool, Any]]) -> None:
        toremove = []
        now = self.owner.clock()
        for peer_id, (ok, result) in responses.items():
            if not ok:
                toremove.append(peer_id)
                continue
            self.responded += 1
            nodes: Any = result
            if isinstance(result, dict):
                nodes = result.get("nodes", [])
                if result.get("truncated") is True:
                    self.truncated = True
                for entry in result.get("records", []) or []:
                    self._take(entry, now)
            if isinstance(nodes, list):
                for entry in nodes:
                    node = valid_node_tuple(entry, self.owner.allow_public)
                    if node is not None and node.id != self.owner.node.id:
                        self.nearest.push(node)
        self.nearest.remove(toremove)
        if self.nearest.have_contacted_all():
            return
        await self.find()

    def _take(self, entry: Any, now: float) -> None:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], bytes)
            or not isinstance(entry[1], int | float)
        ):
            self.rejected["malformed"] = self.rejected.get("malformed", 0) + 1
            return
        try:
            record = decode_record(entry[0], expected_key=self.key)
        except RecordError as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            bump(self.owner._metrics, f"records_rejected_{exc.reason}")
            return
        self.records.append(record.with_expiry(expiry_for(record, now=now, remaining=entry[1])))
        if not self.first_hit_round:
            self.first_hit_round = self.rounds
