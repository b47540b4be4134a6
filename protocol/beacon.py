"""The LAN beacon payload: build and parse, signed by the node's key and sealed with the beacon key.

A beacon carries only what a peer needs to bootstrap its DHT::

    seal(beacon_key, envelope(node public key, signature, msgpack [2, dht_host, dht_port]))

``dht_host`` "" means: the address the beacon came from. The node id is derived
from the envelope's key, so a member cannot announce addresses in another node's
name, and every identity it invents costs it a key (the receiver caps how many it
keeps). ``parse_beacon`` never raises: it returns a :class:`BeaconPayload` or a
``Drop`` whose reason is a metric label (another cluster's beacon on the same LAN
lands on ``bad_seal``, quietly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from protocol.ids import node_id_for
from protocol.seal import (
    Drop,
    ReplayGuard,
    SealError,
    open_envelope,
    open_sealed,
    seal,
    sign_envelope,
)

__all__ = ["BEACON_DOMAIN", "BEACON_VERSION", "MAX_BEACON", "BeaconPayload", "build_beacon", "parse_beacon"]

BEACON_VERSION = 2
BEACON_DOMAIN = b"enjambre/beacon/v2"
# A real beacon is ~240 bytes; anything much larger is not one of ours.
MAX_BEACON = 512


@dataclass(frozen=True, slots=True)
class BeaconPayload:
    node_id: str
    dht_host: str  # "" means: the address the beacon came from
    dht_port: int
    sent_at: float = 0.0  # the sender's clock (authentic: it is sealed)


def build_beacon(
    dht_host: str, dht_port: int, *, key: bytes, public_key: bytes, sign: Callable[[bytes], bytes], now: float
) -> bytes:
    body = msgpack.packb([BEACON_VERSION, dht_host, dht_port], use_bin_type=True)
    envelope = sign_envelope(public_key, sign, body, domain=BEACON_DOMAIN, timestamp=now)
    return seal(key, envelope, now=now)


def parse_beacon(
    data: bytes, *, key: bytes, now: float, max_skew: float, replay: ReplayGuard
) -> BeaconPayload | Drop:
    if len(data) > MAX_BEACON:
        return Drop("garbage")
    try:
        unsealed = open_sealed(key, data, now=now, max_skew=max_skew)
    except SealError as exc:
        return Drop(exc.reason, str(exc), exc.timestamp)
    if not replay.check(unsealed.nonce, now=now):
        return Drop("replay")
    try:
        envelope = open_envelope(unsealed.payload, domain=BEACON_DOMAIN, timestamp=unsealed.timestamp)
    except SealError as exc:
        return Drop(exc.reason)
    try:
        message = msgpack.unpackb(envelope.payload, raw=False, max_array_len=8, max_map_len=0, max_ext_len=0)
    except Exception:  # msgpack raises several types for bad input
        return Drop("malformed")
    if (
        not isinstance(message, list)
        or len(message) != 3
        or message[0] != BEACON_VERSION
        or not isinstance(message[1], str)
        or isinstance(message[2], bool)
        or not isinstance(message[2], int)
        or not 0 < message[2] < 65536
    ):
        return Drop("malformed")
    return BeaconPayload(node_id_for(envelope.public_key), message[1], message[2], unsealed.timestamp)
