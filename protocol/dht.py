"""The DHT datagram format: bytes <-> typed requests and responses, or a named drop reason.

Every datagram is ``seal(dht_key, envelope)`` (protocol/seal.py): ChaCha20-Poly1305
with a fresh nonce and a timestamp around a signed envelope carrying the sender's
Ed25519 public key. Inside is plain msgpack (never pickle, no ext types)::

    request:  [0, msg_id (20 bytes), name, [sender dht id, args...]]
    response: [1, msg_id, result]

The seal's associated data is the receiver's ``ip:port`` (``receiver_tag``), so a
datagram captured on its way to one node is refused by every other.

``parse_datagram`` runs the checks cheapest first (seal, clock skew, replay window,
signature, shape, sender id) and returns a :class:`DhtRequest`, a
:class:`DhtResponse` or a :class:`Drop` whose ``reason`` is a metric label; it never
raises on any input. The address policy is the caller's (it needs no bytes opened).
``parse_value_answer`` and ``parse_node_tuple`` check what peers put inside answers
before any of it reaches a routing table or a crawl.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.ids import DHT_ID_BYTES, dht_id_for
from protocol.seal import (
    Drop,
    ReplayGuard,
    SealError,
    open_envelope,
    open_sealed,
    seal,
    sign_envelope,
)

__all__ = [
    "COOKIE_LEN",
    "DATAGRAM_DOMAIN",
    "ID_LEN",
    "MAX_DATAGRAM",
    "MAX_REQUEST_BYTES",
    "RESPONSE_BUDGET",
    "RPC_ARITY",
    "DhtRequest",
    "DhtResponse",
    "Drop",
    "ValueAnswer",
    "build_datagram",
    "pack_body",
    "parse_datagram",
    "parse_node_tuple",
    "parse_value_answer",
    "receiver_tag",
]

DATAGRAM_DOMAIN = b"enjambre/dht-datagram/v1"
# rpcudp's request limit, kept for the msgpack body of every request.
MAX_REQUEST_BYTES = 8192
# Bytes of records in one find_value answer (plus about 1 KB of neighbours):
# the same order as a request, so answers fragment no worse than requests.
RESPONSE_BUDGET = 8192
MAX_DATAGRAM = 65507
ID_LEN = DHT_ID_BYTES
# The RPCs and how many arguments each takes (the sender's id included); a
# find_value may carry the address cookie an earlier short answer handed out.
RPC_ARITY: dict[str, tuple[int, ...]] = {"ping": (1,), "find_node": (2,), "find_value": (2, 3), "store": (4,)}
COOKIE_LEN = 16
_UNPACK_LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "max_bin_len": MAX_DATAGRAM,
    "max_str_len": MAX_DATAGRAM,
    "max_array_len": 4096,
    "max_map_len": 16,
    "max_ext_len": 0,
}


@dataclass(frozen=True, slots=True)
class DhtRequest:
    msg_id: bytes
    name: str  # one of RPC_ARITY
    sender_id: bytes  # proved by the envelope's key
    key: bytes | None = None  # find_node, find_value, store
    value: bytes | None = None  # store: an encoded record
    remaining: float | None = None  # store: the sender's remaining lifetime of it
    cookie: bytes | None = None  # find_value: proof the sender receives at its address
    sent_at: float = 0.0  # the sender's clock (authentic: it is sealed)


@dataclass(frozen=True, slots=True)
class DhtResponse:
    msg_id: bytes
    sender_id: bytes
    result: Any
    sent_at: float = 0.0


def receiver_tag(host: str, port: int) -> bytes:
    """The associated data that binds a datagram to the node at ``host:port``."""
    try:
        host = ipaddress.ip_address(host.split("%", 1)[0]).compressed
    except ValueError:
        pass
    return f"{host}|{port}".encode()


def pack_body(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def build_datagram(
    body: bytes, *, seal_key: bytes, public_key: bytes, sign: Callable[[bytes], bytes], now: float,
    receiver: bytes,
) -> bytes:
    """Sign ``body`` (a packed request or response) and seal it for ``receiver``."""
    envelope = sign_envelope(public_key, sign, body, domain=DATAGRAM_DOMAIN, timestamp=now)
    return seal(seal_key, envelope, now=now, receiver=receiver)


def parse_datagram(
    data: bytes, *, seal_key: bytes, now: float, max_skew: float, replay: ReplayGuard, receiver: bytes
) -> DhtRequest | DhtResponse | Drop:
    """Open and check one datagram sent to ``receiver`` (see the module docstring)."""
    try:
        unsealed = open_sealed(seal_key, data, now=now, max_skew=max_skew, receiver=receiver)
    except SealError as exc:
        return Drop(exc.reason, str(exc), exc.timestamp)
    # Only authentic datagrams reach the replay guard, so garbage cannot flush it.
    if not replay.check(unsealed.nonce, now=now):
        return Drop("replay")
    try:
        envelope = open_envelope(unsealed.payload, domain=DATAGRAM_DOMAIN, timestamp=unsealed.timestamp)
    except SealError as exc:
        return Drop(exc.reason)
    try:
        message = msgpack.unpackb(envelope.payload, **_UNPACK_LIMITS)
    except Exception:  # msgpack raises several types for bad input
        return Drop("malformed")
    return _parse_message(message, dht_id_for(envelope.public_key), unsealed.timestamp)


def _parse_message(message: Any, sender_id: bytes, sent_at: float) -> DhtRequest | DhtResponse | Drop:
    if not isinstance(message, list) or len(message) < 3:
        return Drop("malformed")
    kind, msg_id = message[0], message[1]
    if not isinstance(msg_id, bytes) or len(msg_id) != ID_LEN:
        return Drop("malformed")
    if kind == 1 and len(message) == 3:
        return DhtResponse(msg_id, sender_id, message[2], sent_at)
    if kind != 0 or len(message) != 4:
        return Drop("malformed")
    name, args = message[2], message[3]
    if name not in RPC_ARITY or not isinstance(args, list) or not args:
        return Drop("malformed")
    if args[0] != sender_id:
        # A peer may only speak for the id its key hashes to.
        return Drop("id_mismatch")
    if len(args) not in RPC_ARITY[name]:
        return Drop("malformed")
    if name == "ping":
        return DhtRequest(msg_id, name, sender_id, sent_at=sent_at)
    key = args[1]
    if not isinstance(key, bytes) or len(key) != ID_LEN:
        return Drop("malformed")
    if name == "find_value" and len(args) == 3:
        if not isinstance(args[2], bytes) or len(args[2]) != COOKIE_LEN:
            return Drop("malformed")
        return DhtRequest(msg_id, name, sender_id, key, cookie=args[2], sent_at=sent_at)
    if name != "store":
        return DhtRequest(msg_id, name, sender_id, key, sent_at=sent_at)
    value, remaining = args[2], args[3]
    if not isinstance(value, bytes) or isinstance(remaining, bool) or not isinstance(remaining, int | float):
        return Drop("malformed")
    return DhtRequest(msg_id, name, sender_id, key, value, float(remaining), sent_at=sent_at)


def parse_node_tuple(entry: Any) -> tuple[bytes, str, int] | None:
    """A peer-supplied ``[id, ip, port]`` with the right shape, else None."""
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    node_id, ip, port = entry
    if not isinstance(node_id, bytes) or len(node_id) != ID_LEN:
        return None
    if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int):
        return None
    if not 0 < port < 65536:
        return None
    return node_id, ip, port


@dataclass(frozen=True, slots=True)
class ValueAnswer:
    """What a find_value (or find_node) answer holds, shape-checked."""

    records: list[tuple[bytes, float]]  # (encoded record, remaining seconds)
    nodes: list[Any]  # raw node tuples, checked one by one with parse_node_tuple
    truncated: bool
    malformed: int  # record entries refused for their shape
    cookie: bytes | None = None  # a short answer to an unverified asker: ask again with this


def parse_value_answer(result: Any) -> ValueAnswer:
    """A find_node answer is a list of node tuples; a find_value one may be a map
    ``{"records": [[bytes, seconds], ...], "nodes": [...], "truncated": bool}``."""
    if isinstance(result, list):
        return ValueAnswer([], result, False, 0)
    if not isinstance(result, dict):
        return ValueAnswer([], [], False, 0)
    cookie = result.get("cookie")
    nodes = result.get("nodes", [])
    entries = result.get("records", []) or []
    records: list[tuple[bytes, float]] = []
    malformed = 0
    for entry in entries if isinstance(entries, list) else []:
        if (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], bytes)
            and not isinstance(entry[1], bool)
            and isinstance(entry[1], int | float)
        ):
            records.append((entry[0], float(entry[1])))
        else:
            malformed += 1
    return ValueAnswer(
        records, nodes if isinstance(nodes, list) else [], result.get("truncated") is True, malformed,
        cookie if isinstance(cookie, bytes) and len(cookie) == COOKIE_LEN else None,
    )
