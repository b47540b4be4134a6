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
