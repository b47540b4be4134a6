"""The DHT's wire protocol: kademlia's KademliaProtocol over sealed, signed datagrams.

What it changes in the ``kademlia``/``rpcudp`` packages and why:

* Datagrams. rpcudp sends ``0x00|0x01 + msg id + umsgpack`` in the clear.
  Here every datagram is ``seal(dht_key, envelope)`` (protocol.seal): AEAD with
  a fresh nonce and a timestamp, then a signed envelope carrying the sender's
  Ed25519 public key. Stale, replayed, forged or garbage datagrams are dropped
  and counted. Inside is plain msgpack (node/dht_wire.py).
* Identity. The first argument of every request (the sender's DHT id) must be
  ``dht_id_for(public key of the envelope)``; a response must come from the
  address asked and, where the id asked is known, from that id.
* Values. ``store`` hands signed records to the node's RecordStore with the
  sender's remaining lifetime; ``find_value`` answers with both records (within
  RESPONSE_BUDGET) and neighbours; a new contact gets the records it should hold.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import msgpack
import structlog
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from node.dht.routing import _RoutingTable
from node.dht.storage import RecordStore
from node.dht.types import DHTError, bump
from node.dht.wire import (
    DATAGRAM_DOMAIN,
    ID_LEN,
    MAX_REQUEST_BYTES,
    RESPONSE_BUDGET,
    RPCS,
    UNPACK_LIMITS,
    valid_node_tuple,
)
from node.identity import dht_id_for
from node.net.addresses import is_allowed
from protocol.records import Record
from protocol.seal import (
    ReplayGuard,
    SealError,
    open_envelope,
    open_sealed,
    seal,
    sign_envelope,
)

if TYPE_CHECKING:
    from node.dht.node import DHTNode

__all__ = ["SealedProtocol"]

log = structlog.get_logger("enjambre.dht")


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
        bump(owner._metrics, "datagrams_sent")
        bump(owner._metrics, "bytes_sent", len(datagram))

    def _call(
        self, address: tuple[str, int], name: str, args: list[Any], expect_id: bytes | None
    ) -> asyncio.Future[tuple[bool, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        address = (str(address[0]), int(address[1]))
        if not is_allowed(address[0], self.owner.allow_public):
            bump(self.owner._metrics, "refused_address")
            future.set_result((False, None))
            return future
        msg_id = os.urandom(ID_LEN)
        message = [0, msg_id, name, args]
        size = len(msgpack.packb(message, use_bin_type=True))
        if size > MAX_REQUEST_BYTES:
            raise DHTError(
                f"DHT {name} request is {size} bytes, over the {MAX_REQUEST_BYTES}-byte "
                "datagram limit; keep DHT values small"
            )
        bump(self.owner._metrics, "requests_sent")
        timeout = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timeout)
        self._expect[msg_id] = (address, expect_id, name)
        self._send(message, address)
        return future

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        self._expect.pop(msg_id, None)
        bump(self.owner._metrics, "rpc_failures")
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
            node = valid_node_tuple(entry, self.owner.allow_public)
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
        bump(metrics, "datagrams_received")
        bump(metrics, "bytes_received", len(data))
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
            message = msgpack.unpackb(envelope.payload, **UNPACK_LIMITS)
        except SealError as exc:
            return owner._drop(exc.reason)
        except Exception:
            return owner._drop("malformed")
        sender_id = dht_id_for(envelope.public_key)
        if not isinstance(message, list) or len(message) < 3:
            return owner._drop("malformed")
        kind, msg_id = message[0], message[1]
        if not isinstance(msg_id, bytes) or len(msg_id) != ID_LEN:
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
        if name not in RPCS or not isinstance(args, list) or not args:
            return owner._drop("malformed")
        if args[0] != sender_id:
            # A peer may only speak for the id its key hashes to.
            return owner._drop("id_mismatch")
        shapes = {"ping": 1, "find_node": 2, "find_value": 2, "store": 4}
        if len(args) != shapes[name]:
            return owner._drop("malformed")
        if name != "ping" and (not isinstance(args[1], bytes) or len(args[1]) != ID_LEN):
            return owner._drop("malformed")
        bump(owner._metrics, "requests_received")
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
        bump(owner._metrics, "responses_received")
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
            bump(self.owner._metrics, "truncated_responses")
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
        bump(self.owner._metrics, "socket_errors")
