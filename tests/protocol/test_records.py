"""Tests for protocol.records: signed DHT records."""

from __future__ import annotations

import math
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.identity import NodeKey
from protocol.ids import node_id_for
from protocol.records import (
    ISSUE_TOLERANCE,
    MAX_RECORD_BYTES,
    MAX_TTL,
    Record,
    RecordError,
    decode_record,
    expiry_for,
    make_record,
    merge_records,
    supersedes,
)

KEY_A = NodeKey.generate()
KEY_B = NodeKey.generate()


def rec(
    key: NodeKey = KEY_A, *, name: str = "k", value: object = 1, seq: int = 1, ttl: float = 60.0
) -> Record:
    return make_record(name, value, public_key=key.public_bytes, sign=key.sign, seq=seq, ttl=ttl, issued_at=time.time())


def test_roundtrip_and_publisher_is_node_id() -> None:
    record = rec(value={"addr": "10.0.0.2", "mem": [1, 2], "raw": b"\x00"}, seq=7, ttl=30)
    decoded = decode_record(record.encoded, expected_key="k")
    assert decoded.value == {"addr": "10.0.0.2", "mem": [1, 2], "raw": b"\x00"}
    assert decoded.seq == 7 and decoded.ttl == 30.0 and not decoded.tombstone
    assert decoded.publisher == KEY_A.node_id == node_id_for(KEY_A.public_bytes)
    assert record.value == decoded.value


def test_signed_by_wrong_key_is_rejected() -> None:
    # Claims publisher A (A's public key) but is signed by B.
    forged = make_record("k", 1, public_key=KEY_A.public_bytes, sign=KEY_B.sign, seq=1, ttl=60, issued_at=time.time())
    with pytest.raises(RecordError) as info:
        decode_record(forged.encoded)
    assert info.value.reason == "signature"


def test_swapping_public_key_to_claim_another_publisher_is_rejected() -> None:
    good = rec(KEY_B)
    _, body, sig = msgpack.unpackb(good.encoded, raw=False)
    fields = msgpack.unpackb(body, raw=False)
    fields[1] = KEY_A.public_bytes  # claim to be A, keep B's signature
    body2 = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(RecordError, match="signature"):
        decode_record(msgpack.packb([2, body2, sig], use_bin_type=True))


def test_tampered_value_is_rejected() -> None:
    good = rec(value="honest")
    _, body, sig = msgpack.unpackb(good.encoded, raw=False)
    tampered = body.replace(b"honest", b"evil!!")
    with pytest.raises(RecordError) as info:
        decode_record(msgpack.packb([2, tampered, sig], use_bin_type=True))
    assert info.value.reason == "signature"


def test_wrong_key_name_is_rejected() -> None:
    with pytest.raises(RecordError) as info:
        decode_record(rec(name="a").encoded, expected_key="b")
    assert info.value.reason == "wrong_key"


def test_oversize_value_refused_with_clear_message() -> None:
    with pytest.raises(RecordError, match="over the DHT limit") as info:
        rec(value=b"x" * MAX_RECORD_BYTES)
    assert info.value.reason == "too_large"
    with pytest.raises(RecordError):
        decode_record(b"\x00" * (MAX_RECORD_BYTES + 1))


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL + 1, math.inf, math.nan])
def test_bad_ttl_refused(ttl: float) -> None:
    with pytest.raises(RecordError, match="ttl"):
        rec(ttl=ttl)


def test_bad_inputs_refused() -> None:
    with pytest.raises(RecordError, match="msgpack"):
        rec(value=object())
    with pytest.raises(RecordError, match="key"):
        rec(name="")
    with pytest.raises(RecordError, match="longer"):
        rec(name="x" * 300)
    with pytest.raises(RecordError, match="seq"):
        rec(seq=-1)
    with pytest.raises(RecordError, match="tombstone"):
        make_record(
            "k", 1, public_key=KEY_A.public_bytes, sign=KEY_A.sign, seq=1, ttl=1, tombstone=True, issued_at=time.time()
        )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        msgpack.packb([3, b"", b""]),
        msgpack.packb([2, b"\x90", b"s" * 64]),
        msgpack.packb([1, b"\x90", b"s" * 64]),
        msgpack.packb({"a": 1}),
    ],
)
def test_malformed_records_rejected(data: bytes) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(data)
    assert info.value.reason == "malformed"


def test_merge_newest_seq_per_publisher_and_drops_expired() -> None:
    a1 = rec(KEY_A, value="a1", seq=1).with_expiry(100)
    a2 = rec(KEY_A, value="a2", seq=2).with_expiry(100)
    b1 = rec(KEY_B, value="b1", seq=5).with_expiry(10)
    merged = merge_records([a2, a1, b1], now=50)
    assert {r.value for r in merged.values()} == {"a2"}
    merged = merge_records([a1, b1, a2], now=5)
    assert sorted(r.value for r in merged.values()) == ["a2", "b1"]


def test_older_seq_never_supersedes() -> None:
    new = rec(seq=10).with_expiry(10)
    old = rec(seq=9).with_expiry(1000)
    assert supersedes(new, old)
    assert not supersedes(old, new)
    # Same seq, different signature bytes (different value): keep what we have.
    other_value = rec(seq=10, value=2).with_expiry(2000)
    assert not supersedes(other_value, new)
    # The same record with a later expiry (a refresh) may extend it.
    assert supersedes(new.with_expiry(20), new)


def test_expiry_relative_to_receipt_capped_by_remaining() -> None:
    record = rec(ttl=60)
    assert expiry_for(record, now=1000.0) == 1060.0
    assert expiry_for(record, now=1000.0, remaining=10) == 1010.0
    assert expiry_for(record, now=1000.0, remaining=500) == 1060.0
    assert expiry_for(record, now=1000.0, remaining=-5) == 1000.0


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(value=values, seq=st.integers(0, 2**63 - 1), ttl=st.floats(0.001, MAX_TTL))
def test_roundtrip_property(value: object, seq: int, ttl: float) -> None:
    record = rec(value=value, seq=seq, ttl=ttl)
    decoded = decode_record(record.encoded, expected_key="k")
    assert decoded.value == value and decoded.seq == seq and decoded.ttl == ttl


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(data)


def test_old_and_future_records_are_refused_when_the_time_is_known() -> None:
    now = 1_700_000_000.0
    fresh = make_record("k", 1, public_key=KEY_A.public_bytes, sign=KEY_A.sign, seq=1, ttl=60, issued_at=now)
    assert decode_record(fresh.encoded, now=now + 60).issued_at == now
    assert decode_record(fresh.encoded).value == 1  # no clock, no check
    for when in (now + 60 + ISSUE_TOLERANCE + 1, now - ISSUE_TOLERANCE - 1):
        with pytest.raises(RecordError) as info:
            decode_record(fresh.encoded, now=when)
        assert info.value.reason == "stale"
