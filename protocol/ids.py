"""The node-id rule, in one place: a node is its Ed25519 public key.

The node id is the hex SHA-256 of the raw 32-byte public key, so ids never collide
and no key can claim another's id; the DHT id is the first 20 bytes of the same
digest (Kademlia's 160-bit key space). Identity, records, the Hello check and the
DHT all derive ids here.
"""

from __future__ import annotations

import hashlib

__all__ = ["DHT_ID_BYTES", "dht_id_for", "node_id_for"]

DHT_ID_BYTES = 20


def node_id_for(public_key: bytes) -> str:
    """The node id (64 hex digits) of a raw Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()


def dht_id_for(public_key: bytes) -> bytes:
    """The node's Kademlia id: the first 20 bytes of the same digest."""
    return hashlib.sha256(public_key).digest()[:DHT_ID_BYTES]
