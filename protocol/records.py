"""Signed DHT records: encode, sign, verify, merge. Pure: no sockets, no clocks.

A record is one publisher's value under one key. Many publishers may hold a
record under the same key (like hivemind's subkeys); readers merge them, newest
sequence number per publisher winning.

Wire format (msgpack)::

    [2, body, signature]
    body = msgpack([key: str, public_key: 32 bytes, value: any msgpack, seq: int,
                    ttl: float, tombstone: bool, issued_at: float])
    signature = Ed25519(public key, b"enjambre/dht-record/v2\\0" + body)

The signature covers the exact body bytes, so verification never depends on
re-encoding. The publisher id is derived from the public key (hex sha256, the
node id) rather than carried, so a record cannot claim another publisher.

``issued_at`` is the publisher's wall clock when it signed: a record older than
its ttl (plus ``ISSUE_TOLERANCE`` for clocks that differ) is refused, so a copy
captured once cannot be replayed into the DHT later.

Expiry is relative to receipt: clocks on LAN machines differ, so a storer
keeps a record for ``min(ttl, remaining, MAX_TTL)`` seconds of its own clock,
where ``remaining`` is what the forwarding holder had left. Honest holders
therefore never extend a record's life when they pass it on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.ids import node_id_for

__all__ = [
    "ISSUE_TOLERANCE",
    "MAX_KEY_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_TTL",
    "Record",
    "RecordError",
    "decode_record",
    "expiry_for",
    "make_record",
    "merge_records",
    "supersedes",
]

VERSION = 2
DOMAIN = b"enjambre/dht-record/v2\x00"
# How far a record's issue time may lie outside [now - ttl, now]: DHT datagrams
# already need clocks within 60 s of each other.
ISSUE_TOLERANCE = 120.0
# rpcudp refuses requests over 8192 bytes of msgpack; a store request adds
# about 100 bytes of framing around the record (ids, digest, remaining ttl).
MAX_RECORD_BYTES = 7680
MAX_KEY_BYTES = 256
MAX_TTL = 24 * 3600.0
MAX_SEQ = 2**63 - 1
_PUBLIC_KEY_LEN = 32
_SIGNATURE_LEN = 64


class RecordError(ValueError):
    """A record is invalid. ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    key: str
    public_key: bytes
    value: Any
    seq: int
    ttl: float
    tombstone: bool
    issued_at: float
    signature: bytes
    encoded: bytes = field(repr=False, compare=False)
    # Local only, never signed or sent: when this copy expires on the holder's
    # clock (whatever clock the holder passes in as ``now``).
    expires_at: float = field(default=math.inf, compare=False)

    @property
    def publisher(self) -> str:
        return node_id_for(self.public_key)

    def remaining(self, now: float) -> float:
        return self.expires_at - now

    def expired(self, now: float) -> bool:
        return self.expires_at <= now

    def with_expiry(self, expires_at: float) -> Record:
        return Record(
            key=self.key,
            public_key=self.public_key,
            value=self.value,
            seq=self.seq,
            ttl=self.ttl,
            tombstone=self.tombstone,
            issued_at=self.issued_at,
            signature=self.signature,
            encoded=self.encoded,
            expires_at=expires_at,
        )


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise RecordError("bad_key", "record key must be a non-empty string")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise RecordError(
            "bad_key", f"record key is longer than {MAX_KEY_BYTES} bytes: {key[:40]!r}..."
        )


def _check_ttl(ttl: float) -> None:
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not math.isfinite(ttl):
        raise RecordError("bad_ttl", f"record ttl must be a finite number of seconds, got {ttl!r}")
    if not 0 < ttl <= MAX_TTL:
        raise RecordError(
            "bad_ttl",
            f"record ttl must be in (0, {MAX_TTL:g}] seconds, got {ttl:g}; "
            "refresh long-lived records instead of giving them a long ttl",
        )


def make_record(
    key: str,
    value: Any,
    *,
    public_key: bytes,
    sign: Callable[[bytes], bytes],
    seq: int,
    ttl: float,
    issued_at: float,
    tombstone: bool = False,
) -> Record:
    """Build and sign a record (``issued_at``: the publisher's wall clock now).

    Raises RecordError with a clear message if it cannot be sent."""
    _check_key(key)
    _check_ttl(ttl)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise RecordError("bad_seq", f"record seq must be an integer in [0, 2^63), got {seq!r}")
    if len(public_key) != _PUBLIC_KEY_LEN:
        raise RecordError("bad_key", "publisher public key must be 32 raw bytes")
    if tombstone and value is not None:
        raise RecordError("bad_value", "a tombstone record carries no value")
    try:
        body = msgpack.packb(
            [key, public_key, value, seq, float(ttl), tombstone, float(issued_at)], use_bin_type=True
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise RecordError(
            "bad_value",
            f"record value for {key!r} is not msgpack-serialisable ({exc}); use dicts, lists, "
            "str, bytes, int, float, bool and None",
        ) from None
    signature = sign(DOMAIN + body)
    encoded = msgpack.packb([VERSION, body, signature], use_bin_type=True)
    if len(encoded) > MAX_RECORD_BYTES:
        raise RecordError(
            "too_large",
            f"record for {key!r} encodes to {len(encoded)} bytes, over the DHT limit of "
            f"{MAX_RECORD_BYTES} bytes (UDP datagrams); keep DHT values small and serve "
            "large data over TCP, putting only a pointer in the DHT",
        )
    return Record(
        key=key,
        public_key=public_key,
        # What readers will see after decoding (tuples become lists, etc.).
        value=msgpack.unpackb(
            msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False
        ),
        seq=seq,
        ttl=float(ttl),
        tombstone=tombstone,
        issued_at=float(issued_at),
        signature=signature,
        encoded=encoded,
    )


_LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": False,
    "max_bin_len": MAX_RECORD_BYTES,
    "max_str_len": MAX_RECORD_BYTES,
    "max_array_len": MAX_RECORD_BYTES,
    "max_map_len": MAX_RECORD_BYTES,
    "max_ext_len": 0,
}


def decode_record(data: bytes, *, expected_key: str | None = None, now: float | None = None) -> Record:
    """Parse and verify a record. Raises RecordError (with a metric ``reason``) if invalid.

    With ``now`` (wall-clock seconds), a record issued more than its ttl (plus
    ISSUE_TOLERANCE) ago, or that far in the future, is refused as ``stale``.
    """
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise RecordError("too_large", f"record is over {MAX_RECORD_BYTES} bytes")
    try:
        outer = msgpack.unpackb(data, **_LIMITS)
    except Exception:
        raise RecordError("malformed", "record is not valid msgpack") from None
    if (
        not isinstance(outer, list)
        or len(outer) != 3
        or outer[0] != VERSION
        or not isinstance(outer[1], bytes)
        or not isinstance(outer[2], bytes)
    ):
        raise RecordError("malformed", "record must be [version 1, body, signature]")
    _, body, signature = outer
    try:
        fields = msgpack.unpackb(body, **_LIMITS)
    except Exception:
        raise RecordError("malformed", "record body is not valid msgpack") from None
    if not isinstance(fields, list) or len(fields) != 7:
        raise RecordError("malformed", "record body must have 7 fields")
    key, public_key, value, seq, ttl, tombstone, issued_at = fields
    if not isinstance(public_key, bytes) or len(public_key) != _PUBLIC_KEY_LEN:
        raise RecordError("malformed", "record public key must be 32 bytes")
    if len(signature) != _SIGNATURE_LEN:
        raise RecordError("malformed", "record signature must be 64 bytes")
    if not isinstance(tombstone, bool) or (tombstone and value is not None):
        raise RecordError("malformed", "record tombstone flag is invalid")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise RecordError("bad_seq", "record seq is not an integer in [0, 2^63)")
    _check_key(key)
    _check_ttl(ttl)
    if isinstance(issued_at, bool) or not isinstance(issued_at, int | float) or not math.isfinite(issued_at):
        raise RecordError("malformed", "record issue time is not a number")
    if now is not None and not now - ttl - ISSUE_TOLERANCE <= issued_at <= now + ISSUE_TOLERANCE:
        raise RecordError(
            "stale", f"record for {key!r} was issued {now - issued_at:+.0f} s ago with a ttl of {ttl:g} s"
        )
    if expected_key is not None and key != expected_key:
        raise RecordError("wrong_key", f"record is for key {key!r}, not {expected_key!r}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, DOMAIN + body)
    except (InvalidSignature, ValueError):
        raise RecordError(
            "signature", "record signature does not match its publisher key"
        ) from None
    return Record(
        key=key,
        public_key=public_key,
        value=value,
        seq=seq,
        ttl=float(ttl),
        tombstone=tombstone,
        issued_at=float(issued_at),
        signature=signature,
        encoded=data,
    )


def expiry_for(record: Record, *, now: float, remaining: float | None = None) -> float:
    """When a just-received copy of ``record`` expires on the receiver's clock."""
    life = min(record.ttl, MAX_TTL)
    if remaining is not None:
        life = min(life, max(0.0, remaining))
    return now + life


def supersedes(new: Record, old: Record) -> bool:
    """True if ``new`` should replace ``old`` (same publisher). Older seqs never win."""
    if new.seq != old.seq:
        return new.seq > old.seq
    return new.expires_at > old.expires_at and new.encoded == old.encoded


def merge_records(records: Iterable[Record], *, now: float) -> dict[str, Record]:
    """Newest record per publisher; expired ones dropped. Tombstones are kept (they hide
    older records of the same publisher); callers filter them out for display."""
    merged: dict[str, Record] = {}
    for record in records:
        if record.expired(now):
            continue
        current = merged.get(record.publisher)
        if current is None or supersedes(record, current):
            merged[record.publisher] = record
    return merged
