"""Bounds on what peers (and strangers) can make this node hold or do: budgets, rates, gates.

Every per-peer table here has a size limit, and every limit is a plain object
the transport or the DHT owns and hands to the parts that need it:

* ``InboundBudget``: bytes all connections together may hold in frames that have
  not been delivered yet. A connection over it stops reading until others drain.
* ``RateLimiter``: token buckets per key (a source address), at most
  ``max_keys`` of them (the least recently used are forgotten).
* ``HandshakeGate``: TLS handshakes in progress, in total and per source IP;
  a socket beyond either limit is closed at once, before it costs a handshake.
* ``FailureSummary``: failed handshakes counted per source and logged as one
  line per source and minute, so a scan cannot fill the log.

Time is an argument (``now``) wherever it matters, so the rules are tested
without sleeping.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["FailureSummary", "HandshakeGate", "InboundBudget", "RateLimiter"]


class InboundBudget:
    """Bytes of undelivered inbound frames, shared by every connection of a transport.

    Over the limit, only the connection holding the oldest unfinished frame keeps
    reading (so something always completes and frees memory); the others pause
    until there is room again.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._held: dict[object, tuple[int, int]] = {}  # holder -> (order it started holding, bytes)
        self._order = 0
        self._waiters: list[Callable[[], None]] = []

    def hold(self, holder: object, nbytes: int) -> None:
        """``holder`` now holds ``nbytes`` (0 releases it)."""
        previous = self._held.pop(holder, None)
        before = previous[1] if previous is not None else 0
        self.used += nbytes - before
        if nbytes:
            if previous is None:
                self._order += 1
                previous = (self._order, 0)
            self._held[holder] = (previous[0], nbytes)
        if nbytes < before and self._waiters and self.used < self.limit:
            self._wake()
        elif previous is not None and not nbytes and self._waiters:
            self._wake()  # the oldest holder may have changed

    def may_read(self, holder: object) -> bool:
        if self.used < self.limit:
            return True
        oldest = min(self._held.items(), key=lambda item: item[1][0], default=None)
        return oldest is not None and oldest[0] is holder

    def when_available(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` once the budget has room again (or the oldest holder changed)."""
        self._waiters.append(wake)

    def forget(self, wake: Callable[[], None]) -> None:
        if wake in self._waiters:
            self._waiters.remove(wake)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()


class RateLimiter:
    """Token buckets per key: ``rate`` per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def allow(self, key: object, now: float, cost: float = 1.0) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class HandshakeGate:
    """Handshakes in progress, at most ``total`` and ``per_source`` from one IP."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._by_source: dict[str, int] = {}
        self._count = 0

    def enter(self, source: str) -> bool:
        if self._count >= self.total or self._by_source.get(source, 0) >= self.per_source:
            return False
        self._count += 1
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return True

    def leave(self, source: str) -> None:
        left = self._by_source.get(source, 0) - 1
        if left <= 0:
            self._by_source.pop(source, None)
        else:
            self._by_source[source] = left
        self._count = max(0, self._count - 1)

    @property
    def pending(self) -> int:
        return self._count


class FailureSummary:
    """Failures per source, reported at most once per ``interval`` per source."""

    def __init__(self, interval: float = 60.0, *, max_sources: int = 1024) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._sources: OrderedDict[str, tuple[int, float, str]] = OrderedDict()

    def record(self, source: str, reason: str, now: float) -> tuple[int, str] | None:
        """Count one failure; returns (failures since the last report, last reason) when
        it is time to report this source, else None."""
        count, reported_at, _ = self._sources.pop(source, (0, now - self.interval, reason))
        count += 1
        if now - reported_at >= self.interval:
            self._sources[source] = (0, now, reason)
            result: tuple[int, str] | None = (count, reason)
        else:
            self._sources[source] = (count, reported_at, reason)
            result = None
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return result
