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
many positions, position p at row p % length. Models that mix sliding and full layers
(Gemma 3, some Qwen2/3) give each kind its own geometry: a sliding layer's cache holds
only its ring, a full layer's the whole context.

The cache has its own dtype (`kv_dtype`), which may be narrower than the compute dtype:
keys and values are rounded to it when written, and attention reads them back into the
compute dtype and accumulates in float32 (attention.py). "auto" is `resolve_kv_dtype`'s
choice (config.py), measured in the README's design notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from node.engine.buckets import half_octave_bucket, pow2_bucket
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
        """Rows per slot of the longest layer (full attention where a model mixes)."""
        return max((int(a.shape[2]) for a in self.k), default=0)

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
    def plan(max_context: int, attn_block: int) -> CacheGeometry:
        """The geometry of a full-attention layer: every position up to max_context."""
        # At least two blocks: attention always walks a real loop (see attention.py).
        block = max(1, min(attn_block, pow2_bucket(max_context) // 2))
        length = -(-max_context // block) * block
        return CacheGeometry(max_context, length, block, False, None)

    def windowed(self, window: int, prefill_chunk: int) -> CacheGeometry:
        """The geometry of a sliding-window layer beside this full one (same block, so
        one key bucket serves both): a ring of window + one prefill chunk when that is
        shorter than the context, since a chunk's queries reach `window` keys back from
        its first token while it writes up to `prefill_chunk` rows ahead."""
        ring = window + prefill_chunk < self.max_context
        if not ring:
            return CacheGeometry(self.max_context, self.length, self.block, False, window)
        length = max(2, -(-(window + prefill_chunk) // self.block)) * self.block
        return CacheGeometry(self.max_context, min(length, self.length), self.block, True, window)

    def local_key_length(self, key_len: int) -> int:
        """Keys a sliding layer with this (ring) geometry attends over when full layers
        attend over key_len (a bucket of the same block): at most its whole ring."""
        return min(key_len, self.length)

    def key_length(self, need: int) -> int:
        """Keys a step attends over when the furthest active slot holds `need` positions:
        a half-octave bucket (2^k or 1.5 * 2^k) of at least two blocks, at most the whole
        cache. Half octaves rather than powers of two: each block walked costs about
        17 us per layer on the 2-core CPU whether a row sees it or not, and SmolLM2's
        decode at 2100 positions took 58.3 ms with 4096 keys, 48.6 ms with 3072 (and
        33.3-36.1 ms at 1000 positions, 1024 keys under either rule: the noise); one
        compilation more per octave (11 key buckets at context 4096 on CPU, not 6)."""
        if self.ring and need > self.length:
            return self.length
        return min(half_octave_bucket(max(need, 1), floor=2 * self.block), self.length)


def layer_geometries(
    config: ModelConfig, start: int, end: int, full: CacheGeometry, prefill_chunk: int
) -> tuple[CacheGeometry | None, tuple[bool, ...]]:
    """The sliding layers' geometry (None when layers [start, end) have none) and which
    of those layers slide."""
    sliding = tuple(config.is_sliding(i) for i in range(start, end))
    if not any(sliding) or config.sliding_window is None:
        return None, sliding
    return full.windowed(config.sliding_window, prefill_chunk), sliding


def layer_lengths(
    full: CacheGeometry, local: CacheGeometry | None, sliding: tuple[bool, ...]
) -> list[int]:
    """Rows each layer's cache holds per slot."""
    return [local.length if s and local is not None else full.length for s in sliding]


def new_cache(config: ModelConfig, lengths: list[int], slots: int, dtype: str) -> KVCache:
    """Zeroed cache for one layer per entry of `lengths` (its rows per slot) and `slots`
    sessions."""

    def shape(length: int) -> tuple[int, int, int, int]:
        return (slots, config.num_kv_heads, length, config.head_dim)

    return KVCache(
        k=[jnp.zeros(shape(n), dtype) for n in lengths],
        v=[jnp.zeros(shape(n), dtype) for n in lengths],
        num_slots=slots,
    )


def cache_nbytes(config: ModelConfig, lengths: list[int], slots: int, itemsize: int) -> int:
    """Bytes new_cache allocates, with `itemsize` the cache dtype's (kv_dtype's)."""
    return 2 * sum(lengths) * slots * config.kv_size * itemsize


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
