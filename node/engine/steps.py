"""The compiled steps: forward (prefill chunks and decode), the tail step, decode_steps.

Every step takes B rows, each (slot, start position, token count) with n token columns,
so one function serves a decode step over any subset of slots (n = 1), a batched prefill
of several sessions' chunks, and both at every key bucket. The static key is `StepShape`
(model config, cache geometry, whether the partition embeds and/or has the head) plus the
buckets; the layer count and dtype come from the params pytree, the cache's dtype
(kv_dtype) from the cache's arrays, so caches of two dtypes never share a compilation. The layer range
(start, end) is not in the key, so partitions of one shape share every compilation: after
a re-plan, a new owner of layers [8, 16) reuses what [0, 8) compiled.

The KV cache is donated; rows with a negative start are idle and write nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp

from node.engine.cache import CacheGeometry, KVCache
from node.engine.config import ModelConfig
from node.engine.samplers import RowSettings, greedy_rows, sample_rows, top_alternatives
from node.engine.transformer import (
    Rows,
    embed,
    head_logits,
    layer_forward,
    pooled_last,
    rope_tables,
)
from node.engine.weights import PartitionParams

OUT_HIDDEN, OUT_LAST, OUT_ALL, OUT_EMBED = "hidden", "last", "all", "embed"


@dataclass(frozen=True)
class StepShape:
    """What a compiled step depends on besides array shapes: never the layer range."""

    config: ModelConfig
    geom: CacheGeometry
    has_embedding: bool
    has_head: bool
    # Sliding layers' geometry and which of the partition's layers slide (models that
    # mix both, or Mistral's all-sliding): part of the key only for such models.
    local: CacheGeometry | None = None
    sliding: tuple[bool, ...] = ()


def _rows(
    geom: CacheGeometry, slots: jax.Array, starts: jax.Array, lengths: jax.Array, n: int
) -> Rows:
    t = jnp.arange(n, dtype=jnp.int32)[None]
    live = (starts >= 0) & (lengths > 0)
    real = live[:, None] & (t < lengths[:, None])
    q_pos = jnp.where(real, starts[:, None] + t, -1)
    index = jnp.mod(q_pos, geom.length) if geom.ring else q_pos
    write = jnp.where(real, index, geom.length)  # out of range: dropped
    last = jnp.where(live, starts + lengths - 1, -1)
    return Rows(slots, q_pos, write, last)


def _forward(
    shape: StepShape,
    params: PartitionParams,
    cache: KVCache,
    inputs: jax.Array,
    rows: Rows,
    key_len: int,
) -> tuple[jax.Array, KVCache]:
    """Embed (or take hidden [B, n, H]) and run the layers: x [H, B*n] and the cache."""
    cfg = shape.config
    if shape.has_embedding:
        x = embed(cfg, params, inputs.reshape(-1))
    else:
        x = inputs.reshape(-1, cfg.hidden_size).T.astype(params.dtype)
    positions = rows.q_pos.reshape(-1)
    context = shape.geom.max_context
    full = (shape.geom, rows, rope_tables(cfg, positions, x.dtype, False, context), key_len)
    local = full
    if shape.local is not None:
        local = (
            shape.local,
            _rows_in(shape.local, rows),
            rope_tables(cfg, positions, x.dtype, True, context),
            shape.local.local_key_length(key_len),
        )
    sliding = shape.sliding or (False,) * len(params.layers)
    new_k, new_v = [], []
    for layer, k_cache, v_cache, slides in zip(params.layers, cache.k, cache.v, sliding, strict=True):
        geom, layer_rows, rope, keys = local if slides else full
        x, k_cache, v_cache = layer_forward(
            cfg, geom, layer, k_cache, v_cache, x, layer_rows, rope, keys
        )
        new_k.append(k_cache)
        new_v.append(v_cache)
    return x, KVCache(new_k, new_v, cache.num_slots)


def _rows_in(geom: CacheGeometry, rows: Rows) -> Rows:
    """The same rows writing into a cache of another geometry (a sliding layer's ring)."""
    index = jnp.mod(rows.q_pos, geom.length) if geom.ring else rows.q_pos
    write = jnp.where(rows.q_pos >= 0, index, geom.length)  # out of range: dropped
    return Rows(rows.slots, rows.q_pos, write, rows.last_pos)


def _last_columns(x: jax.Array, lengths: jax.Array, n: int) -> jax.Array:
    """x [H, B*n] -> [H, B]: each row's last real token (the first for idle rows)."""
    B = lengths.shape[0]
    cols = jnp.arange(B, dtype=jnp.int32) * n + jnp.clip(lengths - 1, 0, n - 1)
    return jnp.take(x, cols, axis=1)


@partial(jax.jit, static_argnames=("shape", "key_len", "out"), donate_argnames=("cache",))
def forward(
    params: PartitionParams,
    cache: KVCache,
    inputs: jax.Array,
    slots: jax.Array,
    starts: jax.Array,
    lengths: jax.Array,
    *,
    shape: StepShape,
    key_len: int,
    out: str,
) -> tuple[KVCache, jax.Array]:
    """B rows of n tokens: inputs [B, n] ids or [B, n, H] hidden; slots, starts, lengths [B].

    Returns hidden [B, n, H] (no head), or float32 logits [B, V] of each row's last real
    token (out="last") or [B, n, V] of every token (out="all"), or (out="embed") each
    row's last real token after the final norm, L2-normalized, float32 [B, H].
    """
    B, n = inputs.shape[0], inputs.shape[1]
    rows = _rows(shape.geom, slots, starts, lengths, n)
    x, cache = _forward(shape, params, cache, inputs, rows, key_len)
    if not shape.has_head or out == OUT_HIDDEN:
        # A separate transpose (see head_logits): the last matmul stays W @ x.
        return cache, jax.lax.optimization_barrier(x).T.reshape(B, n, -1)
    if out == OUT_ALL:
        return cache, head_logits(shape.config, params, x).reshape(B, n, -1)
    if out == OUT_EMBED:
        return cache, pooled_last(shape.config, params, _last_columns(x, lengths, n))
    return cache, head_logits(shape.config, params, _last_columns(x, lengths, n))


def _sample(
    logits: jax.Array,
    settings: RowSettings | None,
    step_offset: jax.Array | int,
    candidates: int,
) -> tuple[jax.Array, jax.Array]:
    if settings is None:
        return greedy_rows(logits)
    return sample_rows(logits, settings, step_offset, candidates=candidates)


@partial(
    jax.jit,
    static_argnames=("shape", "key_len", "candidates", "top_n"),
    donate_argnames=("cache",),
)
def tail(
    params: PartitionParams,
    cache: KVCache,
    inputs: jax.Array,
    slots: jax.Array,
    positions: jax.Array,
    settings: RowSettings | None,
    *,
    shape: StepShape,
    key_len: int,
    candidates: int,
    top_n: int,
) -> tuple[KVCache, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """One decode step on the last partition and the sampler, in one compiled call.

    inputs [B, 1] ids or [B, 1, H]; settings None means plain greedy. Returns the cache,
    tokens [B] int32, their logprobs [B], and with top_n > 0 the top_n most likely tokens
    and their logprobs [B, top_n]. The logits never leave the device.
    """
    lengths = (positions >= 0).astype(jnp.int32)
    rows = _rows(shape.geom, slots, positions, lengths, 1)
    x, cache = _forward(shape, params, cache, inputs, rows, key_len)
    logits = head_logits(shape.config, params, x)
    tokens, logprobs = _sample(logits, settings, 0, candidates)
    top_ids = top_lps = None
    if top_n:
        top_ids, top_lps = top_alternatives(logits, top_n)
    return cache, tokens.astype(jnp.int32), logprobs, top_ids, top_lps


@partial(
    jax.jit,
    static_argnames=("shape", "key_len", "steps", "candidates"),
    donate_argnames=("cache",),
)
def decode_steps(
    params: PartitionParams,
    cache: KVCache,
    tokens: jax.Array,
    slots: jax.Array,
    positions: jax.Array,
    settings: RowSettings | None,
    *,
    shape: StepShape,
    key_len: int,
    steps: int,
    candidates: int,
) -> tuple[KVCache, jax.Array, jax.Array]:
    """`steps` decode steps with on-device sampling, as one compiled loop (whole model).

    Each step feeds every row's sampled token back in at the next position; rows with a
    negative position stay idle. The host checks every active row has room for `steps`
    positions. Returns tokens and logprobs [B, steps].
    """
    row_ids = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    active = positions >= 0

    def step(
        carry: tuple[KVCache, jax.Array, jax.Array, jax.Array | None], i: jax.Array
    ) -> tuple[tuple[KVCache, jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]:
        cache, tok, pos, seen = carry
        rows = _rows(shape.geom, slots, pos, active.astype(jnp.int32), 1)
        x, cache = _forward(shape, params, cache, tok[:, None], rows, key_len)
        logits = head_logits(shape.config, params, x)
        if settings is None:
            new_tok, logprob = greedy_rows(logits)
        else:
            assert seen is not None
            new_tok, logprob = sample_rows(
                logits, replace(settings, seen=seen), i, candidates=candidates
            )
            # The repetition penalty sees this step's tokens from the next step on, as
            # the state's observe does between single steps.
            seen = seen.at[row_ids, new_tok].set(True)
        new_tok = new_tok.astype(jnp.int32)
        pos = jnp.where(active, pos + 1, pos)
        return (cache, new_tok, pos, seen), (new_tok, logprob)

    seen0 = None if settings is None else jnp.asarray(settings.seen)
    (cache, _, _, _), (toks, logprobs) = jax.lax.scan(
        step, (cache, tokens, positions, seen0), jnp.arange(steps, dtype=jnp.uint32)
    )
    return cache, toks.T, logprobs.T
