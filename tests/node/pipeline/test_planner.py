"""The pipeline planner: table-driven cases over small clusters and a linear cost."""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

import pytest

from node.pipeline import planner
from node.pipeline.planner import ModelCost, NodeOffer, Pin, Plan, PlanError, make_plan

GiB = 1024**3
MiB = 1024**2


def linear(layers: int, per_layer: int, emb: int = 0, head: int = 0, fixed: int = 0) -> ModelCost:
    def need(start: int, end: int, has_embedding: bool, has_head: bool) -> int:
        return per_layer * (end - start) + emb * has_embedding + head * has_head + fixed

    return ModelCost(layers, need)


def node(node_id: str, gib: float, tflops: float = 10.0, rtt: dict[str, float] | None = None) -> NodeOffer:
    return NodeOffer(node_id, f"{node_id}-box", int(gib * GiB), tflops, rtt or {})


def check_valid(plan: Plan, cost: ModelCost, nodes: list[NodeOffer]) -> None:
    """Contiguous over [0, num_layers), each stage >= 1 layer, fits, memory = need(...)."""
    lent = {n.node_id: n.memory for n in nodes}
    at = 0
    for s in plan.stages:
        assert s.start == at and s.end > s.start
        assert s.memory == cost.need(s.start, s.end, s.start == 0, s.end == cost.num_layers)
        assert s.memory <= lent[s.node_id]
        at = s.end
    assert at == cost.num_layers
    assert len(set(plan.node_ids())) == len(plan.stages)


def ranges(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.node_id, s.start, s.end) for s in plan.stages]


# (name, cost, nodes, kwargs, expected [(node_id, start, end)])
CASES: list[tuple[str, ModelCost, list[NodeOffer], dict[str, Any], list[tuple[str, int, int]]]] = [
    ("fits on one: fastest that fits",
     linear(32, 100 * MiB), [node("a", 8, 5), node("b", 8, 20), node("c", 16, 10)], {}, [("b", 0, 32)]),
    ("fits on one: fewest nodes beats speed",
     linear(32, 200 * MiB), [node("a", 4, 50), node("b", 4, 40), node("c", 8, 1)], {}, [("c", 0, 32)]),
    ("none fits alone: all three",
     linear(30, 700 * MiB), [node("a", 8), node("b", 8), node("c", 8)], {}, [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]),
    ("proportional: twice the memory, twice the layers",
     linear(30, 700 * MiB), [node("a", 8), node("b", 16)], {}, [("b", 0, 20), ("a", 20, 30)]),
    ("fewest nodes: 4 offered, 2 needed, the 2 fastest",
     linear(24, 512 * MiB), [node("a", 8, 1), node("b", 8, 4), node("c", 8, 3), node("d", 8, 2)], {},
     [("b", 0, 12), ("c", 12, 24)]),
    ("fewest nodes: one slow big node beats three fast ones",
     linear(24, 512 * MiB), [node("big", 64, 1), node("x", 8, 9), node("y", 8, 8), node("z", 8, 7)], {},
     [("big", 0, 24)]),
    ("ties on speed: more memory, then node id",
     linear(8, 100 * MiB), [node("b", 4), node("a", 4), node("c", 8)], {}, [("c", 0, 8)]),
    ("embedding cost moves the first boundary down",
     linear(20, GiB // 2, emb=6 * GiB, head=GiB), [node("a", 10), node("b", 10)], {}, [("a", 0, 8), ("b", 8, 20)]),
    ("head cost moves the last boundary up",
     linear(20, GiB // 2, head=6 * GiB), [node("a", 10), node("b", 10)], {}, [("a", 0, 12), ("b", 12, 20)]),
    ("embedding and head: the two biggest nodes at the ends",
     linear(12, GiB, emb=10 * GiB, head=10 * GiB), [node("m", 6, 9), node("x", 14, 1), node("y", 14, 1)], {},
     [("x", 0, 4), ("m", 4, 8), ("y", 8, 12)]),
    ("a node that cannot hold one layer is skipped",
     linear(10, GiB), [node("tiny", 0.5, 99), node("a", 6), node("b", 6)], {}, [("a", 0, 5), ("b", 5, 10)]),
    ("rtt: the far node is left out",
     linear(24, 512 * MiB), [node("a", 8, 9, {"b": 50, "c": 40}), node("b", 8, 5), node("c", 8, 4, {"b": 1})],
     {"max_rtt_ms": 10}, [("b", 0, 12), ("c", 12, 24)]),
    ("rtt: used when it does not fit without it",
     linear(30, 700 * MiB), [node("a", 8, 9, {"b": 50, "c": 40}), node("b", 8, 5), node("c", 8, 4)],
     {"max_rtt_ms": 10}, [("a", 0, 10), ("c", 10, 20), ("b", 20, 30)]),
    ("rtt: more near nodes beat fewer with a far one",
     linear(30, 700 * MiB), [node("a", 16, 9, {"b": 50, "c": 50}), node("b", 8, 5), node("c", 8, 4), node("d", 8, 3)],
     {"max_rtt_ms": 10}, [("b", 0, 10), ("c", 10, 20), ("d", 20, 30)]),
    ("rtt: of two ends of a slow link, the less preferred is set aside",
     linear(24, 512 * MiB), [node("a", 8, 9, {"b": 50}), node("b", 8, 5), node("c", 8, 4)], {"max_rtt_ms": 10},
     [("a", 0, 12), ("c", 12, 24)]),
    ("rtt: the limit is ignored without max_rtt_ms",
     linear(24, 512 * MiB), [node("a", 8, 9, {"b": 50}), node("b", 8, 5), node("c", 8, 4)], {},
     [("a", 0, 12), ("b", 12, 24)]),
    ("rtt: an unmeasured link is not too slow",
     linear(24, 512 * MiB), [node("a", 8, 9, {"b": 5}), node("b", 8, 5), node("c", 8, 4)], {"max_rtt_ms": 10},
     [("a", 0, 12), ("b", 12, 24)]),
    ("rtt: the chain follows the lowest round trips",
     linear(30, 700 * MiB), [node("a", 8, 9, {"b": 9, "c": 1}), node("b", 8, 5, {"c": 2}), node("c", 8, 4)], {},
     [("a", 0, 10), ("c", 10, 20), ("b", 20, 30)]),
    ("exclude: the fastest failed",
     linear(32, 100 * MiB), [node("a", 8, 30), node("b", 8, 20)], {"exclude": {"a"}}, [("b", 0, 32)]),
    ("pin: a slow node is in the plan",
     linear(24, 512 * MiB), [node("a", 16, 9), node("s", 4, 1)], {"pins": [Pin("s")]}, [("a", 0, 19), ("s", 19, 24)]),
    ("pin: a pinned node that fits alone runs alone",
     linear(8, 100 * MiB), [node("a", 16, 9), node("s", 4, 1)], {"pins": [Pin("s")]}, [("s", 0, 8)]),
    ("pin: fixed range honoured, others fill the rest",
     linear(24, 512 * MiB), [node("a", 16, 9), node("s", 8, 1)], {"pins": [Pin("s", 0, 4)]}, [("s", 0, 4), ("a", 4, 24)]),
    ("pin: a range in the middle leaves two gaps",
     linear(30, 700 * MiB), [node("a", 8, 9), node("b", 8, 8), node("s", 8, 1)], {"pins": [Pin("s", 10, 20)]},
     [("a", 0, 10), ("s", 10, 20), ("b", 20, 30)]),
    ("pin: ranges that cover every layer",
     linear(10, GiB), [node("a", 8, 9), node("b", 8, 1)], {"pins": [Pin("b", 0, 6), Pin("a", 6, 10)]},
     [("b", 0, 6), ("a", 6, 10)]),
]


@pytest.mark.parametrize(("name", "cost", "nodes", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_plans(name: str, cost: ModelCost, nodes: list[NodeOffer], kwargs: dict[str, Any],
               expected: list[tuple[str, int, int]]) -> None:
    plan = make_plan(cost, nodes, **kwargs)
    assert ranges(plan) == expected
    check_valid(plan, cost, nodes)


@pytest.mark.parametrize("seed", range(6))
def test_same_plan_whatever_the_input_order(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"n{i:02d}" for i in range(16)]  # 16 > EXHAUSTIVE_MAX: the greedy search too
    nodes = [NodeOffer(i, i, rng.choice([2, 4, 6]) * GiB, rng.choice([1.0, 2.0]),
                       {j: rng.uniform(0.1, 3) for j in ids if j != i and rng.random() < 0.5}) for i in ids]
    cost = linear(40, 512 * MiB, emb=GiB, head=GiB)
    first = make_plan(cost, nodes, max_rtt_ms=2.5)
    check_valid(first, cost, nodes)
    for _ in range(5):
        rng.shuffle(nodes)
        assert make_plan(cost, nodes, max_rtt_ms=2.5) == first


@pytest.mark.parametrize("count", [5, 12, 13, 32])
def test_many_nodes_need_each_range_once(count: int) -> None:
    calls: list[tuple[int, int]] = []
    base = linear(80, 256 * MiB, emb=GiB, head=GiB, fixed=128 * MiB)

    def need(start: int, end: int, has_embedding: bool, has_head: bool) -> int:
        calls.append((start, end))
        return base.need(start, end, has_embedding, has_head)

    cost = ModelCost(80, need)
    # The fastest nodes lend little, so the search must swap in bigger ones.
    nodes = [node(f"n{i:02d}", 1 if i < count // 4 else 6, tflops=100 - i) for i in range(count)]
    plan = make_plan(cost, nodes)
    check_valid(plan, base, nodes)
    assert len(calls) == len(set(calls))  # cached per range
    assert len(plan.stages) == 4  # 22 GiB: four 6 GiB nodes; the faster 1 GiB ones cannot make it 3


@pytest.mark.parametrize(
    ("cost", "nodes", "kwargs", "fragments"),
    [
        (linear(32, 128 * MiB), [node("a", 1), node("b", 1), node("c", 1)], {},
         ["4 GiB", "3 GiB", "1 GiB missing", "a-box", "b-box", "c-box"]),
        (linear(32, 128 * MiB), [node("a", 1), node("b", 1), node("c", 1)], {"exclude": ["c"]},
         ["needs 4 GiB", "lend 2 GiB", "2 GiB missing", "c-box (excluded)"]),
        (linear(32, 128 * MiB), [node("a", 1, rtt={"b": 30}), node("b", 1)], {"max_rtt_ms": 5},
         ["round trip 30 ms to a-box, over the 5 ms limit, tried last"]),
        (linear(32, 128 * MiB), [node("a", 1), node("t", 0.1)], {},
         ["t-box (lends 102.4 MiB, one layer needs 128 MiB)"]),
        (linear(4, GiB), [node("a", 8)], {"exclude": ["a"]}, ["every node offered is left out", "a-box (excluded)"]),
        (linear(4, GiB), [], {}, ["no nodes"]),
        (linear(0, GiB), [node("a", 8)], {}, ["at least one layer"]),
        (linear(4, GiB), [node("a", 8), node("a", 4)], {}, ["offered twice"]),
        (linear(4, GiB), [node("a", 8)], {"max_rtt_ms": -1}, ["max_rtt_ms"]),
    ],
    ids=["missing", "excluded", "far", "too-small", "all-excluded", "no-nodes", "no-layers", "duplicate", "bad-rtt"],
)
def test_errors(cost: ModelCost, nodes: list[NodeOffer], kwargs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(PlanError) as err:
        make_plan(cost, nodes, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


PIN_NODES = [node("a", 8, 9), node("b", 8, 5), node("s", 2, 1)]


@pytest.mark.parametrize(
    ("pins", "kwargs", "fragment"),
    [
        ([Pin("ghost")], {}, "pinned node ghost is not among the 3 nodes offered"),
        ([Pin("a", 0, 6), Pin("b", 4, 10)], {}, "pins overlap"),
        ([Pin("a", 5, 5)], {}, "0 <= start < end <= 10"),
        ([Pin("a", 0, 11)], {}, "0 <= start < end <= 10"),
        ([Pin("a", -1, 3)], {}, "0 <= start < end <= 10"),
        ([Pin("a", 0)], {}, "0 <= start < end <= 10"),
        ([Pin("s", 0, 5)], {}, "pinned node s-box (s) cannot serve layers [0, 5)"),
        ([Pin("a")], {"exclude": ["a"]}, "both pinned and excluded"),
        ([Pin("a"), Pin("a")], {}, "pinned twice"),
        ([Pin("a", 0, 6), Pin("b", 6, 10), Pin("s")], {}, "leave 0 free layers"),
    ],
)
def test_pin_errors(pins: list[Pin], kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PlanError) as err:
        make_plan(linear(10, GiB), PIN_NODES, pins=pins, **kwargs)
    assert fragment in str(err.value)


def test_pinned_node_too_small_for_a_layer() -> None:
    with pytest.raises(PlanError, match="pinned node s-box"):
        make_plan(linear(10, 3 * GiB), PIN_NODES, pins=[Pin("s")])


def test_round_trip() -> None:
    plan = make_plan(linear(30, 700 * MiB), [node("a", 8), node("b", 8), node("c", 8)])
    data = plan.to_dict()
    assert data["stages"][0] == {"node_id": "a", "start": 0, "end": 10, "memory": plan.stages[0].memory}
    assert Plan.from_dict(data) == plan
    assert plan.node_ids() == ["a", "b", "c"]


def test_pure_module() -> None:
    tree = ast.parse(Path(planner.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in {"asyncio", "socket", "jax"} or m.startswith("node.engine")}
