"""What the DHT remembers about senders so that one member with the secret cannot flood it.

A request names its sender's id and, through the datagram's source, an address;
both can be invented (a member can mint keys, and a LAN source address can be
spoofed). So a sender becomes a routing-table contact only after it answers our
own ping at the address it claims, and until then it gets short answers: at most
``AMPLIFICATION`` times the bytes it sent, counting our verification ping. For a
lookup that needs the full answer, a short answer hands out a ``cookie`` (a MAC of
the sender's address and id that only a real receiver at that address learns);
asking again with it gets everything at once.

The guard keeps, each bounded: the verifications in flight, the addresses that
failed one recently (not pinged again for a minute), the contacts welcomed
recently (records are pushed to a new contact once, not every time it is evicted
and found again), the welcome stores in flight, and a datagram rate per source.
Time is an argument, so the rules are tested without sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict

from node.net.limits import RateLimiter
from protocol.dht import COOKIE_LEN

__all__ = ["AMPLIFICATION", "SenderGuard"]

# Bytes sent to an unverified sender per byte it sent (the verification ping included).
AMPLIFICATION = 4
# The size of our verification ping and the framing around any answer (measured:
# a ping is 193 bytes, sealing and signing add 142 to every body).
VERIFY_PING_BYTES = 200
DATAGRAM_OVERHEAD = 150
# The answer's own framing around the list it carries (message id, map keys, cookie).
BODY_MARGIN = 80


class SenderGuard:
    def __init__(
        self,
        *,
        max_verifying: int = 256,
        max_remembered: int = 4096,
        welcome_every: float = 600.0,
        retry_verify_after: float = 60.0,
        max_welcome_stores: int = 32,
        records_per_welcome: int = 64,
        datagrams_per_second: float = 200.0,
    ) -> None:
        self.max_verifying = max_verifying
        self.max_remembered = max_remembered
        self.welcome_every = welcome_every
        self.retry_verify_after = retry_verify_after
        self.max_welcome_stores = max_welcome_stores
        self.records_per_welcome = records_per_welcome
        self._verifying: set[tuple[str, int]] = set()
        self._failed: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._welcomed: OrderedDict[bytes, float] = OrderedDict()
        self.welcome_stores = 0
        self._rate = RateLimiter(datagrams_per_second, 2 * datagrams_per_second, max_keys=max_remembered)
        self._cookie_key = os.urandom(32)

    # ------------------------------------------------------------------ datagrams

    def allow_datagram(self, address: tuple[str, int], now: float) -> bool:
        return self._rate.allow(address, now)

    def reply_budget(self, request_bytes: int, *, verifying: bool) -> int:
        """Body bytes an answer to an unverified sender may take."""
        budget = AMPLIFICATION * request_bytes - DATAGRAM_OVERHEAD - BODY_MARGIN
        return budget - VERIFY_PING_BYTES if verifying else budget

    # ------------------------------------------------------------------ verification

    def start_verify(self, address: tuple[str, int], now: float) -> bool:
        """True if a verification ping to ``address`` should go out now."""
        if address in self._verifying or len(self._verifying) >= self.max_verifying:
            return False
        failed_at = self._failed.get(address)
        if failed_at is not None and now - failed_at < self.retry_verify_after:
            return False
        self._verifying.add(address)
        return True

    def verified(self, address: tuple[str, int], ok: bool, now: float) -> None:
        self._verifying.discard(address)
        if ok:
            self._failed.pop(address, None)
            return
        self._failed.pop(address, None)
        self._failed[address] = now
        while len(self._failed) > self.max_remembered:
            self._failed.popitem(last=False)

    # ------------------------------------------------------------------ welcomes

    def should_welcome(self, node_id: bytes, now: float) -> bool:
        """True if records should be pushed to this new contact (not done recently)."""
        last = self._welcomed.pop(node_id, None)
        fresh = last is None or now - last >= self.welcome_every
        self._welcomed[node_id] = now if fresh or last is None else last  # keep the first time
        while len(self._welcomed) > self.max_remembered:
            self._welcomed.popitem(last=False)
        return fresh

    # ------------------------------------------------------------------ cookies

    def cookie(self, address: tuple[str, int], sender_id: bytes, now: float) -> bytes:
        return self._mac(address, sender_id, int(now // 60))

    def cookie_ok(self, cookie: bytes | None, address: tuple[str, int], sender_id: bytes, now: float) -> bool:
        if cookie is None:
            return False
        epoch = int(now // 60)
        # A cookie from the previous minute still counts, so one minted at :59 works.
        return any(hmac.compare_digest(cookie, self._mac(address, sender_id, e)) for e in (epoch, epoch - 1))

    def _mac(self, address: tuple[str, int], sender_id: bytes, epoch: int) -> bytes:
        message = f"{address[0]}|{address[1]}|{epoch}|".encode() + sender_id
        return hmac.new(self._cookie_key, message, hashlib.sha256).digest()[:COOKIE_LEN]
