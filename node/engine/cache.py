"""The KV cache: static-shape key/value arrays for one partition's layers.

A cache holds `slots` independent sessions ("slot pool"): per layer, keys and values are
[slots, max_context, kv_heads, head_dim]. A session owns one slot; prefill writes one slot,
and one batched decode step advances every active slot at its own position. B=1 is simply
a one-slot cache. Arrays are donated to the jitted steps, so they are updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from node.engine.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Per-layer key and value arrays, each [slots, max_context, kv_heads, head_dim]."""

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def slots(self) -> int:
        return int(self.k[0].shape[0]) if self.k else 0

    @property
    def max_context(self) -> int:
        return int(self.k[0].shape[1]) if self.k else 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self.k, *self.v))


def new_cache(
    config: ModelConfig, num_layers: int, slots: int, max_context: int, dtype: str
) -> KVCache:
    """Zeroed cache for `num_layers` layers and `slots` sessions."""
    shape = (slots, max_context, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
    )


def cache_nbytes(
    config: ModelConfig, num_layers: int, slots: int, max_context: int, itemsize: int
) -> int:
    return 2 * num_layers * slots * max_context * config.kv_size * itemsize
