"""A loaded partition: `Partition` and `load_partition`, the host side of the steps.

A Partition runs layers [start, end) of a Llama/Qwen2/Mistral model. The first partition
takes token ids, the others hidden states; the last applies the final norm and LM head.
This module checks inputs (shapes, slots, positions, token ids), pads them to buckets
(buckets.py) and calls the compiled steps (steps.py); the math is transformer.py's and
attention.py's. Design choices (measured on CPU):

- layers are a Python loop unrolled inside jit over per-layer weights and caches, not a
  lax.scan over stacked weights (~1.7x faster decode on XLA CPU);
- every step runs B rows (slots) of n tokens: decode over any subset of slots, padded to
  a power-of-two width; prefill of one or several sessions in chunks of `prefill_chunk`
  tokens whose boundaries sit at multiples of the chunk, each padded to a power-of-two
  bucket; keys attended up to a half-octave bucket (2^k or 1.5 * 2^k) of the longest
  active row (CacheGeometry.key_length);
- the cache is donated and written with drop-mode scatters: padding and idle rows write
  nothing, and an idle row's output is finite (never NaN) but meaningless;
- when one partition holds the whole model, decode_steps runs k steps and the sampler in
  one lax.scan on the device: a step-by-step loop pays a host round trip per token,
  which on an H200 cost more than the step itself for Llama-3-8B (single-step 8.4 ms per
  token, decode_steps 4.6 ms). Pipelines use tail_step on the last partition: one call
  per token that returns token ids, not logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.buckets import MIN_BUCKET, chunk_spans, decode_width, pow2_bucket
from node.engine.cache import (
    CacheGeometry,
    KVCache,
    clear_slot,
    default_attn_block,
    layer_geometries,
    layer_lengths,
    new_cache,
)
from node.engine.config import ModelConfig, resolve_kv_dtype
from node.engine.errors import ContextOverflowError, PartitionError, TokenRangeError
from node.engine.quant import NATIVE, check_weights
from node.engine.sampling import (
    SamplerState,
    advance,
    batch_candidates,
    is_plain_greedy,
    row_settings,
)
from node.engine.steps import (
    OUT_ALL,
    OUT_EMBED,
    OUT_HIDDEN,
    OUT_LAST,
    StepShape,
    decode_steps,
    forward,
    tail,
)
from node.engine.weights import (
    PartitionParams,
    PartitionSpec,
    WeightSource,
    load_params,
    resolve_dtype,
)

__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "DEFAULT_PREFILL_CHUNK",
    "MIN_BUCKET",
    "Partition",
    "TailTokens",
    "load_partition",
    "pow2_bucket",
]

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class TailTokens:
    """What a tail step returns, all numpy: tokens int64 [B], their logprobs float32 [B],
    and when asked the top alternatives' ids [B, n] and logprobs [B, n]."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclass
class Partition:
    """A loaded layer range with its weights; creates caches and runs steps on them.

    Every step takes a cache and returns the updated one: the old cache object is donated
    and must not be used again.
    """

    config: ModelConfig
    spec: PartitionSpec
    params: PartitionParams
    dtype: str
    max_context: int
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    attn_block: int | None = None  # None: the platform's default (cache.default_attn_block)
    weights: str = NATIVE  # "native" (as stored, in `dtype`) or "int8" (quant.py)
    kv_dtype: str | None = None  # the cache's dtype; None or "auto": config.resolve_kv_dtype's
    geom: CacheGeometry = field(init=False)  # full-attention layers'
    lengths: list[int] = field(init=False)  # rows per slot of each layer's cache
    shape: StepShape = field(init=False)

    def __post_init__(self) -> None:
        if self.attn_block is None:
            self.attn_block = default_attn_block(jax.default_backend())
        self.kv_dtype = _kv_dtype(self.kv_dtype, self.dtype)
        self.geom = CacheGeometry.plan(self.max_context, self.attn_block)
        local, sliding = layer_geometries(
            self.config, self.spec.start, self.spec.end, self.geom, self.prefill_chunk
        )
        self.lengths = layer_lengths(self.geom, local, sliding)
        self.shape = StepShape(
            self.config, self.geom, self.spec.has_embedding, self.spec.has_head,
            local, sliding if local is not None else (),
        )

    @property
    def num_layers(self) -> int:
        return self.spec.end - self.spec.start

    def new_cache(self, slots: int = 1) -> KVCache:
        """A zeroed cache with `slots` session slots."""
        if slots < 1:
            raise PartitionError(f"a cache needs at least one slot, got {slots}")
        assert self.kv_dtype is not None  # resolved in __post_init__
        return new_cache(self.config, self.lengths, slots, self.kv_dtype)

    def clear_slot(self, cache: KVCache, slot: int) -> KVCache:
        """`cache` with `slot` zeroed, for a new session (the old cache is donated)."""
        (idx,) = self._slots(cache, [slot])
        if not self.num_layers:
            return cache
        return clear_slot(cache, jnp.int32(idx))

    # -- input checks -------------------------------------------------------------------

    def _ids(self, inputs: Any, what: str) -> np.ndarray:
        ids = np.asarray(inputs)
        if ids.ndim != 1:
            raise PartitionError(
                f"the first partition takes token ids of rank 1 {what}, got shape {ids.shape}"
            )
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise PartitionError(f"token ids must be integers, got dtype {ids.dtype}")
        vocab = self.config.vocab_size
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            raise TokenRangeError(
                f"token id {int(ids[bad[0]])} (index {int(bad[0])} {what}) is outside the "
                f"vocabulary of {vocab} tokens (ids 0..{vocab - 1}): the tokenizer does not "
                "match this model, or the ids are corrupt"
            )
        return ids.astype(np.int32)

    def _inputs(self, inputs: Any, what: str) -> np.ndarray | jax.Array:
        """Token ids [n] (first partition) or hidden states [n, hidden]."""
        if self.spec.has_embedding:
            return self._ids(inputs, what)
        arr = inputs if isinstance(inputs, jax.Array) else np.asarray(inputs)
        if arr.ndim != 2 or arr.shape[-1] != self.config.hidden_size:
            raise PartitionError(
                f"partition [{self.spec.start}, {self.spec.end}) takes hidden states "
                f"[n, {self.config.hidden_size}] {what}, got shape {tuple(arr.shape)}"
            )
        return arr

    def _slots(self, cache: KVCache, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(slots, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise PartitionError("a step needs at least one slot")
        bad = ids[(ids < 0) | (ids >= cache.slots)]
        if bad.size:
            raise PartitionError(f"slot {int(bad[0])} is outside the cache's {cache.slots} slots")
        if np.unique(ids).size != ids.size:
            raise PartitionError(f"slots must be distinct, got {ids.tolist()}")
        return ids.astype(np.int32)

    def _padded_rows(self, cache: KVCache, slots: np.ndarray, width: int) -> np.ndarray:
        # Padding rows name slot `cache.slots`: out of range, so their writes are dropped.
        return np.concatenate([slots, np.full(width - slots.size, cache.slots, np.int32)])

    # -- prefill ------------------------------------------------------------------------

    def prefill(
        self,
        cache: KVCache,
        inputs: Any,
        *,
        start_pos: int = 0,
        slot: int = 0,
        all_logits: bool = False,
        embed: bool = False,
    ) -> tuple[KVCache, jax.Array]:
        """Process a prompt (or its continuation from start_pos) for the session in `slot`.

        inputs: token ids [n] (first partition) or hidden states [n, hidden].
        Returns the cache and hidden states [n, hidden], or on the last partition float32
        logits of the last position [vocab] ([n, vocab] with all_logits), or with embed
        the last position's final-norm hidden state, L2-normalized, float32 [hidden]
        (the input's embedding: see transformer.pooled_last).
        """
        cache, outs = self.prefill_batch(
            cache, [inputs], [slot], [start_pos], all_logits=all_logits, embed=embed
        )
        return cache, outs[0]

    def prefill_batch(
        self,
        cache: KVCache,
        inputs: Sequence[Any],
        slots: Sequence[int],
        start_positions: Sequence[int],
        *,
        all_logits: bool = False,
        embed: bool = False,
    ) -> tuple[KVCache, list[jax.Array]]:
        """Prefill several sessions' tokens in shared calls: session i's inputs (ids [n_i]
        or hidden [n_i, hidden]) into slots[i] from start_positions[i].

        Runs in rounds: round r holds the r-th chunk of every session that has one, the
        sessions padded to a power-of-two count and the chunks to one token bucket.
        Returns per session what prefill returns.
        """
        if not (len(inputs) == len(slots) == len(start_positions)) or not inputs:
            raise PartitionError(
                "prefill_batch needs one slot and one start position per session, got "
                f"{len(inputs)} inputs, {len(slots)} slots, {len(start_positions)} starts"
            )
        slot_ids = self._slots(cache, slots)
        xs = [self._inputs(x, f"of session {i}") for i, x in enumerate(inputs)]
        spans = []
        for i, (x, start) in enumerate(zip(xs, start_positions, strict=True)):
            n = int(x.shape[0])
            if n == 0:
                raise PartitionError(f"prefill needs at least one token (session {i} has none)")
            if start < 0 or start + n > self.max_context:
                raise ContextOverflowError(
                    f"prompt of {n} tokens at position {start} does not fit the context of "
                    f"{self.max_context} tokens; shorten the prompt or load with a larger max_context"
                )
            spans.append(chunk_spans(start, n, self.prefill_chunk))
        out_kind = OUT_HIDDEN
        if self.spec.has_head:
            out_kind = OUT_EMBED if embed else (OUT_ALL if all_logits else OUT_LAST)
        pieces: list[list[jax.Array]] = [[] for _ in xs]
        for r in range(max(len(s) for s in spans)):
            members = [i for i, s in enumerate(spans) if r < len(s)]
            cache = self._prefill_round(
                cache, xs, slot_ids, spans, start_positions, members, r, out_kind, pieces
            )
        outs = []
        for got in pieces:
            if out_kind in (OUT_LAST, OUT_EMBED):
                outs.append(got[-1])
            else:
                outs.append(got[0] if len(got) == 1 else jnp.concatenate(got, axis=0))
        return cache, outs

    def _prefill_round(
        self,
        cache: KVCache,
        xs: list[Any],
        slot_ids: np.ndarray,
        spans: list[list[tuple[int, int]]],
        start_positions: Sequence[int],
        members: list[int],
        r: int,
        out_kind: str,
        pieces: list[list[jax.Array]],
    ) -> KVCache:
        lens = [spans[i][r][1] - spans[i][r][0] for i in members]
        n = pow2_bucket(max(lens), floor=MIN_BUCKET, cap=self.prefill_chunk)
        width = pow2_bucket(len(members))
        rows = []
        for i, m in zip(members, lens, strict=True):
            begin = spans[i][r][0] - start_positions[i]
            piece = xs[i][begin : begin + m]
            pad = [(0, n - m)] + [(0, 0)] * (piece.ndim - 1)
            rows.append(
                np.pad(piece, pad) if isinstance(piece, np.ndarray) else jnp.pad(piece, pad)
            )
        blank = rows[0] * 0
        rows += [blank] * (width - len(members))
        batch = jnp.stack(rows) if any(isinstance(x, jax.Array) for x in rows) else np.stack(rows)
        slots = self._padded_rows(cache, slot_ids[members], width)
        starts = np.full(width, -1, np.int32)
        starts[: len(members)] = [spans[i][r][0] for i in members]
        lengths = np.zeros(width, np.int32)
        lengths[: len(members)] = lens
        key_len = self.geom.key_length(max(spans[i][r][1] for i in members))
        cache, out = forward(
            self.params,
            cache,
            batch,
            slots,
            starts,
            lengths,
            shape=self.shape,
            key_len=key_len,
            out=out_kind,
        )
        for row, (i, m) in enumerate(zip(members, lens, strict=True)):
            pieces[i].append(out[row] if out_kind in (OUT_LAST, OUT_EMBED) else out[row, :m])
        return cache

    # -- decode -------------------------------------------------------------------------

    def _step_rows(
        self,
        cache: KVCache,
        inputs: Any,
        slots: Any,
        positions: Any,
        width: int | None,
        steps: int | None = None,
    ) -> tuple[np.ndarray | jax.Array, np.ndarray, np.ndarray, int, int]:
        """Checked and padded (inputs [W, ...], slots [W], positions [W], width, key_len).

        steps: the number of positions each active row advances (decode_steps), else 1."""
        extra = steps or 1
        slot_ids = self._slots(cache, slots)
        k = slot_ids.size
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        x = self._inputs(inputs, "in the decode step")
        if pos.shape != (k,) or x.shape[0] != k:
            raise PartitionError(
                f"a decode step needs one input and one position per slot ({k}), "
                f"got inputs {tuple(x.shape)} and positions {tuple(pos.shape)}"
            )
        if (pos + extra > self.max_context).any():
            last = int(pos.max())
            if steps is None:
                raise ContextOverflowError(
                    f"decode position {last} is past the context of {self.max_context} tokens"
                )
            raise ContextOverflowError(
                f"{extra} decode steps from position {last} run past the context of "
                f"{self.max_context} tokens; ask for fewer steps"
            )
        w = decode_width(k) if width is None else width
        if w < k:
            raise PartitionError(f"width {w} is smaller than the {k} slots asked for")
        pad = w - k
        if pad:
            fill = np.zeros(
                (pad, *x.shape[1:]),
                dtype=np.asarray(x).dtype if isinstance(x, np.ndarray) else x.dtype,
            )
            x = (
                np.concatenate([x, fill])
                if isinstance(x, np.ndarray)
                else jnp.concatenate([x, jnp.asarray(fill)])
            )
        pos_w = np.concatenate([pos, np.full(pad, -1)]).astype(np.int32)
        key_len = self.geom.key_length(int(pos.max()) + extra)
        return x, self._padded_rows(cache, slot_ids, w), pos_w, w, key_len

    def decode(
        self,
        cache: KVCache,
        inputs: Any,
        slots: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        *,
        width: int | None = None,
    ) -> tuple[KVCache, jax.Array]:
        """One decode step for the sessions in `slots` (any subset of the cache's slots).

        inputs: one token id per slot [k] (first partition) or hidden [k, hidden];
        positions [k]: each session's position, -1 for an entry to skip (its cache is
        untouched, its output finite but meaningless). The step computes `width` rows
        (default: k rounded up to a power of two). Returns hidden [k, hidden] or float32
        logits [k, vocab].
        """
        k = len(np.asarray(slots).reshape(-1))
        x, slot_w, pos_w, w, key_len = self._step_rows(cache, inputs, slots, positions, width)
        lengths = (pos_w >= 0).astype(np.int32)
        batch = x[:, None]
        cache, out = forward(
            self.params,
            cache,
            batch,
            slot_w,
            pos_w,
            lengths,
            shape=self.shape,
            key_len=key_len,
            out=OUT_LAST if self.spec.has_head else OUT_HIDDEN,
        )
        out = out if self.spec.has_head else out[:, 0]
        return cache, out if w == k else out[:k]

    def _settings(self, states: Sequence[SamplerState | None], k: int, w: int) -> tuple[Any, int]:
        if len(states) != k:
            raise PartitionError(f"need one sampler state per slot ({k}), got {len(states)}")
        padded = [*states, *([None] * (w - k))]
        vocab = self.config.vocab_size
        if is_plain_greedy(padded):
            return None, 0
        return row_settings(padded, vocab), batch_candidates(padded, vocab)

    def tail_step(
        self,
        cache: KVCache,
        inputs: Any,
        slots: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        states: Sequence[SamplerState | None],
        *,
        top_logprobs: int = 0,
        width: int | None = None,
    ) -> tuple[KVCache, TailTokens]:
        """Decode and sample in one compiled call on the last partition: token ids come
        back, the logits stay on the device.

        Arguments as decode, plus one SamplerState per slot (None for a skipped entry);
        top_logprobs > 0 also returns that many most likely tokens per slot. Active
        states advance by one step and observe their token.
        """
        if not self.spec.has_head:
            raise PartitionError("tail_step needs the partition holding the head (the last one)")
        if not 0 <= top_logprobs <= self.config.vocab_size:
            raise PartitionError(f"top_logprobs must be in [0, vocab], got {top_logprobs}")
        k = len(np.asarray(slots).reshape(-1))
        x, slot_w, pos_w, w, key_len = self._step_rows(cache, inputs, slots, positions, width)
        settings, candidates = self._settings(states, k, w)
        cache, toks, lps, top_ids, top_lps = tail(
            self.params,
            cache,
            x[:, None],
            slot_w,
            pos_w,
            settings,
            shape=self.shape,
            key_len=key_len,
            candidates=candidates,
            top_n=top_logprobs,
        )
        tokens = np.asarray(toks)[:k].astype(np.int64)
        active = pos_w[:k] >= 0
        advance([s if a else None for s, a in zip(states, active, strict=True)], tokens)
        return cache, TailTokens(
            tokens,
            np.asarray(lps)[:k].astype(np.float32),
            None if top_ids is None else np.asarray(top_ids)[:k].astype(np.int64),
            None if top_lps is None else np.asarray(top_lps)[:k].astype(np.float32),
        )

    def decode_steps(
        self,
        cache: KVCache,
        tokens: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        states: Sequence[SamplerState | None],
        steps: int,
        *,
        width: int | None = None,
    ) -> tuple[KVCache, np.ndarray, np.ndarray]:
        """`steps` decode steps with sampling on the device, for a partition holding the
        whole model (embedding and head): the fast path when one machine runs it all.

        tokens [k]: each session's last sampled token, fed at positions [k] (-1 for a
        skipped entry, whose state may be None) into `slots`; states: each session's
        SamplerState, sampled exactly as tail_step would step by step (same seeds and
        step counters). Every active session needs position + steps <= max_context.

        Returns the cache and numpy tokens int64 [k, steps] and logprobs float32
        [k, steps]; one host sync per call. Every step runs: a caller that meets a stop
        token inside the block discards the tokens after it (their cache rows lie beyond
        the session's position, so they are overwritten or never attended).
        """
        if not (self.spec.has_embedding and self.spec.has_head):
            raise PartitionError(
                "decode_steps needs a partition holding the embedding and the head; "
                "pipelines use decode() and tail_step() per step"
            )
        if steps < 1:
            raise PartitionError(f"decode_steps needs steps >= 1, got {steps}")
        if any(s is not None and s.allowed is not None for s in states):
            raise PartitionError("decode_steps cannot follow a constraint that changes every step; "
                                 "use tail_step one step at a time")
        k = len(np.asarray(slots).reshape(-1))
        x, slot_w, pos_w, w, key_len = self._step_rows(
            cache, tokens, slots, positions, width, steps
        )
        settings, candidates = self._settings(states, k, w)
        cache, toks, lps = decode_steps(
            self.params,
            cache,
            x,
            slot_w,
            pos_w,
            settings,
            shape=self.shape,
            key_len=key_len,
            steps=steps,
            candidates=candidates,
        )
        tokens_np = np.asarray(toks)[:k].astype(np.int64)
        logprobs_np = np.asarray(lps)[:k].astype(np.float32)
        active = pos_w[:k] >= 0
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
    attn_block: int | None = None,
    weights: str = NATIVE,
    kv_dtype: str | None = None,
    block_kernel: str | None = None,
) -> Partition:
    """Load one partition's weights from `source` (files or a byte-range callback).

    dtype: compute dtype (float32/bfloat16/float16); default: the checkpoint's.
    max_context: cap on the cache length; the model's max_position_embeddings otherwise.
    attn_block: keys per attention block (a power of two; see attention.py); default:
    the platform's (64 on CPU, 1024 on accelerators).
    weights: "native" keeps the matrices as stored (in `dtype`); "int8" quantizes every
    matrix per output row as it is loaded (quant.py: 0.25x the f32 bytes);
    norms and biases stay in `dtype`. With "native" on CPU a GGUF's block-format matrices
    stay as the file holds them (blocks.py); block_kernel overrides how ("ggml", "jax",
    or "dequantize": the compute dtype's arrays, as on other backends).
    kv_dtype: the KV cache's dtype (float32/float16/bfloat16); default ("auto"): float16
    beside float32 compute, else the compute dtype (config.resolve_kv_dtype).
    """
    check_weights(weights)
    if prefill_chunk < MIN_BUCKET or prefill_chunk & (prefill_chunk - 1):
        raise PartitionError(
            f"prefill_chunk must be a power of two >= {MIN_BUCKET}, got {prefill_chunk}"
        )
    if attn_block is not None and (attn_block < 1 or attn_block & (attn_block - 1)):
        raise PartitionError(f"attn_block must be a power of two, got {attn_block}")
    context = config.max_position_embeddings
    if max_context is not None:
        if max_context < 1:
            raise PartitionError(f"max_context must be positive, got {max_context}")
        context = min(context, max_context)
    chosen = resolve_dtype(config, dtype)
    kv = _kv_dtype(kv_dtype, chosen)  # refused before any weight is read
    params = load_params(source, config, spec, chosen, weights, block_kernel)
    return Partition(
        config, spec, params, chosen, context, prefill_chunk, attn_block, weights, kv
    )


def _kv_dtype(kv_dtype: str | None, compute_dtype: str) -> str:
    try:
        return resolve_kv_dtype(kv_dtype, compute_dtype)
    except ValueError as exc:
        raise PartitionError(str(exc)) from None
