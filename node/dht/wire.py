"""The DHT datagram format: domain, size limits, message shapes, node tuples.

Inside every sealed datagram (node/dht_protocol.py) is plain msgpack (never
pickle, no ext types)::

    request:  [0, msg_id (20 bytes), name, [sender dht id, args...]]
    response: [1, msg_id, result]

Node tuples from peers (``[id, ip, port]``) are checked here before any of
them reaches the routing table or a crawl.
"""

from __future__ import annotations

from typing import Any

from kademlia.node import Node

from node.net.addresses import is_allowed

__all__ = [
    "DATAGRAM_DOMAIN",
    "ID_LEN",
    "MAX_DATAGRAM",
    "MAX_REQUEST_BYTES",
    "RESPONSE_BUDGET",
    "RPCS",
    "UNPACK_LIMITS",
    "valid_node_tuple",
]

DATAGRAM_DOMAIN = b"enjambre/dht-datagram/v1"
# rpcudp's request limit, kept for the msgpack body of every request.
MAX_REQUEST_BYTES = 8192
# Bytes of records in one find_value answer (plus about 1 KB of neighbours):
# the same order as a request, so answers fragment no worse than requests.
RESPONSE_BUDGET = 8192
MAX_DATAGRAM = 65507
ID_LEN = 20
RPCS = frozenset({"ping", "store", "find_node", "find_value"})
UNPACK_LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "max_bin_len": MAX_DATAGRAM,
    "max_str_len": MAX_DATAGRAM,
    "max_array_len": 4096,
    "max_map_len": 16,
    "max_ext_len": 0,
}


def valid_node_tuple(entry: Any, allow_public: bool) -> Node | None:
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    node_id, ip, port = entry
    if not isinstance(node_id, bytes) or len(node_id) != ID_LEN:
        return None
    if not isinstance(ip, str) or not isinstance(port, int) or not 0 < port < 65536:
        return None
    if not is_allowed(ip, allow_public):
        return None
    return Node(node_id, ip, port)
