"""The LAN beacon payload: build and parse, sealed with the cluster's beacon key.

A beacon carries only what a peer needs to bootstrap its DHT::

    seal(beacon_key, msgpack [1, node_id (hex str), dht_host (str, "" = the source address), dht_port])

``parse_beacon`` never raises: it returns a :class:`BeaconPayload` or a ``Drop``
whose reason is a metric label (another cluster's beacon on the same LAN lands on
``bad_seal``, quietly).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from protocol.seal import Drop, ReplayGuard, SealError, open_sealed, seal

__all__ = ["BEACON_VERSION", "MAX_BEACON", "BeaconPayload", "build_beacon", "parse_beacon"]

BEACON_VERSION = 1
# A real beacon is ~140 bytes; anything much larger is not one of ours.
MAX_BEACON = 512


@dataclass(frozen=True, slots=True)
class BeaconPayload:
    node_id: str
    dht_host: str  # "" means: the address the beacon came from
    dht_port: int


def build_beacon(payload: BeaconPayload, *, key: bytes, now: float) -> bytes:
    body = msgpack.packb(
        [BEACON_VERSION, payload.node_id, payload.dht_host, payload.dht_port], use_bin_type=True
    )
    return seal(key, body, now=now)


def parse_beacon(
    data: bytes, *, key: bytes, now: float, max_skew: float, replay: ReplayGuard
) -> BeaconPayload | Drop:
    if len(data) > MAX_BEACON:
        return Drop("garbage")
    try:
        unsealed = open_sealed(key, data, now=now, max_skew=max_skew)
    except SealError as exc:
        return Drop(exc.reason, str(exc))
    if not replay.check(unsealed.nonce, now=now):
        return Drop("replay")
    try:
        message = msgpack.unpackb(
            unsealed.payload, raw=False, max_array_len=8, max_map_len=0, max_ext_len=0
        )
    except Exception:  # msgpack raises several types for bad input
        return Drop("malformed")
    if (
        not isinstance(message, list)
        or len(message) != 4
        or message[0] != BEACON_VERSION
        or not isinstance(message[1], str)
        or not isinstance(message[2], str)
        or isinstance(message[3], bool)
        or not isinstance(message[3], int)
        or not 0 < message[3] < 65536
    ):
        return Drop("malformed")
    return BeaconPayload(message[1], message[2], message[3])
