"""Memory accounting for the planner: bytes a partition needs (weights + KV cache).

Mirrors exactly what weights.load_params and cache.new_cache allocate, including the
tied-head rule (a tail-only partition of a tied model holds the embedding as its head).
"""

from __future__ import annotations

import jax.numpy as jnp

from node.engine.cache import cache_nbytes
from node.engine.config import ModelConfig
from node.engine.weights import PartitionSpec, head_shares_embedding


def partition_param_count(config: ModelConfig, spec: PartitionSpec) -> int:
    """Number of parameters a partition holds, in the engine's layout."""
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size
    per_layer = 2 * H + H * (Q + 2 * KV) + Q * H + 3 * H * F
    if config.qkv_bias:
        per_layer += Q + 2 * KV
    if config.o_bias:
        per_layer += H
    count = (spec.end - spec.start) * per_layer
    if spec.has_embedding:
        count += V * H
    if spec.has_head:
        count += H
        if not head_shares_embedding(config, spec):
            count += V * H
    return count


def memory_needed(
    config: ModelConfig,
    start: int,
    end: int,
    has_embedding: bool,
    has_head: bool,
    dtype: str,
    context: int,
    batch: int,
) -> int:
    """Bytes for a partition's weights in `dtype` plus a KV cache of `batch` sessions
    of `context` tokens each (the cache is allocated in the compute dtype)."""
    spec = PartitionSpec(start, end, has_embedding, has_head)
    spec.validate(config)
    itemsize = jnp.dtype(dtype).itemsize
    weights = partition_param_count(config, spec) * itemsize
    return weights + cache_nbytes(config, end - start, batch, context, itemsize)
