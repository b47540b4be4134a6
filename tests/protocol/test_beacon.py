"""protocol/beacon.py: the beacon payload built and parsed; every bad input a named drop."""

from __future__ import annotations

import os

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.beacon import BEACON_DOMAIN, MAX_BEACON, BeaconPayload, build_beacon, parse_beacon
from protocol.ids import node_id_for
from protocol.seal import Drop, ReplayGuard, seal, sign_envelope

KEY = os.urandom(32)
NOW = 1_700_000_000.0
PRIVATE = Ed25519PrivateKey.generate()
PUBLIC = PRIVATE.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def beacon(host: str = "", port: int = 7421, *, key: bytes = KEY, now: float = NOW) -> bytes:
    return build_beacon(host, port, key=key, public_key=PUBLIC, sign=PRIVATE.sign, now=now)


def parse(data: bytes) -> BeaconPayload | Drop:
    return parse_beacon(data, key=KEY, now=NOW, max_skew=60, replay=ReplayGuard(60))


def test_round_trip_names_the_signing_key_and_replay_is_dropped() -> None:
    data = beacon()
    assert parse(data) == BeaconPayload(node_id_for(PUBLIC), "", 7421, NOW)
    replay = ReplayGuard(60)
    assert isinstance(parse_beacon(data, key=KEY, now=NOW, max_skew=60, replay=replay), BeaconPayload)
    assert parse_beacon(data, key=KEY, now=NOW, max_skew=60, replay=replay) == Drop("replay")


@pytest.mark.parametrize(
    "body",
    [[1, "", 1], [2, "", 0], [2, "", True], [2, 5, 1], [2, ""], {"a": 1}],
)
def test_malformed_payloads(body: object) -> None:
    envelope = sign_envelope(PUBLIC, PRIVATE.sign, msgpack.packb(body), domain=BEACON_DOMAIN, timestamp=NOW)
    assert parse(seal(KEY, envelope, now=NOW)) == Drop("malformed")


def test_forged_signature_other_cluster_stale_and_oversized() -> None:
    other = Ed25519PrivateKey.generate()
    envelope = sign_envelope(PUBLIC, other.sign, msgpack.packb([2, "", 1]), domain=BEACON_DOMAIN, timestamp=NOW)
    assert parse(seal(KEY, envelope, now=NOW)) == Drop("signature")
    assert parse(beacon(key=os.urandom(32))).reason == "bad_seal"  # type: ignore[union-attr]
    stale = parse(beacon(now=NOW - 600))
    assert isinstance(stale, Drop) and stale.reason == "stale" and stale.sent_at == NOW - 600
    assert parse(b"x" * (MAX_BEACON + 1)) == Drop("garbage")


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=600))
def test_any_bytes_drop(data: bytes) -> None:
    assert isinstance(parse(data), Drop)
