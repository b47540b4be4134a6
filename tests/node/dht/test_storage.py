"""Tests for node.dht_storage: per-publisher records, seq ordering, expiry (fake clock)."""

from __future__ import annotations

import time

from kademlia.utils import digest

from node.dht.storage import RecordStore
from node.identity import NodeKey
from protocol.records import Record, make_record

A, B = NodeKey.generate(), NodeKey.generate()
DKEY = digest("k")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rec(key: NodeKey, value: object, seq: int, ttl: float = 60.0) -> Record:
    return make_record("k", value, public_key=key.public_bytes, sign=key.sign, seq=seq, ttl=ttl, issued_at=time.time())


def test_one_record_per_publisher() -> None:
    store = RecordStore(clock=FakeClock())
    assert store.put(DKEY, rec(A, "a", 1)).reason == "stored"
    assert store.put(DKEY, rec(B, "b", 1)).reason == "stored"
    assert store.put(DKEY, rec(A, "a2", 2)).reason == "replaced"
    assert sorted(r.value for r in store.get(DKEY)) == ["a2", "b"]
    assert len(store) == 2


def test_older_seq_never_replaces_newer() -> None:
    store = RecordStore(clock=FakeClock())
    store.put(DKEY, rec(A, "new", 5))
    outcome = store.put(DKEY, rec(A, "old", 4))
    assert not outcome.accepted and outcome.reason == "older_seq"
    assert [r.value for r in store.get(DKEY)] == ["new"]
    assert store.put(DKEY, rec(A, "same-seq-other-value", 5)).reason == "duplicate"


def test_expiry_and_purge() -> None:
    clock = FakeClock()
    store = RecordStore(clock=clock)
    store.put(DKEY, rec(A, "a", 1, ttl=10))
    store.put(DKEY, rec(B, "b", 1, ttl=100))
    clock.now += 11
    assert [r.value for r in store.get(DKEY)] == ["b"]
    clock.now += 100
    assert store.get(DKEY) == []
    assert len(store) == 0 and list(store) == []


def test_remaining_caps_life_so_forwarding_never_extends_it() -> None:
    clock = FakeClock()
    store = RecordStore(clock=clock)
    store.put(DKEY, rec(A, "a", 1, ttl=100), remaining=5)
    clock.now += 6
    assert store.get(DKEY) == []
    assert store.put(DKEY, rec(A, "a", 1, ttl=100), remaining=0).reason == "expired"


def test_same_record_refresh_only_extends_up_to_signed_ttl() -> None:
    clock = FakeClock()
    store = RecordStore(clock=clock)
    record = rec(A, "a", 1, ttl=10)
    store.put(DKEY, record, remaining=2)
    assert store.put(DKEY, record, remaining=8).reason == "refreshed"
    clock.now += 9
    assert store.get(DKEY) == []


def test_first_seen_first_and_limits() -> None:
    clock = FakeClock()
    store = RecordStore(clock=clock, max_publishers_per_key=2, max_keys=1)
    store.put(DKEY, rec(A, "a", 1))
    clock.now += 1
    store.put(DKEY, rec(B, "b", 1))
    clock.now += 1
    store.put(DKEY, rec(A, "a2", 2))  # a newer record keeps its publisher's place
    assert [r.value for r in store.get(DKEY)] == ["a2", "b"]
    c = NodeKey.generate()
    assert store.put(DKEY, rec(c, "c", 1)).reason == "full"
    other = make_record("other", 1, public_key=A.public_bytes, sign=A.sign, seq=1, ttl=5, issued_at=time.time())
    assert store.put(digest("other"), other).reason == "full"
    assert {(dkey, r.value) for dkey, r in store} == {(DKEY, "a2"), (DKEY, "b")}


def test_byte_budget_and_quotas() -> None:
    size = len(rec(A, "x" * 100, 1).encoded) + 1  # records under "k1".."k4" below
    store = RecordStore(clock=FakeClock(), max_bytes=3 * size, max_bytes_per_publisher=2 * size,
                        max_bytes_per_source=2 * size)
    keys = [NodeKey.generate() for _ in range(4)]

    def put(key: NodeKey, name: str, source: str | None) -> str:
        record = make_record(name, "x" * 100, public_key=key.public_bytes, sign=key.sign, seq=1, ttl=60,
                             issued_at=time.time())
        return store.put(digest(name), record, source=source).reason

    assert put(keys[0], "k1", "10.0.0.9") == "stored"
    assert put(keys[0], "k2", "10.0.0.9") == "stored"
    assert put(keys[0], "k3", None) == "publisher_quota"  # one key may hold 2 records' worth
    assert put(keys[1], "k3", "10.0.0.9") == "source_quota"  # one source may hand over 2
    assert put(keys[1], "k3", "10.0.0.8") == "stored"
    assert put(keys[2], "k4", "10.0.0.7") == "over_budget"  # the store is full
    assert store.bytes_held == 3 * size


def test_trusted_record_displaces_the_newest_untrusted_one() -> None:
    clock = FakeClock()
    store = RecordStore(clock=clock, max_publishers_per_key=3)
    fakes = [NodeKey.generate() for _ in range(3)]
    for i, fake in enumerate(fakes):
        clock.now += 1
        assert store.put(DKEY, rec(fake, f"fake{i}", 1), source="10.0.0.66", trusted=False).accepted
    assert store.put(DKEY, rec(NodeKey.generate(), "other fake", 1), trusted=False).reason == "full"
    real = rec(A, "real", 1)
    assert store.put(DKEY, real, source="10.0.0.2", trusted=True).reason == "stored"
    assert [r.value for r in store.get(DKEY)] == ["fake0", "fake1", "real"]
