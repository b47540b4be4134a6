"""The transformer partition: jitted prefill and decode over a contiguous layer range.

Owns the math (norms, RoPE, attention, the layer loop, the head), the compiled steps and
`Partition` / `load_partition`; chaining partitions in one process is runner.py's.

A Partition runs layers [start, end) of a Llama/Qwen2/Mistral model. The first partition
takes token ids, the others hidden states; the last applies the final norm and LM head and
returns float32 logits, the others return hidden states. Design choices (measured on CPU):

- layers are a Python loop unrolled inside jit over per-layer weights and caches, not a
  lax.scan over stacked weights (~1.7x faster decode on XLA CPU);
- the KV cache (see cache.py) is donated, and written with scatters whose out-of-range
  indices are dropped: padded prompt rows past the context and inactive decode slots
  (position -1) write nothing;
- prompts are processed in chunks of `prefill_chunk` tokens, each padded to a power-of-two
  bucket, so a handful of compilations serve every prompt length;
- compiled functions are module-level and keyed on the (hashable) config and partition
  spec, so every session and every Partition of the same shape share them; the weights
  are a dynamic PartitionParams pytree whose None fields (absent biases, no embedding)
  are fixed by that config and spec, so they never add a compilation;
- when one partition holds the whole model, decode_steps runs k steps and the sampler in
  one lax.scan on the device: a step-by-step loop pays a host round trip per token
  (dispatch of a jit with hundreds of weight arguments, sampling as a second call, the
  token copied back), which on an H200 cost more than the step itself for Llama-3-8B
  (single-step 8.4 ms/token, decode_steps 4.6 ms). Pipelines keep the single-step API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.cache import KVCache, new_cache
from node.engine.config import ModelConfig
from node.engine.errors import ContextOverflowError, PartitionError
from node.engine.sampling import (
    RowSettings,
    SamplerState,
    advance,
    greedy_rows,
    is_plain_greedy,
    row_settings,
    sample_rows,
)
from node.engine.weights import (
    PartitionParams,
    PartitionSpec,
    WeightSource,
    load_params,
    resolve_dtype,
)

MIN_BUCKET = 16
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512


def pow2_bucket(n: int, *, floor: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= n and >= floor (itself a power of two), at most cap.

    Padding sizes to these buckets keeps the number of compilations logarithmic.
    """
    size = floor
    while size < n:
        size *= 2
    return size if cap is None else min(size, cap)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # transformers normalises in float32 and casts back before the weight multiply.
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _rope_tables(cfg: ModelConfig, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    inv = jnp.asarray(cfg.inv_freq())
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, n, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # broadcast over heads
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _attend(
    cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array
) -> jax.Array:
    """q [B,n,Hq,D] against k/v [B,T,Hkv,D]; query i sees keys at positions <= q_pos[i]."""
    B, n, _, D = q.shape
    T = k.shape[1]
    kvh = cfg.num_kv_heads
    q = q.reshape(B, n, kvh, cfg.num_heads // kvh, D)
    scores = jnp.einsum("bnkgd,btkd->bkgnt", q, k, preferred_element_type=jnp.float32)
    scores = scores * (D**-0.5)
    k_pos = jnp.arange(T, dtype=jnp.int32)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if cfg.sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - cfg.sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgnt,btkd->bnkgd", probs, v)
    return out.reshape(B, n, cfg.q_size)


def _layers(
    cfg: ModelConfig,
    params: PartitionParams,
    cache: KVCache,
    x: jax.Array,
    positions: jax.Array,
    write_rows: jax.Array,
    write_pos: jax.Array,
    slot: jax.Array | None,
) -> tuple[jax.Array, KVCache]:
    """Run the partition's layers on x [B, n, H]; write k/v at (write_rows, write_pos).

    slot=None means x's batch rows are the cache's slots (decode); otherwise x is one
    session and attends to cache slot `slot` (prefill).
    """
    B, n, _ = x.shape
    cos, sin = _rope_tables(cfg, positions, x.dtype)
    Q, KV, D = cfg.q_size, cfg.kv_size, cfg.head_dim
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(params.layers, cache.k, cache.v, strict=True):
        h = _rms_norm(x, layer.ln1, cfg.rms_norm_eps)
        qkv = h @ layer.wqkv
        if layer.bqkv is not None:
            qkv = qkv + layer.bqkv
        q = _rope(qkv[..., :Q].reshape(B, n, cfg.num_heads, D), cos, sin)
        k = _rope(qkv[..., Q : Q + KV].reshape(B, n, cfg.num_kv_heads, D), cos, sin)
        v = qkv[..., Q + KV :].reshape(B, n, cfg.num_kv_heads, D)
        k_cache = k_cache.at[write_rows, write_pos].set(k, mode="drop")
        v_cache = v_cache.at[write_rows, write_pos].set(v, mode="drop")
        new_k.append(k_cache)
        new_v.append(v_cache)
        if slot is None:
            keys, values = k_cache, v_cache
        else:
            keys = jax.lax.dynamic_index_in_dim(k_cache, slot, 0, keepdims=True)
            values = jax.lax.dynamic_index_in_dim(v_cache, slot, 0, keepdims=True)
        attn = _attend(cfg, q, keys, values, positions) @ layer.wo
        if layer.bo is not None:
            attn = attn + layer.bo
        x = x + attn
        h = _rms_norm(x, layer.ln2, cfg.rms_norm_eps)
        gate, up = jnp.split(h @ layer.wgu, 2, axis=-1)
        x = x + (jax.nn.silu(gate) * up) @ layer.wd
    return x, KVCache(new_k, new_v)


def _head(cfg: ModelConfig, params: PartitionParams, x: jax.Array) -> jax.Array:
    assert params.final_norm is not None
    h = _rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    if params.head is not None:
        logits = h @ params.head
    else:  # tied head sharing the embedding table [V, H]
        logits = jnp.einsum("...h,vh->...v", h, params.embed)
    return logits.astype(jnp.float32)


def _embed_or_cast(params: PartitionParams, inputs: jax.Array, spec: PartitionSpec) -> jax.Array:
    if spec.has_embedding:
        assert params.embed is not None
        return jnp.take(params.embed, inputs, axis=0)
    return inputs.astype(params.dtype)


@partial(jax.jit, static_argnames=("cfg", "spec", "all_logits"), donate_argnames=("cache",))
def _prefill_chunk(
    params: PartitionParams,
    cache: KVCache,
    inputs: jax.Array,
    start: jax.Array,
    slot: jax.Array,
    last_index: jax.Array,
    *,
    cfg: ModelConfig,
    spec: PartitionSpec,
    all_logits: bool,
) -> tuple[KVCache, jax.Array]:
    x = _embed_or_cast(params, inputs, spec)[None]  # [1, n, H]
    n = x.shape[1]
    positions = (start + jnp.arange(n, dtype=jnp.int32))[None]
    x, cache = _layers(cfg, params, cache, x, positions, slot[None, None], positions, slot)
    x = x[0]
    if not spec.has_head:
        return cache, x
    if all_logits:
        return cache, _head(cfg, params, x)
    return cache, _head(cfg, params, jax.lax.dynamic_index_in_dim(x, last_index, 0, keepdims=False))


def _decode_body(
    params: PartitionParams,
    cache: KVCache,
    inputs: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    spec: PartitionSpec,
) -> tuple[KVCache, jax.Array]:
    x = _embed_or_cast(params, inputs, spec)[:, None]  # [S, 1, H]
    S = x.shape[0]
    pos = positions[:, None]
    # Inactive slots (position < 0) write to an out-of-range index, which the scatter drops.
    limit = cache.k[0].shape[1] if cache.k else 0
    write_pos = jnp.where(pos < 0, limit, pos)
    rows = jnp.arange(S, dtype=jnp.int32)[:, None]
    x, cache = _layers(cfg, params, cache, x, pos, rows, write_pos, None)
    x = x[:, 0]
    if spec.has_head:
        return cache, _head(cfg, params, x)
    return cache, x


@partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnames=("cache",))
def _decode(
    params: PartitionParams,
    cache: KVCache,
    inputs: jax.Array,
    positions: jax.Array,
    *,
    cfg: ModelConfig,
    spec: PartitionSpec,
) -> tuple[KVCache, jax.Array]:
    return _decode_body(params, cache, inputs, positions, cfg, spec)


@partial(
    jax.jit, static_argnames=("cfg", "spec", "steps", "greedy"), donate_argnames=("cache",)
)
def _decode_steps(
    params: PartitionParams,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    rows: RowSettings | None,
    *,
    cfg: ModelConfig,
    spec: PartitionSpec,
    steps: int,
    greedy: bool,
) -> tuple[KVCache, jax.Array, jax.Array]:
    """`steps` decode steps with on-device sampling, as one compiled loop.

    Each step feeds every slot's sampled token back in at the next position. A slot whose
    position is negative (idle) or has reached the cache's length is run as idle, so
    nothing is written past the context; the host refuses such calls anyway.
    Returns tokens and logprobs [slots, steps].
    """
    limit = cache.k[0].shape[1] if cache.k else jnp.iinfo(jnp.int32).max
    slot_ids = jnp.arange(tokens.shape[0], dtype=jnp.int32)

    def step(
        carry: tuple[KVCache, jax.Array, jax.Array, jax.Array | None], i: jax.Array
    ) -> tuple[tuple[KVCache, jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]:
        cache, tok, pos, seen = carry
        run_pos = jnp.where((pos >= 0) & (pos < limit), pos, -1)
        cache, logits = _decode_body(params, cache, tok, run_pos, cfg, spec)
        if greedy:
            new_tok, logprob = greedy_rows(logits)
        else:
            assert rows is not None and seen is not None
            new_tok, logprob = sample_rows(logits, replace(rows, seen=seen), i)
            # The repetition penalty sees this step's tokens from the next step on, as
            # sample_batch's state.observe does between single steps.
            seen = seen.at[slot_ids, new_tok].set(True)
        new_tok = new_tok.astype(jnp.int32)
        pos = jnp.where(pos >= 0, pos + 1, pos)
        return (cache, new_tok, pos, seen), (new_tok, logprob)

    seen0 = None if rows is None else jnp.asarray(rows.seen)
    (cache, _, _, _), (toks, logprobs) = jax.lax.scan(
        step, (cache, tokens, positions, seen0), jnp.arange(steps, dtype=jnp.uint32)
    )
    return cache, toks.T, logprobs.T


@dataclass
class Partition:
    """A loaded layer range with its weights; creates caches and runs steps on them.

    prefill/decode take a cache and return the updated one: the old cache object is
    donated and must not be used again.
    """

    config: ModelConfig
    spec: PartitionSpec
    params: PartitionParams
    dtype: str
    max_context: int
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK

    @property
    def num_layers(self) -> int:
        return self.spec.end - self.spec.start

    def new_cache(self, slots: int = 1) -> KVCache:
        """A zeroed cache with `slots` session slots."""
        if slots < 1:
            raise PartitionError(f"a cache needs at least one slot, got {slots}")
        return new_cache(self.config, self.num_layers, slots, self.max_context, self.dtype)

    def _check_inputs(self, inputs: Any, batch_dims: int) -> np.ndarray | jax.Array:
        # Token ids stay numpy: jit's C++ dispatch moves them to the device far more
        # cheaply than a jnp.asarray call (which costs more than a tiny model's step).
        if self.spec.has_embedding:
            # Ids already on the device stay there (np.asarray would wait for them).
            ids = (
                inputs.astype(jnp.int32)
                if isinstance(inputs, jax.Array)
                else np.asarray(inputs, dtype=np.int32)
            )
            if ids.ndim != batch_dims:
                raise PartitionError(
                    f"the first partition takes token ids of rank {batch_dims}, got shape {ids.shape}"
                )
            return ids
        arr = inputs if isinstance(inputs, jax.Array) else jnp.asarray(inputs)
        if arr.ndim != batch_dims + 1 or arr.shape[-1] != self.config.hidden_size:
            raise PartitionError(
                f"partition [{self.spec.start}, {self.spec.end}) takes hidden states "
                f"[..., {self.config.hidden_size}], got shape {arr.shape}"
            )
        return arr

    def prefill(
        self,
        cache: KVCache,
        inputs: Any,
        *,
        start_pos: int = 0,
        slot: int = 0,
        all_logits: bool = False,
    ) -> tuple[KVCache, jax.Array]:
        """Process a prompt (or its continuation from start_pos) for the session in `slot`.

        inputs: token ids [n] (first partition) or hidden states [n, hidden].
        Returns the cache and hidden states [n, hidden], or on the last partition float32
        logits of the last position [vocab] ([n, vocab] with all_logits).
        """
        x = self._check_inputs(inputs, 1)
        n = int(x.shape[0])
        if n == 0:
            raise PartitionError("prefill needs at least one token")
        if start_pos < 0 or start_pos + n > self.max_context:
            raise ContextOverflowError(
                f"prompt of {n} tokens at position {start_pos} does not fit the context of "
                f"{self.max_context} tokens; shorten the prompt or load with a larger max_context"
            )
        if not 0 <= slot < max(cache.slots, 1):
            raise PartitionError(f"slot {slot} is outside the cache's {cache.slots} slots")
        outs: list[jax.Array] = []
        out = None
        chunk = self.prefill_chunk
        for c0 in range(0, n, chunk):
            m = min(chunk, n - c0)
            bucket = pow2_bucket(m, floor=MIN_BUCKET, cap=chunk)
            piece = x[c0 : c0 + m]
            if bucket > m:
                pad = [(0, bucket - m)] + [(0, 0)] * (piece.ndim - 1)
                piece = jnp.pad(piece, pad)
            cache, out = _prefill_chunk(
                self.params,
                cache,
                piece,
                jnp.int32(start_pos + c0),
                jnp.int32(slot),
                jnp.int32(m - 1),
                cfg=self.config,
                spec=self.spec,
                all_logits=all_logits,
            )
            if not self.spec.has_head or all_logits:
                outs.append(out[:m])
        if outs:
            return cache, outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
        assert out is not None
        return cache, out

    def _check_positions(self, cache: KVCache, x: Any, positions: Any) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int32)
        slots = cache.slots if cache.k else int(x.shape[0])
        if pos.shape != (slots,) or x.shape[0] != slots:
            raise PartitionError(
                f"decode needs one input and one position per cache slot ({slots}), "
                f"got inputs {tuple(x.shape)} and positions {pos.shape}"
            )
        return pos

    def decode(
        self, cache: KVCache, inputs: Any, positions: Sequence[int] | np.ndarray
    ) -> tuple[KVCache, jax.Array]:
        """One decode step for every slot of the cache.

        inputs: one token id per slot [slots] (first partition) or hidden [slots, hidden];
        positions: each slot's position, -1 for an idle slot (its cache is untouched and
        its output is meaningless). Returns hidden [slots, hidden] or logits [slots, vocab].
        """
        x = self._check_inputs(inputs, 1)
        pos = self._check_positions(cache, x, positions)
        if (pos >= self.max_context).any():
            raise ContextOverflowError(
                f"decode position {int(pos.max())} is past the context of {self.max_context} tokens"
            )
        return _decode(self.params, cache, x, pos, cfg=self.config, spec=self.spec)

    def decode_steps(
        self,
        cache: KVCache,
        tokens: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        states: Sequence[SamplerState | None],
        steps: int,
    ) -> tuple[KVCache, np.ndarray, np.ndarray]:
        """`steps` decode steps with sampling on the device, for a partition holding the
        whole model (embedding and head): the fast path when one machine runs it all.

        tokens [slots]: each slot's last sampled token, fed at positions [slots] (-1 for
        an idle slot, whose state may be None); states: each slot's SamplerState, sampled
        exactly as sample_batch would step by step (same seeds and step counters).
        Every active slot needs position + steps <= max_context (ContextOverflowError
        otherwise): nothing is ever written past the context.

        Returns the cache and numpy tokens int64 [slots, steps] and logprobs float32
        [slots, steps]; one host sync per call. Every step runs: a caller that meets a stop
        token inside the block discards the tokens after it (their cache rows are written
        but lie beyond the session's position, so they are overwritten or never attended).
        Each active slot's state advances by `steps` and observes all the tokens.
        """
        if not (self.spec.has_embedding and self.spec.has_head):
            raise PartitionError(
                "decode_steps needs a partition holding the embedding and the head; "
                "pipelines use decode() and sample_batch() per step"
            )
        if steps < 1:
            raise PartitionError(f"decode_steps needs steps >= 1, got {steps}")
        x = self._check_inputs(tokens, 1)
        pos = self._check_positions(cache, x, positions)
        if len(states) != pos.shape[0]:
            raise PartitionError(
                f"decode_steps needs one sampler state per slot ({pos.shape[0]}), got {len(states)}"
            )
        active = pos >= 0
        if (pos[active] + steps > self.max_context).any():
            raise ContextOverflowError(
                f"{steps} decode steps from position {int(pos[active].max())} run past the "
                f"context of {self.max_context} tokens; ask for fewer steps"
            )
        greedy = is_plain_greedy(states)
        rows = None if greedy else row_settings(states, self.config.vocab_size)
        cache, toks, lps = _decode_steps(
            self.params,
            cache,
            x,
            pos,
            rows,
            cfg=self.config,
            spec=self.spec,
            steps=steps,
            greedy=greedy,
        )
        tokens_np = np.asarray(toks).astype(np.int64)
        logprobs_np = np.asarray(lps).astype(np.float32)
        advance([s if a else None for s, a in zip(states, active, strict=True)], tokens_np)
        return cache, tokens_np, logprobs_np


def load_partition(
    source: WeightSource,
    config: ModelConfig,
    spec: PartitionSpec,
    *,
    dtype: str | None = None,
    max_context: int | None = DEFAULT_MAX_CONTEXT,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Partition:
    """Load one partition's weights from `source` (files or a byte-range callback).

    dtype: compute dtype (float32/bfloat16/float16); default: the checkpoint's.
    max_context: cap on the cache length; the model's max_position_embeddings otherwise.
    """
    if prefill_chunk < MIN_BUCKET or prefill_chunk & (prefill_chunk - 1):
        raise PartitionError(
            f"prefill_chunk must be a power of two >= {MIN_BUCKET}, got {prefill_chunk}"
        )
    context = config.max_position_embeddings
    if max_context is not None:
        if max_context < 1:
            raise PartitionError(f"max_context must be positive, got {max_context}")
        context = min(context, max_context)
    chosen = resolve_dtype(config, dtype)
    params = load_params(source, config, spec, chosen)
    return Partition(config, spec, params, chosen, context, prefill_chunk)
