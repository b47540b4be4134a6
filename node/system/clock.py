"""How far the peers' clocks are from this node's, from the authentic timestamps they send.

Every sealed datagram (DHT and beacon) carries its sender's wall clock inside the
AEAD, so even a datagram dropped as stale tells the truth about its sender's
clock. ``ClockOffsets`` keeps the latest offset per peer (bounded) and answers
with the median over the peers heard from recently: when most peers agree that
this node is 75 s off, it is this node's clock that is wrong, and this node can
say so in its own log and in ``nodectl status`` (beyond ±60 s every DHT datagram
is dropped both ways, so the others would only see silence).
"""

from __future__ import annotations

import statistics
from collections import OrderedDict

__all__ = ["ClockOffsets"]


class ClockOffsets:
    def __init__(self, *, max_peers: int = 256, window: float = 600.0) -> None:
        self.max_peers = max_peers
        self.window = window
        self._peers: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def observe(self, peer: str, sent_at: float, now: float) -> None:
        """A datagram from ``peer`` stamped ``sent_at`` (its clock) arrived at ``now`` (ours)."""
        self._peers.pop(peer, None)
        self._peers[peer] = (sent_at - now, now)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)

    def offset(self, now: float) -> float | None:
        """Median of (peer clock - our clock) over peers heard within ``window``; None if none."""
        recent = [offset for offset, seen in self._peers.values() if now - seen <= self.window]
        return statistics.median(recent) if recent else None

    def peers(self, now: float) -> int:
        return sum(1 for _, seen in self._peers.values() if now - seen <= self.window)
