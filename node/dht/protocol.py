"""The DHT's asyncio side: kademlia's KademliaProtocol over sealed, signed datagrams.

What it changes in the ``kademlia``/``rpcudp`` packages and why:

* Datagrams. rpcudp sends ``0x00|0x01 + msg id + umsgpack`` in the clear. Here
  every datagram is built and parsed by protocol/dht.py (sealed, signed, with a
  timestamp); stale, replayed, forged or garbage datagrams are dropped and
  counted by reason. This module only adds the address policy and the I/O.
* Identity. The sender id of a request is proved by the envelope's key (checked
  in protocol/dht.py); a response must come from the address asked and, where
  the id asked is known, from that id. A datagram is sealed for its receiver's
  address, so a copy replayed to another node is refused.
* Contacts. A sender joins the routing table only after it answers our ping at
  the address it claims; until then it gets short answers (node/dht/guard.py),
  so a spoofed source cannot turn this node into an amplifier, and a flood of
  fresh identities cannot make it push its records to each of them.
* Values. ``store`` hands signed records to the RecordStore with the sender's
  remaining lifetime; ``find_value`` answers with both records (within
  RESPONSE_BUDGET) and neighbours; a new contact gets the records it should hold.

It gets what it needs (keys, settings, counters, clocks, a task spawner) and never
a reference to the DHT node that owns it.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.utils import digest

from node.dht.errors import DHTError
from node.dht.guard import SenderGuard
from node.dht.routing import ExactRoutingTable, node_from_tuple
from node.dht.storage import RecordStore
from node.net.addresses import format_hostport, is_allowed
from node.system.clock import ClockOffsets
from node.system.counters import Counters
from protocol.dht import (
    ID_LEN,
    MAX_REQUEST_BYTES,
    RESPONSE_BUDGET,
    DhtRequest,
    DhtResponse,
    Drop,
    build_datagram,
    pack_body,
    parse_datagram,
    receiver_tag,
)
from protocol.records import Record, RecordError, decode_record
from protocol.seal import DEFAULT_MAX_SKEW, ReplayGuard

__all__ = ["MAX_UNREACHABLE", "DatagramSettings", "SealedProtocol"]

MAX_UNREACHABLE = 1024

log = structlog.get_logger("enjambre.dht")


@dataclass(frozen=True, slots=True)
class DatagramSettings:
    """What the protocol needs to seal, sign and check datagrams."""

    seal_key: bytes
    public_key: bytes
    sign: Callable[[bytes], bytes]
    allow_public: bool = False
    rpc_timeout: float = 2.0
    max_skew: float = DEFAULT_MAX_SKEW


class SealedProtocol(KademliaProtocol):
    """KademliaProtocol speaking sealed, signed msgpack datagrams (see module docstring)."""

    def __init__(
        self,
        source_node: Node,
        storage: RecordStore,
        ksize: int,
        *,
        settings: DatagramSettings,
        counters: Counters,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        clock_offsets: ClockOffsets | None = None,
        guard: SenderGuard | None = None,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.router = ExactRoutingTable(self, ksize, source_node)
        self.settings = settings
        self.counters = counters
        self.clock = clock
        self.wall_clock = wall_clock
        self._spawn = spawn
        self._offsets = clock_offsets
        self.guard = guard or SenderGuard()
        self._wait_timeout = settings.rpc_timeout
        self._expect: dict[bytes, tuple[tuple[str, int], bytes | None, str]] = {}
        self.replay = ReplayGuard(settings.max_skew)
        self._last_stale_warning = -math.inf
        self._receiver = b""
        # DHT ids another part of the node found dead (its TCP port refused us), until when:
        # lookups skip them instead of waiting rpc_timeout on each, which made every
        # directory read after a death take seconds. Any datagram from one clears it.
        self._unreachable: dict[bytes, float] = {}

    def mark_unreachable(self, dht_id: bytes, seconds: float) -> None:
        if len(self._unreachable) >= MAX_UNREACHABLE:
            self._unreachable.pop(next(iter(self._unreachable)))
        self._unreachable[dht_id] = self.clock() + seconds
        self.router.remove_contact(Node(dht_id))

    def _known_unreachable(self, dht_id: bytes | None) -> bool:
        until = self._unreachable.get(dht_id) if dht_id is not None else None
        if until is None:
            return False
        if until <= self.clock():
            del self._unreachable[dht_id]  # type: ignore[arg-type]
            return False
        return True

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        host, port = transport.get_extra_info("sockname")[:2]
        self._receiver = receiver_tag(str(host), int(port))

    # ----------------------------------------------------------------- sending

    def _send(self, message: list[Any], address: tuple[str, int]) -> None:
        s = self.settings
        datagram = build_datagram(
            pack_body(message), seal_key=s.seal_key, public_key=s.public_key, sign=s.sign,
            now=self.wall_clock(), receiver=receiver_tag(*address),
        )
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.sendto(datagram, address)
        self.counters.inc("datagrams_sent")
        self.counters.inc("bytes_sent", len(datagram))

    def _call(
        self, address: tuple[str, int], name: str, args: list[Any], expect_id: bytes | None
    ) -> asyncio.Future[tuple[bool, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        address = (str(address[0]), int(address[1]))
        if not is_allowed(address[0], self.settings.allow_public):
            self.counters.inc("refused_address")
            future.set_result((False, None))
            return future
        if self._known_unreachable(expect_id):
            self.counters.inc("rpc_skipped_unreachable")
            future.set_result((False, None))
            return future
        msg_id = os.urandom(ID_LEN)
        message = [0, msg_id, name, args]
        size = len(pack_body(message))
        if size > MAX_REQUEST_BYTES:
            raise DHTError(
                f"DHT {name} request is {size} bytes, over the {MAX_REQUEST_BYTES}-byte "
                "datagram limit; keep DHT values small"
            )
        self.counters.inc("requests_sent")
        timeout = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timeout)
        self._expect[msg_id] = (address, expect_id, name)
        self._send(message, address)
        return future

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        self._expect.pop(msg_id, None)
        self.counters.inc("rpc_failures")
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
        self, address: tuple[str, int], nodeid: bytes, key: bytes, expect: bytes | None = None,
        cookie: bytes | None = None,
    ) -> asyncio.Future[tuple[bool, Any]]:
        args = [nodeid, key] if cookie is None else [nodeid, key, cookie]
        return self._call(address, "find_value", args, expect)

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
            entries = result[1] if isinstance(result[1], list) else []
            nodes = [node_from_tuple(e, self.settings.allow_public) for e in entries]
            result = (True, [(n.id, n.ip, n.port) for n in nodes if n is not None])
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node, cookie: bytes | None = None
    ) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_value(
            address, self.source_node.id, node_to_find.id, expect=node_to_ask.id, cookie=cookie
        )
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Record) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        remaining = value.remaining(self.clock())
        if remaining <= 0:
            return (False, None)
        result = await self.store(
            address, self.source_node.id, key, value.encoded, remaining, expect=node_to_ask.id
        )
        return self.handle_call_response(result, node_to_ask)

    # --------------------------------------------------------------- receiving

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self._receive(data, (str(addr[0]), int(addr[1])))
        except Exception as exc:
            # A bug or an unforeseen input must not take the node down.
            self.counters.inc("dropped", reason="internal_error")
            log.warning("dht datagram handling failed", error=repr(exc))

    def _receive(self, data: bytes, address: tuple[str, int]) -> None:
        self.counters.inc("datagrams_received")
        self.counters.inc("bytes_received", len(data))
        if not is_allowed(address[0], self.settings.allow_public):
            self.counters.inc("dropped", reason="address")
            return
        if not self.guard.allow_datagram(address, self.clock()):
            self.counters.inc("dropped", reason="rate_limited")
            return
        s, now = self.settings, self.wall_clock()
        message = parse_datagram(
            data, seal_key=s.seal_key, now=now, max_skew=s.max_skew, replay=self.replay, receiver=self._receiver
        )
        sent_at = message.sent_at
        if self._unreachable and isinstance(message, DhtRequest | DhtResponse):
            self._unreachable.pop(getattr(message, "sender_id", b""), None)
        if self._offsets is not None and sent_at:
            self._offsets.observe(address[0], sent_at, now)
        if isinstance(message, DhtRequest):
            self._handle_request(message, address, len(data))
        elif isinstance(message, DhtResponse):
            self._handle_response(message, address)
        else:
            self._drop(message, address)

    def _drop(self, drop: Drop, address: tuple[str, int]) -> None:
        self.counters.inc("dropped", reason=drop.reason)
        if drop.reason == "stale":
            # A peer with a wrong clock is a setup problem the operator must see,
            # but not once per datagram.
            now = self.clock()
            if now - self._last_stale_warning >= 60:
                self._last_stale_warning = now
                log.warning("dht peer clock out of range", peer=format_hostport(*address),
                            detail=drop.detail)

    def _handle_request(self, req: DhtRequest, address: tuple[str, int], size: int) -> None:
        self.counters.inc("requests_received")
        source = Node(req.sender_id, address[0], address[1])
        contact = self._is_contact(source)
        verifying = False
        if contact:
            self.router.add_contact(source)  # seen again: moves to the fresh end of its bucket
        else:
            verifying = self._verify(source)
        full = contact or self.guard.cookie_ok(req.cookie, address, req.sender_id, self.clock())
        budget = None if full else self.guard.reply_budget(size, verifying=verifying)
        if req.name == "ping":
            result: Any = self.source_node.id
        elif req.name == "find_node":
            assert req.key is not None
            result = self._neighbors(req.key, source, budget)
        elif req.name == "find_value":
            assert req.key is not None
            if full:
                result = self._find_value(req.key, source)
            else:
                # A short answer: nodes that fit, and a cookie to ask again with.
                cookie = self.guard.cookie(address, req.sender_id, self.clock())
                assert budget is not None
                result = {"nodes": self._neighbors(req.key, source, budget), "cookie": cookie}
                self.counters.inc("short_answers")
        else:
            assert req.key is not None and req.value is not None and req.remaining is not None
            result = self.accept_record(req.key, req.value, req.remaining, source=source, contact=contact)
        self._send([1, req.msg_id, result], address)

    def _is_contact(self, node: Node) -> bool:
        """Is ``node`` (this id at this address) in the routing table already?"""
        known = self.router.buckets[self.router.get_bucket_for(node)].nodes.get(node.id)
        return known is not None and (known.ip, known.port) == (node.ip, node.port)

    def _verify(self, node: Node) -> bool:
        """Ping an unverified sender at the address it claims; True if a ping went out."""
        address = (node.ip, node.port)
        if not self.guard.start_verify(address, self.clock()):
            return False
        self.counters.inc("verifications")

        async def verify() -> None:
            ok = False
            try:
                ok, _ = await self.call_ping(node)  # a good answer welcomes it (handle_call_response)
            finally:
                self.guard.verified(address, ok, self.clock())

        self._spawn(verify())
        return True

    def _neighbors(self, key: bytes, exclude: Node, budget: int | None) -> list[list[Any]]:
        neighbors = [list(n) for n in self.router.find_neighbors(Node(key), exclude=exclude)]
        if budget is not None:
            while neighbors and len(pack_body(neighbors)) > budget:
                neighbors.pop()
        return neighbors

    def _handle_response(self, resp: DhtResponse, address: tuple[str, int]) -> None:
        expected = self._expect.get(resp.msg_id)
        if expected is None or resp.msg_id not in self._outstanding or address != expected[0]:
            self.counters.inc("dropped", reason="unsolicited")
            return
        _, want_id, name = expected
        future, timeout = self._outstanding.pop(resp.msg_id)
        del self._expect[resp.msg_id]
        timeout.cancel()
        self.counters.inc("responses_received")
        if (want_id is not None and resp.sender_id != want_id) or (
            name == "ping" and resp.result != resp.sender_id
        ):
            # Someone else answers at that address: treat it as a failed
            # call so the routing table forgets the claimed id.
            self.counters.inc("dropped", reason="id_mismatch")
            result_pair: tuple[bool, Any] = (False, None)
        else:
            result_pair = (True, resp.result)
        if not future.done():
            future.set_result(result_pair)

    # -------------------------------------------------------------------- rpcs

    def accept_record(
        self, dkey: bytes, data: bytes, remaining: float, *, source: Node | None = None, contact: bool = True
    ) -> bool:
        """Store a record a peer sent, if it is valid and belongs under ``dkey``.

        From a sender not yet verified only its own record is taken (a node that has
        just joined publishes at once); records of others come from known contacts.
        """
        try:
            record = decode_record(data, now=self.wall_clock())
        except RecordError as exc:
            self.counters.inc("records_rejected", reason=exc.reason)
            return False
        if digest(record.key) != dkey:
            self.counters.inc("records_rejected", reason="wrong_key")
            return False
        publisher_dht_id = bytes.fromhex(record.publisher)[:ID_LEN]
        if not contact and source is not None and publisher_dht_id != source.id:
            self.counters.inc("records_rejected", reason="unverified_sender")
            return False
        outcome = self.storage.put(
            dkey, record, remaining=remaining, source=source.ip if source is not None else None,
            trusted=self._is_known_id(publisher_dht_id),
        )
        if outcome.accepted:
            self.counters.inc("records_stored")
        else:
            self.counters.inc("records_rejected", reason=outcome.reason)
        return bool(outcome.accepted)

    def _is_known_id(self, dht_id: bytes) -> bool:
        if dht_id == self.source_node.id:
            return True
        probe = Node(dht_id)
        return dht_id in self.router.buckets[self.router.get_bucket_for(probe)].nodes

    def _find_value(self, key: bytes, source: Node) -> Any:
        neighbors = [list(n) for n in self.router.find_neighbors(Node(key), exclude=source)]
        records = self.storage.get(key)
        if not records:
            return neighbors
        now = self.clock()
        # Records get the full budget (so the largest allowed record always
        # fits); the neighbour list (~1 KB for k=20) comes on top. Oldest first
        # seen first, so re-stored spam cannot push standing records out.
        budget = RESPONSE_BUDGET - 64
        chosen: list[list[Any]] = []
        truncated = False
        for record in records:
            cost = len(record.encoded) + 16
            if cost > budget:
                truncated = True
                continue
            budget -= cost
            chosen.append([record.encoded, record.remaining(now)])
        if truncated:
            self.counters.inc("truncated_responses")
        return {"records": chosen, "nodes": neighbors, "truncated": truncated}

    def welcome_if_new(self, node: Node) -> None:
        """A verified new contact: add it, and hand it the records it should hold.

        Called only for nodes that answered us at their address (kademlia calls it
        from handle_call_response). One id per ip:port: a contact that answers at an
        address replaces whatever id was there. Records are pushed once per
        ``welcome_every``, at most ``records_per_welcome`` of them, and never more
        than ``max_welcome_stores`` stores at a time.
        """
        if not self.router.is_new_node(node):
            return
        for bucket in self.router.buckets:
            for other in list(bucket.nodes.values()):
                if (other.ip, other.port) == (node.ip, node.port) and other.id != node.id:
                    self.router.remove_contact(other)
        guard = self.guard
        if not guard.should_welcome(node.id, self.clock()):
            self.router.add_contact(node)
            return
        pushed = 0
        for dkey, record in self.storage:
            if pushed >= guard.records_per_welcome or guard.welcome_stores >= guard.max_welcome_stores:
                self.counters.inc("welcome_skipped")
                break
            keynode = Node(dkey)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                last = neighbors[-1].distance_to(keynode)
                new_node_close = node.distance_to(keynode) < last
                first = neighbors[0].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < first
            if not neighbors or (new_node_close and this_closest):
                pushed += 1
                guard.welcome_stores += 1  # counted now, so this loop sees its own stores
                self._spawn(self._welcome_store(node, dkey, record))
        # Added after choosing the records, as kademlia does: the choice compares the
        # new node with the contacts it will join.
        self.router.add_contact(node)

    async def _welcome_store(self, node: Node, dkey: bytes, record: Record) -> None:
        try:
            await self.call_store(node, dkey, record)
        finally:
            self.guard.welcome_stores -= 1

    def error_received(self, exc: Exception) -> None:
        self.counters.inc("socket_errors")
