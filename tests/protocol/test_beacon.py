"""protocol/beacon.py: the beacon payload built and parsed; every bad input a named drop."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.beacon import MAX_BEACON, BeaconPayload, build_beacon, parse_beacon
from protocol.seal import Drop, ReplayGuard, seal

KEY = os.urandom(32)
NOW = 1_700_000_000.0


def parse(data: bytes) -> BeaconPayload | Drop:
    return parse_beacon(data, key=KEY, now=NOW, max_skew=60, replay=ReplayGuard(60))


def test_round_trip_and_replay() -> None:
    payload = BeaconPayload("ab" * 32, "", 7421)
    data = build_beacon(payload, key=KEY, now=NOW)
    assert parse(data) == payload
    replay = ReplayGuard(60)
    assert parse_beacon(data, key=KEY, now=NOW, max_skew=60, replay=replay) == payload
    assert parse_beacon(data, key=KEY, now=NOW, max_skew=60, replay=replay) == Drop("replay")


@pytest.mark.parametrize(
    "body",
    [[2, "id", "", 1], [1, "id", "", 0], [1, "id", "", True], [1, 5, "", 1], [1, "id", ""], {"a": 1}],
)
def test_malformed_payloads(body: object) -> None:
    assert parse(seal(KEY, msgpack.packb(body), now=NOW)) == Drop("malformed")


def test_other_cluster_stale_and_oversized() -> None:
    other = build_beacon(BeaconPayload("id", "", 1), key=os.urandom(32), now=NOW)
    assert parse(other).reason == "bad_seal"  # type: ignore[union-attr]
    assert parse(build_beacon(BeaconPayload("id", "", 1), key=KEY, now=NOW - 600)).reason == "stale"  # type: ignore[union-attr]
    assert parse(b"x" * (MAX_BEACON + 1)) == Drop("garbage")


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=600))
def test_any_bytes_drop(data: bytes) -> None:
    assert isinstance(parse(data), Drop)
