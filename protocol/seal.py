"""Sealed datagrams: AEAD seal/open with a timestamp, a replay window, signed envelopes.

Pure (no sockets, no clocks): every function that needs the time takes ``now``.

Wire format of a sealed datagram::

    b"E1" | nonce (12 bytes) | ChaCha20-Poly1305(key, nonce, ts_ms (8 bytes BE) | payload,
                                                  aad=b"E1" + receiver)

``receiver`` binds a datagram to the one it was sent to (the DHT uses the
receiver's ``ip:port``), so one captured on its way to A is refused by B.

Only holders of the cluster secret can build or read one. A datagram whose
timestamp is further than ``max_skew`` from the receiver's clock is stale; a
nonce seen before inside the window is a replay. Both are refused with a
:class:`SealError` whose ``reason`` names the cause (used as a metric label).

A signed envelope binds a payload to an Ed25519 public key, so a cluster member
cannot speak for another member's DHT id::

    msgpack([public_key (32 bytes), signature (64 bytes), payload])
    signature = Ed25519(domain | ts_ms | payload)
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "DEFAULT_MAX_SKEW",
    "SEAL_OVERHEAD",
    "Drop",
    "Envelope",
    "ReplayGuard",
    "SealError",
    "Unsealed",
    "open_envelope",
    "open_sealed",
    "seal",
    "sign_envelope",
]

MAGIC = b"E1"
NONCE_LEN = 12
TAG_LEN = 16
_TS = struct.Struct(">q")
SEAL_OVERHEAD = len(MAGIC) + NONCE_LEN + TAG_LEN + _TS.size
DEFAULT_MAX_SKEW = 60.0
KEY_LEN = 32
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
ENVELOPE_OVERHEAD = PUBLIC_KEY_LEN + SIGNATURE_LEN + 8


class SealError(ValueError):
    """A datagram could not be opened. ``reason`` is a short metric label.

    For ``stale`` datagrams ``timestamp`` is the sender's (authentic) clock, which
    lets the receiver estimate how far apart the clocks are."""

    def __init__(self, reason: str, message: str, timestamp: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.timestamp = timestamp


@dataclass(frozen=True, slots=True)
class Drop:
    """A sealed datagram (DHT or beacon) that must be ignored; ``reason`` is a metric label."""

    reason: str
    detail: str = ""
    sent_at: float | None = None  # the sender's clock, when authentic (a stale datagram)


@dataclass(frozen=True, slots=True)
class Unsealed:
    nonce: bytes
    timestamp: float
    payload: bytes


def _check_key(key: bytes) -> None:
    if len(key) != KEY_LEN:
        raise ValueError(f"seal key must be {KEY_LEN} bytes, got {len(key)}")


def seal(
    key: bytes, payload: bytes, *, now: float, nonce: bytes | None = None, receiver: bytes = b""
) -> bytes:
    """Encrypt and authenticate ``payload`` stamped with ``now`` (seconds since the epoch)."""
    _check_key(key)
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    plaintext = _TS.pack(round(now * 1000)) + payload
    return MAGIC + nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, MAGIC + receiver)


def open_sealed(
    key: bytes, datagram: bytes, *, now: float, max_skew: float = DEFAULT_MAX_SKEW, receiver: bytes = b""
) -> Unsealed:
    """Open a sealed datagram, checking its tag and timestamp (not replays: see ReplayGuard)."""
    _check_key(key)
    if len(datagram) < SEAL_OVERHEAD or not datagram.startswith(MAGIC):
        raise SealError("garbage", "not a sealed enjambre datagram")
    nonce = datagram[len(MAGIC) : len(MAGIC) + NONCE_LEN]
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(
            nonce, datagram[len(MAGIC) + NONCE_LEN :], MAGIC + receiver
        )
    except InvalidTag:
        raise SealError(
            "bad_seal", "datagram seal did not verify (different cluster secret or tampered)"
        ) from None
    (ts_ms,) = _TS.unpack_from(plaintext)
    timestamp = ts_ms / 1000.0
    if abs(timestamp - now) > max_skew:
        raise SealError(
            "stale",
            f"datagram timestamp is {timestamp - now:+.1f}s from local time (limit ±{max_skew:g}s); "
            "check that the machines' clocks are synchronised (NTP)",
            timestamp,
        )
    return Unsealed(nonce=nonce, timestamp=timestamp, payload=plaintext[_TS.size :])


class ReplayGuard:
    """Remembers nonces seen within the skew window so a captured datagram is accepted once.

    Datagrams older than the window are already refused as stale, so a nonce
    only needs remembering for ``2 * max_skew`` seconds. ``max_entries`` bounds
    memory under a flood: once full, the oldest nonces are forgotten (a replay
    of those would then need to arrive before they go stale; only holders of
    the secret can produce the flood in the first place).
    """

    def __init__(self, max_skew: float = DEFAULT_MAX_SKEW, max_entries: int = 200_000) -> None:
        self.max_skew = max_skew
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, nonce: bytes, *, now: float) -> bool:
        """Record ``nonce``; False if it was already seen inside the window."""
        horizon = now - 2 * self.max_skew
        while self._seen:
            oldest_nonce, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest_nonce]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


@dataclass(frozen=True, slots=True)
class Envelope:
    public_key: bytes
    payload: bytes


def _envelope_message(domain: bytes, timestamp: float, payload: bytes) -> bytes:
    return domain + b"\x00" + _TS.pack(round(timestamp * 1000)) + payload


def sign_envelope(
    public_key: bytes,
    sign: Callable[[bytes], bytes],
    payload: bytes,
    *,
    domain: bytes,
    timestamp: float,
) -> bytes:
    """Wrap ``payload`` with the sender's public key and a signature over it and the timestamp.

    ``timestamp`` must be the same ``now`` passed to :func:`seal`, so a member
    cannot re-seal another member's envelope later with a fresh timestamp.
    """
    signature = sign(_envelope_message(domain, timestamp, payload))
    return msgpack.packb([public_key, signature, payload], use_bin_type=True)


def open_envelope(data: bytes, *, domain: bytes, timestamp: float) -> Envelope:
    """Check a signed envelope; raise SealError("signature") if it is malformed or forged."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            max_array_len=3,
            max_map_len=0,
            max_str_len=0,
            max_ext_len=0,
        )
    except Exception:
        raise SealError("malformed", "signed envelope is not valid msgpack") from None
    if (
        not isinstance(obj, list)
        or len(obj) != 3
        or not all(isinstance(part, bytes) for part in obj)
    ):
        raise SealError("malformed", "signed envelope must be [public key, signature, payload]")
    public_key, signature, payload = obj
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        raise SealError("malformed", "signed envelope has a bad key or signature length")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, _envelope_message(domain, timestamp, payload)
        )
    except (InvalidSignature, ValueError):
        raise SealError("signature", "datagram signature does not match its public key") from None
    return Envelope(public_key=public_key, payload=payload)
