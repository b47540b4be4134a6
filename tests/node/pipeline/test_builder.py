"""Builds are budgeted before any work: memory is reserved against what the node lends across
every model and build at once, and one driver cannot queue unbounded builds."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from node.net.errors import RequestRefused
from node.pipeline import builder as builder_module
from node.pipeline.builder import MAX_BUILDS, MAX_BUILDS_PER_PEER, StageBuilder, shape_of
from protocol.plan import LoadRequest, Plan, PlanRecord, Stage

MiB = 2**20
NODE = "a" * 64


def load(model: str, start: int = 0, memory: int = 1) -> LoadRequest:
    record = PlanRecord(model, "m", 1, Plan((Stage(NODE, start, start + 1, memory), Stage("b" * 64, start + 1, 8,
                                                                                          memory))),
                        "native", "float32", 256, 4, 32)
    return LoadRequest(record, 0, 10.0, 30.0)


def builder(allowed: int = 1024 * MiB) -> StageBuilder:
    return StageBuilder(None, ThreadPoolExecutor(1), memory_allowed=allowed, used=lambda _m: 0)  # type: ignore[arg-type]


async def test_one_driver_cannot_queue_unbounded_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()

    async def slow(self: Any, req: LoadRequest, state: Any, key: Any) -> Any:
        await gate.wait()
        raise RequestRefused("load_failed", "test")

    monkeypatch.setattr(StageBuilder, "_build", slow)
    b = builder()
    tasks = [asyncio.ensure_future(b.build(load("c" * 64, i), lambda _s: None, "mallory"))
             for i in range(MAX_BUILDS_PER_PEER)]
    await asyncio.sleep(0)
    with pytest.raises(RequestRefused) as info:
        await b.build(load("c" * 64, 5), lambda _s: None, "mallory")
    assert info.value.code == "busy"
    # The same shape again joins its build; another driver still gets one, up to the node's bound.
    tasks.append(asyncio.ensure_future(b.build(load("c" * 64, 0), lambda _s: None, "mallory")))
    tasks += [asyncio.ensure_future(b.build(load("d" * 64, i), lambda _s: None, f"user{i}"))
              for i in range(MAX_BUILDS - MAX_BUILDS_PER_PEER)]
    await asyncio.sleep(0)
    with pytest.raises(RequestRefused):
        await b.build(load("e" * 64), lambda _s: None, "another")
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    b.cancel()


async def test_builds_of_different_models_reserve_memory_together() -> None:
    b = builder(1024 * MiB)
    first, second, again = load("c" * 64), load("d" * 64), load("c" * 64, 3)
    for req, peer in ((first, "x"), (second, "y"), (again, "z")):
        b._building[shape_of(req)] = builder_module._Build(asyncio.Future(), peer, req.record.model_id)
    b._reserve(shape_of(first), 700 * MiB, "layers 0-1")
    with pytest.raises(RequestRefused) as info:  # 700 + 600 > 1024: refused before fetching anything
        b._reserve(shape_of(second), 600 * MiB, "layers 0-1")
    assert info.value.code == "out_of_memory" and "reserved" in info.value.message
    b._reserve(shape_of(again), 900 * MiB, "layers 3-4")  # another build of the same model replaces it
    b.cancel()
