"""Plan records in the DHT: newest first, one per epoch, bad ones skipped; epochs unique per
driver and always above the last one seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.pipeline.plans import (
    PLAN_PREFIX,
    epoch_from_future,
    new_epoch,
    publish_plan,
    read_plans,
    withdraw_plan,
)
from protocol.plan import Plan, PlanRecord, Stage

MODEL = "c" * 64
A, B = "a" * 64, "b" * 64


def record(epoch: int, node: str = A) -> PlanRecord:
    return PlanRecord(MODEL, "m", epoch, Plan((Stage(node, 0, 4, 1),)), "native", "float32", 256, 4, 32)


@dataclass
class _Rec:
    value: Any


class _Dht:
    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}

    async def put(self, key: str, value: Any, *, ttl: float) -> int:
        self.values.setdefault(key, {})["me"] = value
        return 1

    async def get(self, key: str) -> dict[str, _Rec]:
        return {p: _Rec(v) for p, v in self.values.get(key, {}).items()}

    async def delete(self, key: str) -> None:
        self.values.get(key, {}).pop("me", None)


def test_new_epoch_is_later_and_unique_per_driver() -> None:
    a, b = new_epoch(0, A, now_ms=1000), new_epoch(0, B, now_ms=1000)
    assert a != b and a >> 10 == b >> 10 == 1000
    assert new_epoch(a + 5, A, now_ms=1000) == a + 6  # a newer one seen: still above it
    assert new_epoch(0, A, now_ms=1001) > a


async def test_read_plans_newest_first_skipping_bad_records() -> None:
    dht = _Dht()
    await publish_plan(dht, record(5), ttl=60)
    dht.values[PLAN_PREFIX + MODEL].update({
        "other": record(9, B).to_dict(),
        "same-epoch": record(9, B).to_dict(),
        "liar": {**record(99).to_dict(), "epoch": 2**64},
        "wrong-model": {**record(50).to_dict(), "model": "d" * 64},
        "junk": "x",
    })
    plans = await read_plans(dht, MODEL)
    assert [p.epoch for p in plans] == [9, 5]
    await withdraw_plan(dht, MODEL)
    assert [p.epoch for p in await read_plans(dht, MODEL)] == [9]


async def test_an_epoch_from_the_future_is_refused_and_never_adopted() -> None:
    now = 1_800_000_000.0
    assert not epoch_from_future(new_epoch(0, A, now_ms=int(now * 1000) + 30_000), now=now)
    assert epoch_from_future(new_epoch(0, A, now_ms=int(now * 1000) + 61_000), now=now)
    assert epoch_from_future((1 << 62) - 1, now=now)
    dht = _Dht()
    dht.values[PLAN_PREFIX + MODEL] = {"insider": record((1 << 62) - 1).to_dict(), "me": record(5).to_dict()}
    assert [r.epoch for r in await read_plans(dht, MODEL)] == [5]
