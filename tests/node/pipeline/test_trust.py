"""A member's claims about itself count only as far as its machine can back them, and the
operator's cluster.allow / cluster.deny decide who serves at all."""

from __future__ import annotations

from typing import Any

from node.cluster.claims import TFLOPS_PER_CORE, capped, doubtful
from node.pipeline.planner import ModelCost, make_plan
from node.pipeline.trust import may_serve, offers

GiB = 2**30
MODEL = "c" * 64


def member(name: str, *, memory: int = 4 * GiB, total: int = 8 * GiB, tflops: float = 0.1, cpus: int = 4,
           kind: str = "cpu", **extra: Any) -> dict[str, Any]:
    return {"name": name, "state": "ready", "memory_allowed": memory, "memory_total": total, "tflops": tflops,
            "cpu_count": cpus, "device_kind": kind, "device_count": 1, **extra}


def test_claims_are_capped_to_what_the_machine_can_be() -> None:
    assert capped(member("honest")) == (4 * GiB, 0.1) and doubtful(member("honest")) == []
    liar = member("mallory", memory=2**40, total=8 * GiB, tflops=1000.0, cpus=2)
    assert capped(liar) == (8 * GiB, 2 * TFLOPS_PER_CORE)
    assert len(doubtful(liar)) == 2 and "1000 TFLOPS" in doubtful(liar)[1]
    for bad in (float("nan"), float("inf"), -5.0, "fast", True):
        assert capped(member("x", tflops=bad))[1] == 0.0  # type: ignore[arg-type]
    assert capped(member("gpu", kind="gpu", tflops=400.0)) == (4 * GiB, 400.0)


def test_a_liar_no_longer_ranks_first_on_speed() -> None:
    records = {"a" * 64: member("a", tflops=0.4, memory=GiB),
               "e" * 64: member("mallory", tflops=1000.0, cpus=1, memory=GiB)}
    by_name = {o.name: o for o in offers(records, MODEL)}
    assert by_name["mallory"].tflops == TFLOPS_PER_CORE < by_name["a"].tflops
    cost = ModelCost(4, lambda s, e, emb, head: (e - s) * 100 * 2**20)
    plan = make_plan(cost, offers(records, MODEL))
    assert plan.stages[0].node_id == "a" * 64  # the honest, faster node holds the model


def test_the_operator_decides_who_serves() -> None:
    records = {"a" * 64: member("a"), "b" * 64: member("b"), "e" * 64: member("mallory", memory=2**40,
                                                                             total=2**40)}
    assert {o.name for o in offers(records, MODEL, deny=("e" * 64,))} == {"a", "b"}
    assert {o.name for o in offers(records, MODEL, allow=("a", "b" * 64))} == {"a", "b"}
    assert not may_serve("e" * 64, "a", (), ("mallory", "e" * 64))
    assert may_serve("e" * 64, "mallory", (), ())
    cost = ModelCost(4, lambda s, e, emb, head: (e - s) * 3 * GiB // 2)
    plan = make_plan(cost, offers(records, MODEL, deny=("mallory",)))
    assert "e" * 64 not in plan.node_ids() and len(plan.stages) == 2
