"""The KV cache: head-major key/value arrays for one partition's layers, and their geometry.

A cache holds `slots` independent sessions ("slot pool"): per layer, keys and values are
[slots, kv_heads, length, head_dim]. Head-major because attention contracts over
head_dim for each (slot, head) pair: with this layout XLA reads the cache as it lies,
where the earlier [slots, length, heads, dim] layout made every compiled decode step copy
each layer's whole cache transposed. Arrays are donated to the jitted steps, so writes
happen in place.

`CacheGeometry` is the static part: how many positions a slot stores (`length`), the key
block attention walks in (`block`), and whether positions wrap (`ring`): a sliding-window
model whose window plus one prefill chunk is shorter than the context keeps only that
many positions, position p at row p % length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from node.engine.buckets import pow2_bucket
from node.engine.config import ModelConfig

# Keys per attention block (see attention.py), by platform; a power of two. Measured on
# this 2-core CPU (Qwen2.5-0.5B shape, ms per decode step, block 64 / 128 / 256 / 512):
# batch 1 at 128 tokens 77 / 83 / 84 / 96, batch 8 at 128 tokens 148 / 148 / 154 / 198,
# batch 8 at 4000 tokens 259 / 253 / 287 / 307: short walks win, the loop's per-block
# overhead stays small. On an accelerator every block costs kernel launches, so blocks
# are large there (to be tuned on the device: scripts/gpu_check.sh).
ATTN_BLOCKS = {"cpu": 64}
ACCELERATOR_ATTN_BLOCK = 1024


def default_attn_block(platform: str) -> int:
    return ATTN_BLOCKS.get(platform, ACCELERATOR_ATTN_BLOCK)


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=["num_slots"])
@dataclass(frozen=True)
class KVCache:
    """Per-layer key and value arrays, each [slots, kv_heads, length, head_dim].

    `num_slots` is kept beside the arrays so that a partition without layers (embedding
    or head only) still knows its pool size.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    num_slots: int

    @property
    def slots(self) -> int:
        return self.num_slots

    @property
    def length(self) -> int:
        return int(self.k[0].shape[2]) if self.k else 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self.k, *self.v))


@dataclass(frozen=True)
class CacheGeometry:
    """Static shape facts of a partition's cache; part of the compiled steps' key.

    max_context: positions a session may reach; length: rows stored per slot (a multiple
    of block); ring: positions are stored modulo length (sliding window); window: the
    sliding window, None for full attention.
    """

    max_context: int
    length: int
    block: int
    ring: bool
    window: int | None

    @staticmethod
    def plan(
        config: ModelConfig, max_context: int, prefill_chunk: int, attn_block: int
    ) -> CacheGeometry:
        window = config.sliding_window
        # A chunk's queries reach `window` keys back from its first token while the chunk
        # writes up to `prefill_chunk` rows ahead: the ring must hold both.
        ring = window is not None and window + prefill_chunk < max_context
        need = window + prefill_chunk if ring and window is not None else max_context
        # At least two blocks: attention always walks a real loop (see attention.py).
        block = max(1, min(attn_block, pow2_bucket(need) // 2))
        length = -(-need // block) * block
        return CacheGeometry(max_context, length, block, ring, window)

    def key_length(self, need: int) -> int:
        """Keys a step attends over when the furthest active slot holds `need` positions:
        a power-of-two bucket of at least two blocks, at most the whole cache."""
        if self.ring and need > self.length:
            return self.length
        return min(pow2_bucket(max(need, 1), floor=2 * self.block), self.length)


def new_cache(config: ModelConfig, num_layers: int, slots: int, length: int, dtype: str) -> KVCache:
    """Zeroed cache for `num_layers` layers and `slots` sessions of `length` rows."""
    shape = (slots, config.num_kv_heads, length, config.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
        num_slots=slots,
    )


def cache_nbytes(
    config: ModelConfig, num_layers: int, slots: int, length: int, itemsize: int
) -> int:
    return 2 * num_layers * slots * length * config.kv_size * itemsize


@partial(jax.jit, donate_argnames=("cache",))
def clear_slot(cache: KVCache, slot: jax.Array) -> KVCache:
    """The cache with one slot's keys and values zeroed (in place: the cache is donated).

    A session taking a slot starts from zeros, not from what the slot's last session left:
    attention weighs a masked row by exactly 0, and 0 times a non-finite value left there
    is NaN (a peer once poisoned every later session of a slot this way)."""
    return KVCache(
        k=[a.at[slot].set(0) for a in cache.k],
        v=[a.at[slot].set(0) for a in cache.v],
        num_slots=cache.num_slots,
    )
