"""How late the daemon's event loop runs: a histogram of how long a short sleep overslept.

A stalled loop is the symptom every overload shares (a decode that takes too long,
a handler that blocks, a flood): nothing else answers while it lasts. The monitor
sleeps ``interval`` seconds again and again and records how much later than asked
it woke up, as ``enjambre_event_loop_lag_seconds`` in ``/metrics``.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["LAG_BUCKETS", "watch_loop_lag"]

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


async def watch_loop_lag(registry: CollectorRegistry, interval: float = 0.05) -> None:
    """Run until cancelled, observing the loop's lag every ``interval`` seconds."""
    histogram = Histogram(
        "enjambre_event_loop_lag_seconds", "How much later than asked the event loop woke from a short sleep",
        buckets=LAG_BUCKETS, registry=registry,
    )
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - start - interval))
