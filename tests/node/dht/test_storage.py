"""Tests for node.dht_storage: per-publisher records, seq ordering, expiry (fake clock)."""

from __future__ import annotations

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
    return make_record("k", value, public_key=key.public_bytes, sign=key.sign, seq=seq, ttl=ttl)


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


def test_freshest_first_and_limits() -> None:
    clock = FakeClock()
    store = RecordStore(clock=clock, max_publishers_per_key=2, max_keys=1)
    store.put(DKEY, rec(A, "a", 1))
    clock.now += 1
    store.put(DKEY, rec(B, "b", 1))
    assert [r.value for r in store.get(DKEY)] == ["b", "a"]
    c = NodeKey.generate()
    assert store.put(DKEY, rec(c, "c", 1)).reason == "full"
    other = make_record("other", 1, public_key=A.public_bytes, sign=A.sign, seq=1, ttl=5)
    assert store.put(digest("other"), other).reason == "full"
    assert {(dkey, r.value) for dkey, r in store} == {(DKEY, "a"), (DKEY, "b")}
