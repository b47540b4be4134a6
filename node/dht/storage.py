"""Record storage for the DHT: one record per (key, publisher), bounded in bytes, with quotas.

Replaces kademlia's ForgetfulStorage (one opaque value per key, kept a week).
Only verified records go in (the caller decodes them); an older sequence number
never replaces a newer one; expired records are purged on every access. Time
comes from the injected ``clock`` so tests need not sleep.

What one member with the secret (who can mint any number of keys) could fill is
bounded: the store holds at most ``max_bytes``; one publisher key at most
``max_bytes_per_publisher``; one source address (the peer that handed the records
over, this node itself excluded) at most ``max_bytes_per_source``; one key at most
``max_publishers_per_key`` publishers. When a key is full, a record from a
*trusted* publisher (a contact this node has verified, or this node itself) takes
the place of the most recently first-seen untrusted one, so fake publishers
cannot lock a real node out of its directory shard. Answers list records by when
they were first seen, oldest first, so re-storing spam never pushes long-standing
records out of a truncated answer.
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
    # "stored", "replaced", "refreshed", "older_seq", "duplicate", "expired", "full",
    # "over_budget", "publisher_quota", "source_quota"
    reason: str


@dataclass(slots=True)
class _Entry:
    record: Record
    first_seen: float
    source: str | None
    trusted: bool

    @property
    def size(self) -> int:
        return len(self.record.encoded)


class RecordStore:
    """dkey (20-byte Kademlia digest) -> publisher id -> newest record."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_publishers_per_key: int = 1024,
        max_keys: int = 65536,
        max_bytes: int = 64 * 2**20,
        max_bytes_per_publisher: int = 256 * 1024,
        max_bytes_per_source: int = 4 * 2**20,
    ) -> None:
        self.clock = clock
        self.max_publishers_per_key = max_publishers_per_key
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.max_bytes_per_publisher = max_bytes_per_publisher
        self.max_bytes_per_source = max_bytes_per_source
        self._data: dict[bytes, dict[str, _Entry]] = {}
        self._bytes = 0
        self._by_publisher: dict[str, int] = {}
        self._by_source: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(records) for records in self._data.values())

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def put(
        self,
        dkey: bytes,
        record: Record,
        *,
        remaining: float | None = None,
        source: str | None = None,
        trusted: bool = True,
    ) -> StoreOutcome:
        """Store a verified record. ``remaining`` caps its life (what the sender had left);
        ``source`` is the address that handed it over (None: this node's own)."""
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
            if record.seq < current.record.seq:
                return StoreOutcome(False, "older_seq")
            if not supersedes(stamped, current.record):
                return StoreOutcome(False, "duplicate")
            outcome = "refreshed" if record.seq == current.record.seq else "replaced"
        else:
            if len(records) >= self.max_publishers_per_key and not self._evict_untrusted(dkey, trusted):
                return StoreOutcome(False, "full")
            outcome = "stored"
        grow = len(record.encoded) - (current.size if current is not None else 0)
        refused = self._over_quota(publisher, source, grow)
        if refused is not None:
            if not records:
                self._data.pop(dkey, None)
            return StoreOutcome(False, refused)
        records = self._data.setdefault(dkey, records)  # a purge above may have dropped the key
        if current is not None:
            self._account(current, -1)
        entry = _Entry(
            stamped, current.first_seen if current is not None else now, source,
            trusted or (current is not None and current.trusted),
        )
        records[publisher] = entry
        self._account(entry, +1)
        return StoreOutcome(True, outcome)

    def get(self, dkey: bytes) -> list[Record]:
        """Unexpired records under ``dkey``, oldest first seen first."""
        self._purge_key(dkey, self.clock())
        entries = sorted(self._data.get(dkey, {}).values(), key=lambda e: e.first_seen)
        return [e.record for e in entries]

    def __iter__(self) -> Iterator[tuple[bytes, Record]]:
        self.purge()
        for dkey, records in list(self._data.items()):
            for entry in list(records.values()):
                yield dkey, entry.record

    def purge(self) -> int:
        """Drop expired records everywhere; return how many went."""
        now = self.clock()
        dropped = 0
        for dkey in list(self._data):
            dropped += self._purge_key(dkey, now)
        return dropped

    # ------------------------------------------------------------------ bookkeeping

    def _over_quota(self, publisher: str, source: str | None, grow: int) -> str | None:
        if grow <= 0:
            return None
        if self._bytes + grow > self.max_bytes:
            self.purge()
            if self._bytes + grow > self.max_bytes:
                return "over_budget"
        if self._by_publisher.get(publisher, 0) + grow > self.max_bytes_per_publisher:
            return "publisher_quota"
        if source is not None and self._by_source.get(source, 0) + grow > self.max_bytes_per_source:
            return "source_quota"
        return None

    def _account(self, entry: _Entry, sign: int) -> None:
        size = sign * entry.size
        self._bytes += size
        publisher = entry.record.publisher
        self._by_publisher[publisher] = self._by_publisher.get(publisher, 0) + size
        if self._by_publisher[publisher] <= 0:
            del self._by_publisher[publisher]
        if entry.source is not None:
            self._by_source[entry.source] = self._by_source.get(entry.source, 0) + size
            if self._by_source[entry.source] <= 0:
                del self._by_source[entry.source]

    def _evict_untrusted(self, dkey: bytes, trusted: bool) -> bool:
        """Make room under a full key for a trusted record; True if there is room now."""
        if not trusted:
            return False
        records = self._data[dkey]
        untrusted = [(e.first_seen, p) for p, e in records.items() if not e.trusted]
        if not untrusted:
            return False
        _, victim = max(untrusted)
        self._account(records.pop(victim), -1)
        return True

    def _purge_key(self, dkey: bytes, now: float) -> int:
        records = self._data.get(dkey)
        if records is None:
            return 0
        dead = [publisher for publisher, entry in records.items() if entry.record.expired(now)]
        for publisher in dead:
            self._account(records.pop(publisher), -1)
        if not records:
            del self._data[dkey]
        return len(dead)
