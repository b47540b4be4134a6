"""Record storage for the DHT: one record per (key, publisher), with receipt-relative expiry.

Replaces kademlia's ForgetfulStorage (one opaque value per key, kept a week).
Only verified records go in (the caller decodes them); an older sequence number
never replaces a newer one; expired records are purged on every access. Time
comes from the injected ``clock`` so tests need not sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from protocol.records import Record, expiry_for, supersedes

__all__ = ["RecordStore", "StoreOutcome"]


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    accepted: bool
    reason: str  # "stored", "replaced", "refreshed", "older_seq", "duplicate", "expired", "full"


class RecordStore:
    """dkey (20-byte Kademlia digest) -> publisher id -> newest record."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_publishers_per_key: int = 1024,
        max_keys: int = 65536,
    ) -> None:
        self.clock = clock
        self.max_publishers_per_key = max_publishers_per_key
        self.max_keys = max_keys
        self._data: dict[bytes, dict[str, Record]] = {}
        # When each (dkey, publisher) entry last changed: the freshest records
        # are the ones returned first when a response must be truncated.
        self._stored_at: dict[tuple[bytes, str], float] = {}

    def __len__(self) -> int:
        return sum(len(records) for records in self._data.values())

    def put(self, dkey: bytes, record: Record, *, remaining: float | None = None) -> StoreOutcome:
        """Store a verified record. ``remaining`` caps its life (what the sender had left)."""
        now = self.clock()
        stamped = record.with_expiry(expiry_for(record, now=now, remaining=remaining))
        if stamped.expired(now):
            return StoreOutcome(False, "expired")
        self._purge_key(dkey, now)
        records = self._data.get(dkey)
        if records is None:
            if len(self._data) >= self.max_keys:
                self.purge()
                if len(self._data) >= self.max_keys:
                    return StoreOutcome(False, "full")
            records = self._data[dkey] = {}
        publisher = record.publisher
        current = records.get(publisher)
        if current is not None:
            if record.seq < current.seq:
                return StoreOutcome(False, "older_seq")
            if not supersedes(stamped, current):
                return StoreOutcome(False, "duplicate")
            outcome = "refreshed" if record.seq == current.seq else "replaced"
        else:
            if len(records) >= self.max_publishers_per_key:
                return StoreOutcome(False, "full")
            outcome = "stored"
        records[publisher] = stamped
        self._stored_at[(dkey, publisher)] = now
        return StoreOutcome(True, outcome)

    def get(self, dkey: bytes) -> list[Record]:
        """Unexpired records under ``dkey``, freshest first (most recently stored)."""
        now = self.clock()
        self._purge_key(dkey, now)
        records = self._data.get(dkey, {})
        return sorted(
            records.values(),
            key=lambda r: self._stored_at.get((dkey, r.publisher), 0.0),
            reverse=True,
        )

    def __iter__(self) -> Iterator[tuple[bytes, Record]]:
        self.purge()
        for dkey, records in list(self._data.items()):
            for record in list(records.values()):
                yield dkey, record

    def purge(self) -> int:
        """Drop expired records everywhere; return how many went."""
        now = self.clock()
        dropped = 0
        for dkey in list(self._data):
            dropped += self._purge_key(dkey, now)
        return dropped

    def _purge_key(self, dkey: bytes, now: float) -> int:
        records = self._data.get(dkey)
        if records is None:
            return 0
        dead = [publisher for publisher, record in records.items() if record.expired(now)]
        for publisher in dead:
            del records[publisher]
            self._stored_at.pop((dkey, publisher), None)
        if not records:
            del self._data[dkey]
        return len(dead)
