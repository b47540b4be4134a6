"""The cluster DHT: kademlia's Server and KademliaProtocol extended with sealed, signed
datagrams and signed multi-publisher records.

What this module changes in the ``kademlia``/``rpcudp`` packages and why:

* Datagrams. rpcudp sends ``0x00|0x01 + msg id + umsgpack`` in the clear.
  Here every datagram is ``seal(dht_key, envelope)`` (protocol.seal): AEAD with
  a fresh nonce and a timestamp, then a signed envelope carrying the sender's
  Ed25519 public key. Stale, replayed, forged or garbage datagrams are dropped
  and counted. Inside is plain msgpack (never pickle, no ext types)::

      request:  [0, msg_id (20 bytes), name, [sender dht id, args...]]
      response: [1, msg_id, result]

* Identity. The first argument of every request (the sender's DHT id) must be
  ``dht_id_for(public key of the envelope)``; a response must come from the
  address asked and, where the id asked is known, from that id.
* Values. Storage holds one signed record (protocol.records) per (key,
  publisher). Records are checked on store and on every read; an older seq
  never replaces a newer one; expiry is relative to receipt, and a forwarded
  record carries the sender's remaining lifetime so nobody extends it.
* Lookups. ``find_value`` answers with both records and neighbours, and a
  lookup crawls to the k closest nodes merging every record it sees, instead
  of stopping at the first value.
* Republish. The hourly refresh republishes only this node's own records with
  their original expiry; records of dead nodes simply run out.
* Departure. ``delete``/``leave`` publish tombstones (newer seq, no value) that
  hide this node's records until the old copies would have expired anyway.
* Bootstrap. Configured peers that do not answer are retried forever with
  exponential backoff; peers from the LAN beacon join the same retry list.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import structlog
from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.utils import digest

from node.dht_storage import RecordStore
from node.identity import ClusterKeys, NodeKey, dht_id_for
from node.netpolicy import check_peer_address, is_allowed
from protocol.records import (
    MAX_TTL,
    Record,
    RecordError,
    decode_record,
    expiry_for,
    make_record,
    merge_records,
)
from protocol.seal import (
    DEFAULT_MAX_SKEW,
    ReplayGuard,
    SealError,
    open_envelope,
    open_sealed,
    seal,
    sign_envelope,
)

__all__ = [
    "DIRECTORY_SHARDS",
    "MAX_REQUEST_BYTES",
    "RESPONSE_BUDGET",
    "DHTError",
    "DHTNode",
    "LookupResult",
    "RecordSet",
    "member_key",
]

log = structlog.get_logger("enjambre.dht")

DATAGRAM_DOMAIN = b"enjambre/dht-datagram/v1"
# rpcudp's request limit, kept for the msgpack body of every request.
MAX_REQUEST_BYTES = 8192
# Bytes of records in one find_value answer (plus about 1 KB of neighbours):
# the same order as a request, so answers fragment no worse than requests.
RESPONSE_BUDGET = 8192
MAX_DATAGRAM = 65507
DIRECTORY_PREFIX = "members/"
DIRECTORY_SHARDS = "0123456789abcdef"
_ID_LEN = 20
_RPCS = frozenset({"ping", "store", "find_node", "find_value"})
_UNPACK_LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "max_bin_len": MAX_DATAGRAM,
    "max_str_len": MAX_DATAGRAM,
    "max_array_len": 4096,
    "max_map_len": 16,
    "max_ext_len": 0,
}


class DHTError(Exception):
    """A DHT operation could not be carried out (message says why and what to do)."""


def member_key(node_id: str) -> str:
    """Directory key a node publishes its capability record under (16 shards)."""
    return f"{DIRECTORY_PREFIX}{node_id[0]}"


class RecordSet(dict[str, Record]):
    """publisher node id -> record, plus whether some holder had to truncate its answer."""

    truncated: bool = False


@dataclass
class LookupResult:
    records: RecordSet
    truncated: bool = False
    rounds: int = 0
    queried: int = 0
    responded: int = 0
    # Round in which the first record arrived (0: none, or only a local copy).
    first_hit_round: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def _bump(metrics: dict[str, int], name: str, amount: int = 1) -> None:
    metrics[name] = metrics.get(name, 0) + amount


def _valid_node_tuple(entry: Any, allow_public: bool) -> Node | None:
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    node_id, ip, port = entry
    if not isinstance(node_id, bytes) or len(node_id) != _ID_LEN:
        return None
    if not isinstance(ip, str) or not isinstance(port, int) or not 0 < port < 65536:
        return None
    if not is_allowed(ip, allow_public):
        return None
    return Node(node_id, ip, port)


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


class SealedProtocol(KademliaProtocol):
    """KademliaProtocol speaking sealed, signed msgpack datagrams (see module docstring)."""

    def __init__(self, owner: DHTNode, source_node: Node, storage: RecordStore, ksize: int) -> None:
        super().__init__(source_node, storage, ksize)
        self.router = _RoutingTable(self, ksize, source_node)
        self.owner = owner
        self._wait_timeout = owner.rpc_timeout
        self._expect: dict[bytes, tuple[tuple[str, int], bytes | None, str]] = {}
        self.replay = ReplayGuard(owner.max_skew)

    # ----------------------------------------------------------------- sending

    def _send(self, message: list[Any], address: tuple[str, int]) -> None:
        owner = self.owner
        now = owner.wall_clock()
        body = msgpack.packb(message, use_bin_type=True)
        envelope = sign_envelope(
            owner.key.public_bytes, owner.key.sign, body, domain=DATAGRAM_DOMAIN, timestamp=now
        )
        datagram = seal(owner.cluster.dht_key, envelope, now=now)
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.sendto(datagram, address)
        _bump(owner._metrics, "datagrams_sent")
        _bump(owner._metrics, "bytes_sent", len(datagram))

    def _call(
        self, address: tuple[str, int], name: str, args: list[Any], expect_id: bytes | None
    ) -> asyncio.Future[tuple[bool, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        address = (str(address[0]), int(address[1]))
        if not is_allowed(address[0], self.owner.allow_public):
            _bump(self.owner._metrics, "refused_address")
            future.set_result((False, None))
            return future
        msg_id = os.urandom(_ID_LEN)
        message = [0, msg_id, name, args]
        size = len(msgpack.packb(message, use_bin_type=True))
        if size > MAX_REQUEST_BYTES:
            raise DHTError(
                f"DHT {name} request is {size} bytes, over the {MAX_REQUEST_BYTES}-byte "
                "datagram limit; keep DHT values small"
            )
        _bump(self.owner._metrics, "requests_sent")
        timeout = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timeout)
        self._expect[msg_id] = (address, expect_id, name)
        self._send(message, address)
        return future

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        self._expect.pop(msg_id, None)
        _bump(self.owner._metrics, "rpc_failures")
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    def cancel_outstanding(self) -> None:
        for future, timeout in self._outstanding.values():
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._expect.clear()

    # rpcudp resolves remote calls through __getattr__; explicit methods make
    # the wire format ours and let each call say which id must answer.
    def ping(self, address: tuple[str, int], nodeid: bytes) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "ping", [nodeid], None)

    def find_node(
        self, address: tuple[str, int], nodeid: bytes, key: bytes, expect: bytes | None = None
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "find_node", [nodeid, key], expect)

    def find_value(
        self, address: tuple[str, int], nodeid: bytes, key: bytes, expect: bytes | None = None
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "find_value", [nodeid, key], expect)

    def store(
        self,
        address: tuple[str, int],
        nodeid: bytes,
        key: bytes,
        value: bytes,
        remaining: float,
        expect: bytes | None = None,
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "store", [nodeid, key, value, float(remaining)], expect)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self._call(address, "ping", [self.source_node.id], node_to_ask.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_node(
            address, self.source_node.id, node_to_find.id, expect=node_to_ask.id
        )
        if result[0]:
            nodes = result[1] if isinstance(result[1], list) else []
            result = (True, self._clean_nodes(nodes))
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_value(
            address, self.source_node.id, node_to_find.id, expect=node_to_ask.id
        )
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Record) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        remaining = value.remaining(self.owner.clock())
        if remaining <= 0:
            return (False, None)
        result = await self.store(
            address, self.source_node.id, key, value.encoded, remaining, expect=node_to_ask.id
        )
        return self.handle_call_response(result, node_to_ask)

    def _clean_nodes(self, entries: list[Any]) -> list[tuple[bytes, str, int]]:
        nodes = []
        for entry in entries:
            node = _valid_node_tuple(entry, self.owner.allow_public)
            if node is not None:
                nodes.append((node.id, node.ip, node.port))
        return nodes

    # --------------------------------------------------------------- receiving

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self._receive(data, addr)
        except Exception as exc:
            # A bug or an unforeseen input must not take the node down.
            self.owner._drop("internal_error")
            log.warning("dht datagram handling failed", error=repr(exc))

    def _receive(self, data: bytes, addr: tuple[Any, ...]) -> None:
        owner = self.owner
        metrics = owner._metrics
        _bump(metrics, "datagrams_received")
        _bump(metrics, "bytes_received", len(data))
        address = (str(addr[0]), int(addr[1]))
        if not is_allowed(address[0], owner.allow_public):
            return owner._drop("address")
        now = owner.wall_clock()
        try:
            unsealed = open_sealed(owner.cluster.dht_key, data, now=now, max_skew=owner.max_skew)
        except SealError as exc:
            if exc.reason == "stale":
                owner._warn_stale(address, str(exc))
            return owner._drop(exc.reason)
        # Only authentic datagrams reach the replay guard, so garbage cannot
        # flush it.
        if not self.replay.check(unsealed.nonce, now=now):
            return owner._drop("replay")
        try:
            envelope = open_envelope(
                unsealed.payload, domain=DATAGRAM_DOMAIN, timestamp=unsealed.timestamp
            )
            message = msgpack.unpackb(envelope.payload, **_UNPACK_LIMITS)
        except SealError as exc:
            return owner._drop(exc.reason)
        except Exception:
            return owner._drop("malformed")
        sender_id = dht_id_for(envelope.public_key)
        if not isinstance(message, list) or len(message) < 3:
            return owner._drop("malformed")
        kind, msg_id = message[0], message[1]
        if not isinstance(msg_id, bytes) or len(msg_id) != _ID_LEN:
            return owner._drop("malformed")
        if kind == 0 and len(message) == 4:
            self._handle_request(msg_id, message[2], message[3], address, sender_id)
        elif kind == 1 and len(message) == 3:
            self._handle_response(msg_id, message[2], address, sender_id)
        else:
            owner._drop("malformed")

    def _handle_request(
        self, msg_id: bytes, name: Any, args: Any, address: tuple[str, int], sender_id: bytes
    ) -> None:
        owner = self.owner
        if name not in _RPCS or not isinstance(args, list) or not args:
            return owner._drop("malformed")
        if args[0] != sender_id:
            # A peer may only speak for the id its key hashes to.
            return owner._drop("id_mismatch")
        shapes = {"ping": 1, "find_node": 2, "find_value": 2, "store": 4}
        if len(args) != shapes[name]:
            return owner._drop("malformed")
        if name != "ping" and (not isinstance(args[1], bytes) or len(args[1]) != _ID_LEN):
            return owner._drop("malformed")
        _bump(owner._metrics, "requests_received")
        if name == "ping":
            result: Any = self.rpc_ping(address, sender_id)
        elif name == "find_node":
            result = self.rpc_find_node(address, sender_id, args[1])
        elif name == "find_value":
            result = self.rpc_find_value(address, sender_id, args[1])
        else:
            value, remaining = args[2], args[3]
            if not isinstance(value, bytes) or not isinstance(remaining, int | float):
                return owner._drop("malformed")
            result = self.rpc_store(address, sender_id, args[1], value, float(remaining))
        self._send([1, msg_id, result], address)

    def _handle_response(
        self, msg_id: bytes, result: Any, address: tuple[str, int], sender_id: bytes
    ) -> None:
        owner = self.owner
        expected = self._expect.get(msg_id)
        if expected is None or msg_id not in self._outstanding:
            return owner._drop("unsolicited")
        want_address, want_id, name = expected
        if address != want_address:
            return owner._drop("unsolicited")
        future, timeout = self._outstanding.pop(msg_id)
        del self._expect[msg_id]
        timeout.cancel()
        _bump(owner._metrics, "responses_received")
        if (want_id is not None and sender_id != want_id) or (
            name == "ping" and result != sender_id
        ):
            # Someone else answers at that address: treat it as a failed
            # call so the routing table forgets the claimed id.
            owner._drop("id_mismatch")
            result_pair: tuple[bool, Any] = (False, None)
        else:
            result_pair = (True, result)
        if not future.done():
            future.set_result(result_pair)

    # -------------------------------------------------------------------- rpcs

    def rpc_store(
        self, sender: tuple[str, int], nodeid: bytes, key: bytes, value: bytes, remaining: float
    ) -> bool:
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return self.owner._accept_record(key, value, remaining)

    def rpc_find_value(self, sender: tuple[str, int], nodeid: bytes, key: bytes) -> Any:
        source = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(source)
        neighbors = [list(n) for n in self.router.find_neighbors(Node(key), exclude=source)]
        records = self.storage.get(key)
        if not records:
            return neighbors
        now = self.owner.clock()
        # Records get the full budget (so the largest allowed record always
        # fits); the neighbour list (~1 KB for k=20) comes on top.
        budget = RESPONSE_BUDGET - 64
        chosen: list[list[Any]] = []
        truncated = False
        for record in records:  # freshest first
            entry = [record.encoded, record.remaining(now)]
            cost = len(record.encoded) + 16
            if cost > budget:
                truncated = True
                continue
            budget -= cost
            chosen.append(entry)
        if truncated:
            _bump(self.owner._metrics, "truncated_responses")
        return {"records": chosen, "nodes": neighbors, "truncated": truncated}

    def welcome_if_new(self, node: Node) -> None:
        """As kademlia's, but hands over signed records with their remaining lifetime."""
        if not self.router.is_new_node(node):
            return
        for dkey, record in self.storage:
            keynode = Node(dkey)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                last = neighbors[-1].distance_to(keynode)
                new_node_close = node.distance_to(keynode) < last
                first = neighbors[0].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < first
            if not neighbors or (new_node_close and this_closest):
                self.owner._spawn(self.call_store(node, dkey, record))
        self.router.add_contact(node)

    def error_received(self, exc: Exception) -> None:
        _bump(self.owner._metrics, "socket_errors")


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
                    node = _valid_node_tuple(entry, self.owner.allow_public)
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
            _bump(self.owner._metrics, f"records_rejected_{exc.reason}")
            return
        self.records.append(record.with_expiry(expiry_for(record, now=now, remaining=entry[1])))
        if not self.first_hit_round:
            self.first_hit_round = self.rounds


class DHTNode(Server):
    """One node of the cluster DHT. Build with :meth:`create`; stop with :meth:`stop`."""

    protocol_class = SealedProtocol

    def __init__(
        self,
        key: NodeKey,
        cluster: ClusterKeys,
        *,
        ksize: int = 20,
        alpha: int = 3,
        allow_public: bool = False,
        rpc_timeout: float = 2.0,
        max_skew: float = DEFAULT_MAX_SKEW,
        refresh_interval: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        bootstrap_backoff: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        self.key = key
        self.cluster = cluster
        self.allow_public = allow_public
        self.rpc_timeout = rpc_timeout
        self.max_skew = max_skew
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.wall_clock = wall_clock
        self.bootstrap_backoff = bootstrap_backoff
        self._metrics: dict[str, int] = dict.fromkeys(
            (
                "peers_known",
                "records_held",
                "requests_sent",
                "requests_received",
                "responses_received",
                "rpc_failures",
                "datagrams_sent",
                "datagrams_received",
                "bytes_sent",
                "bytes_received",
                "dropped_total",
                "lookups",
            ),
            0,
        )
        self._last_stale_warning = -math.inf
        super().__init__(ksize=ksize, alpha=alpha, node_id=key.dht_id)
        # Set after: kademlia's ``storage or ForgetfulStorage()`` would treat an
        # empty RecordStore as missing.
        self.storage: RecordStore = RecordStore(clock=clock)
        self.node_id = key.node_id
        self.host = ""
        self.port = 0
        self._own: dict[str, Record] = {}
        self._last_seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bootstrap_peers: dict[tuple[str, int], _PeerState] = {}
        self._bootstrap_wakeup = asyncio.Event()
        self._bootstrap_task: asyncio.Task[None] | None = None
        self._stopped = False

    # ------------------------------------------------------------- lifecycle

    @classmethod
    async def create(
        cls,
        key: NodeKey,
        cluster: ClusterKeys,
        *,
        host: str,
        port: int,
        ksize: int = 20,
        alpha: int = 3,
        allow_public: bool = False,
        **options: Any,
    ) -> DHTNode:
        """A node listening on ``host:port`` (port 0 picks a free one; see ``.port``)."""
        node = cls(key, cluster, ksize=ksize, alpha=alpha, allow_public=allow_public, **options)
        try:
            await node.listen(port, host)
        except OSError as exc:
            raise DHTError(
                f"cannot listen for DHT datagrams on {host}:{port} ({exc.strerror or exc}); "
                "choose another network.dht_port or stop the process using it"
            ) from None
        sockname = node.transport.get_extra_info("sockname")
        node.host, node.port = sockname[0], sockname[1]
        log.info("dht listening", host=node.host, port=node.port, node_id=key.node_id[:16])
        return node

    def _create_protocol(self) -> SealedProtocol:
        return SealedProtocol(self, self.node, self.storage, self.ksize)

    def refresh_table(self, interval: float | None = None) -> None:
        if self._stopped:
            return
        self._spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(self.refresh_interval, self.refresh_table)

    async def _refresh_table(self) -> None:
        """Refresh lonely buckets, purge expired records, republish own records.

        Unlike kademlia's, records held for others are not republished (that
        kept dead nodes' values alive forever); own records are re-sent with
        their original expiry so nodes that joined since get a copy.
        """
        crawls = []
        for node_id in self.protocol.get_refresh_ids():
            node = Node(node_id)
            nearest = self.protocol.router.find_neighbors(node, self.alpha)
            crawls.append(
                NodeSpiderCrawl(self.protocol, node, nearest, self.ksize, self.alpha).find()
            )
        await asyncio.gather(*crawls)
        self.storage.purge()
        now = self.clock()
        for key, record in list(self._own.items()):
            if record.expired(now):
                del self._own[key]
                continue
            await self._store_record(key, record)

    async def stop(self) -> None:
        """Stop listening and cancel background work. Records already stored elsewhere expire."""
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        if self._bootstrap_task is not None:
            self._bootstrap_task.cancel()
        tasks = [*self._tasks, *([self._bootstrap_task] if self._bootstrap_task else [])]
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.protocol is not None:
            self.protocol.cancel_outstanding()
        super().stop()

    def _spawn(self, coro: Any) -> None:
        if self._stopped:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _bump(self._metrics, "background_errors")
            log.warning("dht background task failed", error=repr(task.exception()))

    # --------------------------------------------------------------- metrics

    @property
    def metrics(self) -> dict[str, int]:
        """Counters for the Prometheus endpoint (a plain dict; read it, do not keep it)."""
        self._metrics["peers_known"] = self.peers_known()
        self._metrics["records_held"] = len(self.storage)
        return self._metrics

    def peers_known(self) -> int:
        if self.protocol is None:
            return 0
        return sum(len(bucket) for bucket in self.protocol.router.buckets)

    def _drop(self, reason: str) -> None:
        _bump(self._metrics, f"dropped_{reason}")
        _bump(self._metrics, "dropped_total")

    def _warn_stale(self, address: tuple[str, int], detail: str) -> None:
        # A peer with a wrong clock is a setup problem the operator must see,
        # but not once per datagram.
        now = self.clock()
        if now - self._last_stale_warning >= 60:
            self._last_stale_warning = now
            log.warning(
                "dht peer clock out of range", peer=f"{address[0]}:{address[1]}", detail=detail
            )

    # ------------------------------------------------------------- bootstrap

    async def bootstrap(self, peers: Iterable[tuple[str, int]]) -> int:
        """Contact configured peers; returns how many answered. Unreachable ones are
        retried in the background with exponential backoff, never given up on."""
        addrs = []
        for host, port in peers:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise DHTError(f"bootstrap peer {host}:{port} has an invalid port; use HOST:PORT")
            if _is_ip(host):
                check_peer_address(host, self.allow_public)
            addrs.append((host, port))
        for addr in addrs:
            self._bootstrap_peers.setdefault(addr, _PeerState(self.bootstrap_backoff[0]))
        reached = await self._bootstrap_round(addrs)
        self._ensure_bootstrap_loop()
        return reached

    def add_bootstrap_peer(self, host: str, port: int) -> None:
        """A peer learned at run time (LAN beacon); refused quietly if not allowed."""
        if not is_allowed(host, self.allow_public) or not 0 < port < 65536:
            _bump(self._metrics, "refused_address")
            return
        addr = (host, port)
        if addr == (self.host, self.port):
            return
        state = self._bootstrap_peers.setdefault(addr, _PeerState(self.bootstrap_backoff[0]))
        state.next_try = 0.0
        self._ensure_bootstrap_loop()
        self._bootstrap_wakeup.set()

    def _ensure_bootstrap_loop(self) -> None:
        if self._bootstrap_task is None and not self._stopped:
            self._bootstrap_task = asyncio.ensure_future(self._bootstrap_loop())

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
            if is_allowed(ip, self.allow_public):
                return (ip, port)
        _bump(self._metrics, "refused_address")
        return None

    async def _bootstrap_round(self, addrs: list[tuple[str, int]]) -> int:
        async def reach(addr: tuple[str, int]) -> Node | None:
            _bump(self._metrics, "bootstrap_attempts")
            state = self._bootstrap_peers.get(addr)
            resolved = await self._resolve(*addr)
            node = None
            if resolved is not None:
                ok, result = await self.protocol.ping(resolved, self.node.id)
                if ok and isinstance(result, bytes) and len(result) == _ID_LEN:
                    node = Node(result, resolved[0], resolved[1])
            if state is not None:
                state.record(node is not None, self.clock(), self.bootstrap_backoff)
            if node is None:
                _bump(self._metrics, "bootstrap_failures")
            return node

        found = [n for n in await asyncio.gather(*(reach(a) for a in addrs)) if n is not None]
        if found:
            for node in found:
                self.protocol.welcome_if_new(node)
            await NodeSpiderCrawl(self.protocol, self.node, found, self.ksize, self.alpha).find()
        return len(found)

    async def _bootstrap_loop(self) -> None:
        """Retry bootstrap peers that are not in the routing table, with backoff."""
        while not self._stopped:
            now = self.clock()
            known = {(n.ip, n.port) for b in self.protocol.router.buckets for n in b.get_nodes()}
            due = []
            for addr, state in self._bootstrap_peers.items():
                if addr in known:
                    state.record(True, now, self.bootstrap_backoff)
                elif state.next_try <= now:
                    due.append(addr)
            if due:
                with contextlib.suppress(Exception):
                    await self._bootstrap_round(due)
            waits = [s.next_try - self.clock() for s in self._bootstrap_peers.values()]
            delay = min([self.bootstrap_backoff[1], *waits])
            self._bootstrap_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._bootstrap_wakeup.wait(), max(0.05, delay))

    # --------------------------------------------------------------- records

    def _next_seq(self) -> int:
        # Wall-clock milliseconds, so a restarted node's records still beat
        # the ones it published before the restart.
        self._last_seq = max(self._last_seq + 1, int(self.wall_clock() * 1000))
        return self._last_seq

    def _accept_record(self, dkey: bytes, data: bytes, remaining: float) -> bool:
        try:
            record = decode_record(data)
        except RecordError as exc:
            _bump(self._metrics, f"records_rejected_{exc.reason}")
            return False
        if digest(record.key) != dkey:
            _bump(self._metrics, "records_rejected_wrong_key")
            return False
        outcome = self.storage.put(dkey, record, remaining=remaining)
        if outcome.accepted:
            _bump(self._metrics, "records_stored")
        else:
            _bump(self._metrics, f"records_rejected_{outcome.reason}")
        return bool(outcome.accepted)

    async def put(self, key: str, value: Any, *, ttl: float) -> int:
        """Publish ``value`` under ``key`` as this node's record; returns how many nodes
        (this one included) stored it. Raises RecordError if the value is invalid or too big."""
        return await self._publish(key, value, ttl=ttl, tombstone=False)

    async def delete(self, key: str) -> None:
        """Withdraw this node's record under ``key`` (best effort): a tombstone with a newer
        seq that hides the old record until that one would have expired anyway."""
        old = self._own.pop(key, None)
        ttl = old.ttl if old is not None else MAX_TTL
        with contextlib.suppress(DHTError):
            await self._publish(key, None, ttl=ttl, tombstone=True)
        self._own.pop(key, None)

    async def leave(self, within: float = 5.0) -> None:
        """Withdraw all of this node's records (best effort, giving up after ``within`` s)."""
        keys = list(self._own)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(self.delete(k) for k in keys)), within)

    async def _publish(self, key: str, value: Any, *, ttl: float, tombstone: bool) -> int:
        if self._stopped:
            raise DHTError("DHT node is stopped; cannot publish")
        record = make_record(
            key,
            value,
            public_key=self.key.public_bytes,
            sign=self.key.sign,
            seq=self._next_seq(),
            ttl=ttl,
            tombstone=tombstone,
        )
        record = record.with_expiry(expiry_for(record, now=self.clock()))
        if not tombstone:
            self._own[key] = record
        return await self._store_record(key, record)

    async def _store_record(self, key: str, record: Record) -> int:
        dkey = digest(key)
        target = Node(dkey)
        nearest = self.protocol.router.find_neighbors(target)
        nodes: list[Node] = []
        if nearest:
            nodes = await NodeSpiderCrawl(
                self.protocol, target, nearest, self.ksize, self.alpha
            ).find()
        stored = 0
        # Keep a local copy when this node is among the k closest (always in a
        # small cluster) so later joiners receive it via welcome_if_new.
        if len(nodes) < self.ksize or self.node.distance_to(target) < max(
            n.distance_to(target) for n in nodes
        ):
            outcome = self.storage.put(dkey, record, remaining=record.remaining(self.clock()))
            stored += 1 if outcome.accepted or outcome.reason == "duplicate" else 0
        results = await asyncio.gather(*(self.protocol.call_store(n, dkey, record) for n in nodes))
        stored += sum(1 for ok, answer in results if ok and answer is True)
        return stored

    async def lookup(self, key: str) -> LookupResult:
        """Crawl toward ``key`` and merge every verified record seen (with lookup statistics)."""
        _bump(self._metrics, "lookups")
        dkey = digest(key)
        target = Node(dkey)
        local = [r for r in self.storage.get(dkey) if r.key == key]
        nearest = self.protocol.router.find_neighbors(target)
        crawl = _RecordCrawl(self, target, nearest, key)
        if nearest:
            await crawl.find()
        merged = merge_records([*local, *crawl.records], now=self.clock())
        records = RecordSet({p: r for p, r in merged.items() if not r.tombstone})
        records.truncated = crawl.truncated
        return LookupResult(
            records=records,
            truncated=crawl.truncated,
            rounds=crawl.rounds,
            queried=crawl.queried,
            responded=crawl.responded,
            first_hit_round=crawl.first_hit_round,
            rejected=crawl.rejected,
        )

    async def get(self, key: str) -> RecordSet:
        """publisher node id -> newest verified, unexpired record under ``key``."""
        return (await self.lookup(key)).records

    async def publish_member(self, value: Any, *, ttl: float) -> None:
        """Publish this node's capability record in the cluster directory."""
        await self.put(member_key(self.node_id), value, ttl=ttl)

    async def members(self) -> RecordSet:
        """All directory records, read from the 16 shards concurrently."""
        results = await asyncio.gather(
            *(self.get(f"{DIRECTORY_PREFIX}{s}") for s in DIRECTORY_SHARDS)
        )
        merged = RecordSet()
        for shard in results:
            merged.update(shard)
            merged.truncated = merged.truncated or shard.truncated
        return merged


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
