"""How much memory each node should lend so that a model splits over exactly n nodes
(the demo, the tests and the benchmarks use it to make small machines look small)."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from node.pipeline.cost import model_cost
from node.pipeline.planner import ModelCost, NodeOffer, PlanError, make_plan

__all__ = ["lend_for_split", "lend_with_spare"]


def _offers(lend: int, nodes: int) -> list[NodeOffer]:
    return [NodeOffer(f"{i:064x}", f"n{i}", lend, 1.0) for i in range(nodes)]


def _stages(cost: ModelCost, offers: list[NodeOffer]) -> int:
    try:
        return len(make_plan(cost, offers).stages)
    except PlanError:
        return 0


def _cost(model_dir: Path, context: int, slots: int, prefill_chunk: int, dtype: str) -> tuple[ModelCost, int]:
    """The planner's cost of the model and what the whole of it needs on one node."""
    from node.engine import load_config

    config: Any = load_config(model_dir)
    with ThreadPoolExecutor(1) as pool:
        cost = asyncio.run(model_cost(pool, config, dtype, context, slots, prefill_chunk))
    return cost, cost.need(0, config.num_layers, True, True)


def _split_lend(cost: ModelCost, whole: int, n: int, largest: bool) -> int:
    step = max(1, whole // 400)
    tries = [*range(whole // (n + 1), whole, step), whole]  # the whole model's need: n == 1's answer
    fits = [lend for lend in tries
            if _stages(cost, _offers(lend, n)) == n and (n == 1 or _stages(cost, _offers(lend, n - 1)) == 0)]
    if fits:
        return fits[-1] if largest else fits[0]
    raise ValueError(f"no memory size splits this model over exactly {n} nodes")


def lend_for_split(model_dir: Path, n: int, *, context: int, slots: int, prefill_chunk: int,
                   dtype: str = "float32", largest: bool = False) -> int:
    """The smallest memory (bytes) with which n equal nodes hold the model and n - 1 do not
    (``largest``: the largest such, leaving each node room for something small beside it)."""
    cost, whole = _cost(model_dir, context, slots, prefill_chunk, dtype)
    return _split_lend(cost, whole, n, largest)


def lend_with_spare(model_dir: Path, n: int, *, context: int, slots: int, prefill_chunk: int,
                    dtype: str = "float32") -> int:
    """Memory (bytes) for n equal nodes of which one is a spare: any n - 1 of them hold
    the model and n - 2 do not, so a plan uses n - 1 nodes and, when one of them dies,
    the others re-plan onto the spare (n == 1: the one node holds the model alone)."""
    cost, whole = _cost(model_dir, context, slots, prefill_chunk, dtype)
    k = max(1, n - 1)
    lend = _split_lend(cost, whole, k, largest=False)
    offers = _offers(lend, n)
    for chosen in itertools.combinations(offers, k):  # the planner's check, not an assumption
        if _stages(cost, list(chosen)) != k:
            names = ", ".join(o.name for o in chosen)
            raise ValueError(f"lending {lend} bytes, nodes {names} do not hold the model over {k} nodes")
    return lend
