"""Traceable token samplers: a batch of logits rows, each row with its own settings.

Used inside the compiled tail step and decode_steps' device loop, and by sample_batch
(sampling.py, the host-side API). Rows with different settings share one compilation.

Fast path first: the top `candidates` tokens of each row (lax.top_k, 64 unless a row
asks a larger top_k), then temperature, top-k, top-p and min-p over those candidates only;
the whole vocabulary is never sorted. Sorting it twice per row cost 46-65 ms per row per
step on this CPU (Qwen2.5 vocabulary, 151936), more than the model; lax.top_k takes
about 2.5 ms for a batch of 8. Exact in every case:
- top_k <= candidates: the top-k set is inside the candidates;
- top_p without top_k: the nucleus is inside the candidates unless they hold less than
  top_p of the probability; such rows (rare: a flat distribution) take a full sort, in
  a branch that runs only when some row needs it;
- no top-k and no top-p (pure temperature, min-p): a Gumbel-max draw over the whole
  vocabulary, no sort, again in a branch that runs only when a row needs it.
Greedy is an argmax. The draw is Gumbel-max: argmax over the kept tokens of
logit / temperature + Gumbel noise, an exact sample of their softmax. The noise comes from
fold_in(PRNGKey(seed), step), indexed by candidate rank (by token id on the full-vocabulary
path); random bits are indexed by position, so a row's noise does not depend on how many
candidates the batch needs, and a row's token depends only on its own logits and
settings, never on the other rows.

Log-probabilities are those of the model's distribution (log-softmax of the raw logits),
not of the temperature-scaled, filtered one, matching what OpenAI-style APIs report.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.buckets import pow2_bucket

DEFAULT_CANDIDATES = 64


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSettings:
    """Per-row sampling settings as arrays [B] (seen [B, V]), ready for a jitted step.

    Built on the host with sampling.row_settings; `step` is each row's step counter for
    the next token, so a multi-step decode adds its loop index to it.
    """

    temperature: jax.Array | np.ndarray
    top_k: jax.Array | np.ndarray
    top_p: jax.Array | np.ndarray
    min_p: jax.Array | np.ndarray
    penalty: jax.Array | np.ndarray
    seen: jax.Array | np.ndarray
    seed: jax.Array | np.ndarray
    step: jax.Array | np.ndarray
    # The tokens each row may take, as a bitmask [B, ceil(V / 32)] int32 (bit t % 32 of
    # word t // 32; all ones when unconstrained): a grammar's mask (node/pipeline/grammar.py).
    allowed: jax.Array | np.ndarray


def candidate_count(top_ks: list[int], vocab: int) -> int:
    """Static candidate count for a batch: 64, or a power of two covering the largest
    top_k asked, never more than the vocabulary."""
    return min(pow2_bucket(max([DEFAULT_CANDIDATES, *top_ks])), vocab)


def apply_repetition_penalty(
    logits: jax.Array, seen: jax.Array, penalty: jax.Array | float
) -> jax.Array:
    """transformers' rule: seen tokens' logits are divided by `penalty` if positive, else multiplied."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def mask_words(vocab: int) -> int:
    """Words of an ``allowed`` bitmask row for a vocabulary of ``vocab`` tokens."""
    return (vocab + 31) // 32


def apply_allowed(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Logits [B, V] with the tokens a row's bitmask [B, W] leaves out at -inf."""
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    words = jnp.asarray(allowed, jnp.int32)[:, ids >> 5]
    return jnp.where(((words >> (ids & 31)) & 1) != 0, logits, -jnp.inf)


def greedy_rows(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Argmax token and its log-probability for every row of logits [B, V]."""
    logits = logits.astype(jnp.float32)
    tokens = jnp.argmax(logits, axis=-1)
    return tokens, _raw_logprob(logits, tokens)


def _raw_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def keep_candidates(
    vals: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    full_norm: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Which of one row's candidates [C] (sorted, descending, temperature applied) survive
    top-k, top-p and min-p, in transformers' order; and whether the candidates hold the
    whole nucleus.

    top_k <= 0 disables top-k; then top-p's probabilities are normalised over the whole
    vocabulary (full_norm: its logsumexp), else over the top-k set.
    """
    rank = jnp.arange(vals.shape[0])
    limited = top_k > 0
    keep = jnp.where(limited, rank < top_k, True)
    top_norm = jax.nn.logsumexp(jnp.where(keep, vals, -jnp.inf))
    probs = jnp.where(keep, jnp.exp(vals - jnp.where(limited, top_norm, full_norm)), 0.0)
    cum = jnp.cumsum(probs)
    keep &= (cum - probs) < top_p  # the smallest prefix reaching top_p: always >= 1 token
    fits = limited | (top_p >= 1) | (cum[-1] >= top_p)
    # min-p compares each token with the top one; normalisation cancels out. jnp.max, not
    # vals[0]: XLA turns top_k back into a full sort of the vocabulary (38 ms a row on
    # this CPU instead of 0.3 ms) when its output is sliced two different ways.
    keep &= vals >= jnp.max(vals) + jnp.log(min_p)
    return keep, fits


def _pick(vals: jax.Array, ids: jax.Array, keep: jax.Array, key: jax.Array) -> jax.Array:
    noise = jax.random.gumbel(key, vals.shape, jnp.float32)
    return ids[jnp.argmax(jnp.where(keep, vals + noise, -jnp.inf))]


def pick_from_candidates(
    xs: jax.Array, rows: RowSettings, keys: jax.Array, full_norm: jax.Array, count: int
) -> tuple[jax.Array, jax.Array]:
    """Candidate draw over the top `count` tokens of each row: (tokens, fits)."""
    vals, ids = jax.lax.top_k(xs, count)

    def one(
        v: jax.Array,
        i: jax.Array,
        k: jax.Array,
        p: jax.Array,
        mp: jax.Array,
        n: jax.Array,
        key: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        keep, fits = keep_candidates(v, k, p, mp, n)
        return _pick(v, i, keep, key), fits

    return jax.vmap(one)(
        vals,
        ids,
        jnp.asarray(rows.top_k),
        jnp.asarray(rows.top_p),
        jnp.asarray(rows.min_p),
        full_norm,
        keys,
    )


def _full_pick(xs: jax.Array, min_p: jax.Array, keys: jax.Array) -> jax.Array:
    """Gumbel-max over the whole vocabulary (no top-k, no top-p), min-p applied."""

    def one(x: jax.Array, mp: jax.Array, key: jax.Array) -> jax.Array:
        keep = x >= jnp.max(x) + jnp.log(mp)
        return _pick(x, jnp.arange(x.shape[0]), keep, key)

    return jax.vmap(one)(xs, min_p, keys)


def sample_rows(
    logits: jax.Array,
    rows: RowSettings,
    step_offset: jax.Array | int = 0,
    *,
    candidates: int = DEFAULT_CANDIDATES,
) -> tuple[jax.Array, jax.Array]:
    """Traceable: one token and its logprob per row of logits [B, V], row i at step
    rows.step[i] + step_offset, its key fold_in(PRNGKey(seed), step).

    `candidates` (static) must be at least every row's top_k (candidate_count).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    count = min(candidates, vocab)
    temperature = jnp.asarray(rows.temperature)
    greedy = temperature <= 0
    x = apply_repetition_penalty(logits, jnp.asarray(rows.seen), jnp.asarray(rows.penalty)[:, None])
    x = apply_allowed(x, jnp.asarray(rows.allowed))
    xs = x / jnp.where(greedy, 1.0, temperature)[:, None]
    step = jnp.asarray(rows.step, jnp.uint32) + jnp.asarray(step_offset, jnp.uint32)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(
        jnp.asarray(rows.seed, jnp.uint32), step
    )
    top_k = jnp.asarray(rows.top_k)
    top_p = jnp.asarray(rows.top_p)
    min_p = jnp.asarray(rows.min_p)
    unlimited = (top_k <= 0) & (top_p >= 1)
    full_norm = jax.nn.logsumexp(xs, axis=-1)
    picked, fits = pick_from_candidates(xs, rows, keys, full_norm, count)
    zeros = jnp.zeros_like(picked)
    whole = jax.lax.cond(
        jnp.any(unlimited & ~greedy), lambda: _full_pick(xs, min_p, keys), lambda: zeros
    )
    wide = jax.lax.cond(
        jnp.any(~fits & ~unlimited & ~greedy),
        lambda: pick_from_candidates(xs, rows, keys, full_norm, vocab)[0],
        lambda: zeros,
    )
    tokens = jnp.where(
        greedy, jnp.argmax(x, axis=-1), jnp.where(unlimited, whole, jnp.where(fits, picked, wide))
    )
    return tokens, _raw_logprob(logits, tokens)


def top_alternatives(logits: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The n most likely tokens of each row [B, V] and their raw log-probabilities [B, n]."""
    logits = logits.astype(jnp.float32)
    vals, ids = jax.lax.top_k(logits, n)
    return ids, vals - jax.nn.logsumexp(logits, axis=-1)[:, None]
