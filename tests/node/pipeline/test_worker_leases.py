"""A stage whose load outlasts the lease it was asked with stays loaded when it becomes ready:
the lease runs from the moment the stage can serve, not from when the load began (a 52 s
compile on a busy machine used to unload the stage the instant it was ready, and the driver
loaded it again)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from node.pipeline import worker as worker_module
from node.pipeline.builder import Built, StageBuilder
from node.pipeline.worker import StageWorker
from protocol.plan import LoadRequest, Plan, PlanRecord, Stage

NODE, DRIVER = "a" * 64, "d" * 64
LEASE_TTL = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    def __init__(self) -> None:
        self.sessions: dict[str, Any] = {}
        self.owner_cap: Any = None

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_slow_load_keeps_its_lease_when_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()

    async def slow_build(self: Any, req: LoadRequest, state: Any, peer: str = "") -> Built:
        clock.now += 52.0  # the compile took longer than the lease
        return Built(FakeRunner(), 1, 1.0, 51.0)  # type: ignore[arg-type]

    monkeypatch.setattr(StageBuilder, "build", slow_build)
    monkeypatch.setattr(worker_module, "epoch_from_future", lambda _e: False)
    w = StageWorker(NODE, SimpleNamespace(), SimpleNamespace(local={}), memory_allowed=2**30,  # type: ignore[arg-type]
                    step_timeout=10.0, clock=clock)
    record = PlanRecord("c" * 64, "m", 1, Plan((Stage(NODE, 0, 4, 1),)), "native", "float32", 256, 4, 32)
    await w.load(DRIVER, LoadRequest(record, 0, 10.0, LEASE_TTL).to_dict())
    loaded = w.stages["c" * 64]
    assert loaded.state == "ready"
    assert loaded.live_leases(clock.now) == 1  # not expired on arrival
    clock.now += LEASE_TTL - 1
    assert loaded.live_leases(clock.now) == 1  # a whole lease from when it became ready
    clock.now += 2
    assert loaded.live_leases(clock.now) == 0  # and no longer, unless renewed
    w.executor.shutdown(wait=False)
    await asyncio.sleep(0)
