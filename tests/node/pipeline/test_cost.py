"""The planner's memory line: exact at one layer, never flatter than a layer's weights and cache."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.engine import PartitionSpec, load_config
from node.engine.memory import memory_needed
from node.pipeline.cost import model_cost
from node.testing.tinymodel import make_tiny_model


@pytest.mark.parametrize("layers", [1, 3])
def test_cost_line_of_small_models(tmp_path: Path, layers: int) -> None:
    cfg = load_config(make_tiny_model(tmp_path / "m", layers=layers, hidden=32, intermediate=64, vocab_size=288))
    with ThreadPoolExecutor(1) as pool:
        cost = asyncio.run(model_cost(pool, cfg, "float32", 64, 1, 16))
    whole = PartitionSpec.whole(cfg)
    exact = int(memory_needed(cfg, 0, layers, True, True, "float32", 64, 1, prefill_chunk=16))
    predicted = cost.need(0, layers, whole.has_embedding, whole.has_head)
    assert predicted == exact if layers == 1 else predicted >= exact * 0.9


def test_mixed_layers_are_planned_as_the_largest() -> None:
    """Gemma 3's layout: a full-attention layer caches the whole context, a sliding one a
    ring. Every range the planner might choose is counted at least at its exact need."""
    from node.engine import parse_config

    raw = {
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "vocab_size": 288, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "sliding_window": 16,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    }
    cfg = parse_config(raw)
    context, chunk = 2048, 16
    with ThreadPoolExecutor(1) as pool:
        cost = asyncio.run(model_cost(pool, cfg, "float32", context, 2, chunk))
    for start, end in ((5, 6), (0, 6)):  # the full layer alone, and every layer
        emb, head = start == 0, end == 6
        exact = int(memory_needed(cfg, start, end, emb, head, "float32", context, 2, prefill_chunk=chunk))
        assert cost.need(start, end, emb, head) >= exact, (start, end)
