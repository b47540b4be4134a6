"""Tests for protocol.seal: sealed datagrams, replay window, signed envelopes."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.identity import NodeKey
from protocol.seal import (
    SEAL_OVERHEAD,
    ReplayGuard,
    SealError,
    open_envelope,
    open_sealed,
    seal,
    sign_envelope,
)

KEY = os.urandom(32)
OTHER = os.urandom(32)
NOW = 1_700_000_000.0


def test_roundtrip() -> None:
    sealed = seal(KEY, b"hello", now=NOW)
    assert len(sealed) == SEAL_OVERHEAD + 5
    assert b"hello" not in sealed
    opened = open_sealed(KEY, sealed, now=NOW + 1)
    assert opened.payload == b"hello"
    assert opened.timestamp == pytest.approx(NOW)
    assert len(opened.nonce) == 12


def test_fresh_nonce_each_time() -> None:
    assert seal(KEY, b"x", now=NOW) != seal(KEY, b"x", now=NOW)


def test_other_cluster_key_cannot_open() -> None:
    with pytest.raises(SealError) as info:
        open_sealed(OTHER, seal(KEY, b"x", now=NOW), now=NOW)
    assert info.value.reason == "bad_seal"


def test_tampering_detected() -> None:
    sealed = bytearray(seal(KEY, b"payload", now=NOW))
    sealed[-1] ^= 1
    with pytest.raises(SealError) as info:
        open_sealed(KEY, bytes(sealed), now=NOW)
    assert info.value.reason == "bad_seal"


@pytest.mark.parametrize("data", [b"", b"E1", b"XX" + b"\x00" * 60, os.urandom(100)])
def test_garbage(data: bytes) -> None:
    with pytest.raises(SealError) as info:
        open_sealed(KEY, data, now=NOW)
    assert info.value.reason in {"garbage", "bad_seal"}


@pytest.mark.parametrize("offset", [-61.0, 61.0, -3600.0])
def test_stale_timestamps(offset: float) -> None:
    with pytest.raises(SealError, match="clocks") as info:
        open_sealed(KEY, seal(KEY, b"x", now=NOW + offset), now=NOW, max_skew=60)
    assert info.value.reason == "stale"
    inside = 59.0 if offset > 0 else -59.0
    open_sealed(KEY, seal(KEY, b"x", now=NOW + inside), now=NOW, max_skew=60)


def test_bad_key_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        seal(b"short", b"x", now=NOW)


def test_replay_guard() -> None:
    guard = ReplayGuard(max_skew=60)
    assert guard.check(b"n1", now=NOW)
    assert not guard.check(b"n1", now=NOW + 10)
    assert guard.check(b"n2", now=NOW + 10)
    # Forgotten only after the datagram would be stale anyway.
    assert guard.check(b"n3", now=NOW + 121)
    assert len(guard) == 2  # n2 (still inside the window) and n3
    assert guard.check(b"n1", now=NOW + 121)


def test_replay_guard_bounded() -> None:
    guard = ReplayGuard(max_skew=60, max_entries=3)
    for i in range(10):
        assert guard.check(bytes([i]), now=NOW)
    assert len(guard) <= 3


def test_envelope_roundtrip_and_forgery() -> None:
    key, other = NodeKey.generate(), NodeKey.generate()
    data = sign_envelope(key.public_bytes, key.sign, b"body", domain=b"d", timestamp=NOW)
    env = open_envelope(data, domain=b"d", timestamp=NOW)
    assert env.public_key == key.public_bytes and env.payload == b"body"
    # Different timestamp, domain, or a key that did not sign: refused.
    for domain, ts in [(b"d", NOW + 1), (b"e", NOW)]:
        with pytest.raises(SealError) as info:
            open_envelope(data, domain=domain, timestamp=ts)
        assert info.value.reason == "signature"
    forged = sign_envelope(other.public_bytes, key.sign, b"body", domain=b"d", timestamp=NOW)
    with pytest.raises(SealError, match="signature"):
        open_envelope(forged, domain=b"d", timestamp=NOW)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        msgpack.packb([b"a", b"b"]),
        msgpack.packb([b"a" * 32, b"s" * 10, b""]),
        msgpack.packb(["x", b"y", b"z"]),
    ],
)
def test_envelope_malformed(data: bytes) -> None:
    with pytest.raises(SealError) as info:
        open_envelope(data, domain=b"d", timestamp=NOW)
    assert info.value.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_open(data: bytes) -> None:
    with pytest.raises(SealError):
        open_sealed(KEY, data, now=NOW)
