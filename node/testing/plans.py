"""How much memory each node should lend so that a model splits over exactly n nodes
(the demo, the tests and the benchmarks use it to make small machines look small)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from node.pipeline.cost import model_cost
from node.pipeline.planner import ModelCost, NodeOffer, PlanError, make_plan

__all__ = ["lend_for_split"]


def _stages(cost: ModelCost, lend: int, nodes: int) -> int:
    offers = [NodeOffer(f"{i:064x}", f"n{i}", lend, 1.0) for i in range(nodes)]
    try:
        return len(make_plan(cost, offers).stages)
    except PlanError:
        return 0


def lend_for_split(model_dir: Path, n: int, *, context: int, slots: int, prefill_chunk: int,
                   dtype: str = "float32", largest: bool = False) -> int:
    """The smallest memory (bytes) with which n equal nodes hold the model and n - 1 do not
    (``largest``: the largest such, leaving each node room for something small beside it)."""
    from node.engine import load_config

    config: Any = load_config(model_dir)
    with ThreadPoolExecutor(1) as pool:
        cost = asyncio.run(model_cost(pool, config, dtype, context, slots, prefill_chunk))
    whole = cost.need(0, config.num_layers, True, True)
    step = max(1, whole // 400)
    fits = [lend for lend in range(whole // (n + 1), whole + 1, step)
            if _stages(cost, lend, n) == n and (n == 1 or _stages(cost, lend, n - 1) == 0)]
    if fits:
        return fits[-1] if largest else fits[0]
    raise ValueError(f"no memory size splits this model over exactly {n} nodes")
