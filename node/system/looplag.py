"""How late the daemon's event loop runs: how long a short sleep overslept.

A stalled loop is the symptom every overload shares (a decode that takes too long,
a handler that blocks, a flood): nothing else answers while it lasts. The monitor
sleeps ``interval`` seconds again and again and records how much later than asked
it woke up, as ``enjambre_event_loop_lag_seconds`` in ``/metrics`` and in a
``LoopLag`` that keeps the last ``WINDOW_S`` seconds, which the daemon publishes in its
member record (``loop_lag_ms``): a busy node says so, apart from its round trips.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["LAG_BUCKETS", "WINDOW_S", "LoopLag", "watch_loop_lag"]

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WINDOW_S = 10.0
_MAX_SAMPLES = 1024  # 10 s at one sample per 50 ms is 200; the bound is for a tiny interval


class LoopLag:
    """The loop's lag over the last ``window`` seconds; ``now`` is ``time.monotonic()``, passed in."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque(maxlen=_MAX_SAMPLES)

    def observe(self, now: float, lag_s: float) -> None:
        self._samples.append((now, max(0.0, lag_s)))
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()

    def _recent(self, now: float) -> list[float]:
        return [lag for at, lag in self._samples if at >= now - self.window]

    def p50_ms(self, now: float) -> float | None:
        """The median lag of the window in ms (None before the first sample)."""
        recent = self._recent(now)
        return round(statistics.median(recent) * 1000, 1) if recent else None

    def max_ms(self, now: float) -> float | None:
        """The longest lag of the window in ms (None before the first sample)."""
        recent = self._recent(now)
        return round(max(recent) * 1000, 1) if recent else None


async def watch_loop_lag(registry: CollectorRegistry, interval: float = 0.05, lag: LoopLag | None = None) -> None:
    """Run until cancelled, observing the loop's lag every ``interval`` seconds."""
    histogram = Histogram(
        "enjambre_event_loop_lag_seconds", "How much later than asked the event loop woke from a short sleep",
        buckets=LAG_BUCKETS, registry=registry,
    )
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        late = max(0.0, loop.time() - start - interval)
        histogram.observe(late)
        if lag is not None:
            lag.observe(time.monotonic(), late)
