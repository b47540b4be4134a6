"""Plan records in the DHT: publish this driver's copy, read every driver's, pick the newest.

Every driver that serves a model publishes the plan it uses under ``plan/<model id>``
(one record per publisher), so the plan survives the driver that made it; a record that
does not parse is skipped and counted, never trusted. ``new_epoch`` orders plans: later
than any seen, and unique per driver (the low bits are the driver's), so two drivers
planning in the same millisecond never publish two different plans of one epoch.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import structlog

from protocol.plan import MAX_EPOCH, PlanFormError, PlanRecord, parse_plan_record

__all__ = ["EPOCH_AHEAD_S", "PLAN_PREFIX", "PlanDHT", "epoch_from_future", "new_epoch", "publish_plan", "read_plans",
           "withdraw_plan"]

log = structlog.get_logger("node.pipeline")

PLAN_PREFIX = "plan/"
# How far ahead of this node's clock an epoch may be (the DHT's own clock skew bound): an
# epoch from further ahead would win every race until then (2^62 would win for ever).
EPOCH_AHEAD_S = 60.0


class PlanDHT(Protocol):
    async def put(self, key: str, value: Any, *, ttl: float) -> int: ...
    async def get(self, key: str) -> Any: ...
    async def delete(self, key: str) -> None: ...


def new_epoch(previous: int, node_id: str, *, now_ms: int | None = None) -> int:
    """An epoch above ``previous``: the time in ms, then 10 bits of the driver's id."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    epoch = max(previous + 1, (ms << 10) | (int(node_id[:3] or "0", 16) & 0x3FF))
    return min(epoch, MAX_EPOCH)


def epoch_from_future(epoch: int, *, now: float | None = None) -> bool:
    """Whether ``epoch`` was made more than EPOCH_AHEAD_S after ``now`` (unix time)."""
    now = time.time() if now is None else now
    return (epoch >> 10) > int((now + EPOCH_AHEAD_S) * 1000)


async def publish_plan(dht: PlanDHT, record: PlanRecord, *, ttl: float) -> None:
    await dht.put(PLAN_PREFIX + record.model_id, record.to_dict(), ttl=ttl)


async def withdraw_plan(dht: PlanDHT, model_id: str) -> None:
    await dht.delete(PLAN_PREFIX + model_id)


async def read_plans(dht: PlanDHT, model_id: str) -> list[PlanRecord]:
    """Every valid published plan of ``model_id``, newest epoch first (one per epoch)."""
    records = await dht.get(PLAN_PREFIX + model_id)
    found: dict[int, PlanRecord] = {}
    for publisher, record in records.items():
        try:
            plan = parse_plan_record(record.value, model_id=model_id)
        except PlanFormError as exc:
            log.info("plan_record_skipped", publisher=str(publisher)[:12], model=model_id[:12], why=str(exc))
            continue
        if epoch_from_future(plan.epoch):
            log.info("plan_record_skipped", publisher=str(publisher)[:12], model=model_id[:12],
                     why=f"epoch {plan.epoch} is from more than {EPOCH_AHEAD_S:.0f} s ahead")
            continue
        found.setdefault(plan.epoch, plan)
    return [found[e] for e in sorted(found, reverse=True)]
