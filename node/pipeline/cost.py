"""What serving a layer range of a model costs in memory, for the planner.

The engine's ``memory_needed`` is exact for a given range (it asks XLA for the compiled
steps' temporaries), but each distinct layer count compiles: too slow to call for
every range a planner tries on a 32-layer model. Memory is linear in the layer count
(weights and KV cache per layer; the temporaries of one layer are reused by the next),
so two exact calls per (embedding, head) combination give the line, and a stage's own
load checks the exact figure again before it loads.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

from node.pipeline.planner import ModelCost
from protocol.plan import MAX_MEMORY

__all__ = ["cost_from_lines", "encoder_cost", "model_cost"]


async def model_cost(executor: Executor, config: Any, dtype: str, context: int, slots: int,
                     prefill_chunk: int, *, weights: str = "native", kv_dtype: str | None = None) -> ModelCost:
    from node.engine import PartitionSpec
    from node.engine.memory import (  # JAX: only when a model is planned
        memory_needed,
        resident_bytes,
    )

    layers = config.num_layers
    if getattr(config, "is_encoder", False):
        return encoder_cost(config, dtype, context, slots)

    def exact(n: int, emb: bool, head: bool) -> int:
        return int(memory_needed(config, 0, n, emb, head, dtype, context, slots, prefill_chunk=prefill_chunk,
                                 weights=weights, kv_dtype=kv_dtype))

    def lines() -> dict[tuple[bool, bool], tuple[int, int]]:
        # The slope from a middle range; each end's fixed part from one more call (each
        # call compiles the steps for XLA's memory analysis: about a second on a CPU).
        one = exact(1, False, False)
        per_layer = max(0, exact(2, False, False) - one) if layers >= 2 else 0
        # Never less than what a layer holds (weights and cache): XLA's temporaries for a
        # one-layer step can be larger than for two, which made the slope too flat
        # (SmolLM2, 20 layers: 273 MiB predicted, 289 MiB exact, 285 MiB resident).
        # (A one-layer model has no slope: its single range is the exact figure.)
        if layers >= 2:
            held = resident_bytes(config, PartitionSpec(0, 2, False, False), dtype, context, slots,
                                  prefill_chunk=prefill_chunk, weights=weights, kv_dtype=kv_dtype) - resident_bytes(
                config, PartitionSpec(0, 1, False, False), dtype, context, slots, prefill_chunk=prefill_chunk,
                weights=weights, kv_dtype=kv_dtype)
            per_layer = max(per_layer, held)
        # Layers that differ (Gemma 3's one full-attention layer in six holds the whole
        # context's cache, its sliding ones a ring): plan every layer as the largest, so
        # no range is under-counted; the fixed parts stay those measured on layer 0.
        def holds(i: int) -> int:
            return resident_bytes(config, PartitionSpec(i, i + 1, False, False), dtype, context, slots,
                                  prefill_chunk=prefill_chunk, weights=weights, kv_dtype=kv_dtype)

        # The slope measured on layers 0-1, plus what the largest layer holds beyond layer 0.
        slope = per_layer + max(0, max(holds(i) for i in _distinct_layers(config)) - holds(0))
        out = {(False, False): (one - per_layer, slope)}
        for emb, head in ((True, False), (False, True), (True, True)):
            out[(emb, head)] = (exact(1, emb, head) - per_layer, slope)
        return out

    table = await asyncio.get_running_loop().run_in_executor(executor, lines)
    return cost_from_lines(layers, tuple((e, h, base, per) for (e, h), (base, per) in table.items()))


def encoder_cost(config: Any, dtype: str, context: int, slots: int) -> ModelCost:
    """An encoder (BERT) runs whole on one node: the whole model costs its figure, any
    part of it more than any node has, so the planner never splits it."""
    from node.engine.bert import encoder_memory

    whole = encoder_memory(config, slots, context, dtype)
    lines = ((False, False, MAX_MEMORY, 0), (True, False, MAX_MEMORY, 0), (False, True, MAX_MEMORY, 0),
             (True, True, whole, 0))
    return cost_from_lines(config.num_layers, lines)


def _distinct_layers(config: Any) -> list[int]:
    """One layer of each kind (sliding or full attention, experts or a dense MLP): what a
    layer holds depends on nothing else."""
    first: dict[tuple[bool, bool], int] = {}
    for i in range(config.num_layers):
        first.setdefault((config.is_sliding(i), config.is_sparse(i)), i)
    return sorted(first.values())


def cost_from_lines(num_layers: int, lines: tuple[tuple[bool, bool, int, int], ...]) -> ModelCost:
    """The cost whose need() is ``base + per_layer * layers`` for each (embedding, head) case."""
    table = {(bool(e), bool(h)): (int(base), int(per)) for e, h, base, per in lines}
    if set(table) != {(False, False), (True, False), (False, True), (True, True)}:
        raise ValueError("a cost needs a line for each of the four (embedding, head) cases")

    def need(start: int, end: int, has_embedding: bool, has_head: bool) -> int:
        base, per_layer = table[(has_embedding, has_head)]
        return base + per_layer * (end - start)

    return ModelCost(num_layers, need, tuple(lines))
