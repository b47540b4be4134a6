"""The loop-lag record: the median and the longest lag of the last WINDOW_S seconds."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from node.system.looplag import WINDOW_S, LoopLag, watch_loop_lag


def test_median_and_max_over_the_window() -> None:
    lag = LoopLag()
    assert lag.p50_ms(0.0) is None and lag.max_ms(0.0) is None  # before the first sample
    lag.observe(0.0, 0.5)  # a stall long ago
    for i in range(1, 11):
        lag.observe(100.0 + i * 0.05, 0.001 * i)
    now = 100.0 + 0.55
    assert lag.p50_ms(now) == 5.5 and lag.max_ms(now) == 10.0
    assert lag.p50_ms(now + WINDOW_S) is None  # everything has aged out
    lag.observe(now, -0.001)  # a clock that woke early is no lag
    assert lag.max_ms(now) == 10.0 and min(s for _, s in lag._samples) == 0.0


def test_watch_feeds_the_record_and_the_histogram() -> None:
    registry, lag = CollectorRegistry(), LoopLag()

    async def run() -> None:
        task = asyncio.create_task(watch_loop_lag(registry, interval=0.001, lag=lag))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(run())
    p50 = lag.p50_ms(time.monotonic())
    assert p50 is not None and p50 >= 0
    assert (registry.get_sample_value("enjambre_event_loop_lag_seconds_count") or 0) > 0
