"""Attention over the slot-pool KV cache, walking the keys block by block.

Queries q [B, kv_heads, group, n, head_dim] belong to B rows (sessions), each with n
tokens; row b reads the cache rows of slot slots[b]. Keys are visited in blocks of
`geom.block` positions with an online softmax (running max, running sum, rescaled
accumulator), up to `key_len` positions: the bucket of the longest active row, so the
cost follows what the sessions hold, not the context the cache could hold.

Why blocks rather than one softmax over `key_len` keys:
- bits do not depend on the key bucket. A block a row cannot see is exactly a no-op (its
  probabilities are exp(MASK - max) = 0, the correction exp(0) = 1), and every block a
  row sees is computed with the same shapes whatever the bucket. So a session's numbers
  do not change with the other rows' lengths (batch composition) or on replay;
- temporaries are [B, heads, n, block] per step, not [B, heads, n, key_len]: a 512-token
  prefill at 32k context needs a few MiB of scores, not GiB.

The mask value is finite: a row that sees no key (an idle slot, position -1) gets the
mean of the first block's values instead of NaN, so nothing NaN leaves a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from node.engine.cache import CacheGeometry

# Finite and far below any real score, so exp(MASK - real max) underflows to exactly 0.
MASK = -1e30


def _block_rows(cache: jax.Array, slots: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """Rows [start, start + size) of each row's slot: [B, kv_heads, size, head_dim]."""
    _, heads, _, dim = cache.shape

    def one(slot: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(cache, (slot, 0, start, 0), (1, heads, size, dim))[0]

    return jax.vmap(one)(slots)


def _key_positions(geom: CacheGeometry, idx: jax.Array, last_pos: jax.Array) -> jax.Array:
    """Position held at cache rows idx [block] for each row: [B, block] (negative: none).

    Without a ring, row i holds position i. With one, row i holds the latest position
    congruent to i that the slot has reached (last_pos).
    """
    if not geom.ring:
        return jnp.broadcast_to(idx[None], (last_pos.shape[0], idx.shape[0]))
    e = last_pos[:, None]
    return e - jnp.mod(e - idx[None], geom.length)


def attend(
    geom: CacheGeometry,
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slots: jax.Array,
    q_pos: jax.Array,
    last_pos: jax.Array,
    key_len: int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal (and sliding-window) attention of q against the cached keys.

    q [B, kvh, g, n, D]; caches [slots, kvh, length, D], already holding this step's keys;
    slots [B]; q_pos [B, n] each query's position (-1: padding or idle, sees nothing);
    last_pos [B] the furthest position written to each row's slot. Returns [B, kvh, g, n, D]
    in q's dtype. scale: of the scores (default head_dim ** -0.5); softcap: scores become
    cap * tanh(scores / cap) (Gemma 2's attention soft-capping).
    """
    B, kvh, g, n, D = q.shape
    block = geom.block
    scale = D**-0.5 if scale is None else scale
    offsets = jnp.arange(block, dtype=jnp.int32)
    dt = q.dtype

    def step(
        j: jax.Array | int, carry: tuple[jax.Array, jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        m, s_sum, acc = carry
        start = jnp.asarray(j, jnp.int32) * block
        kb = _block_rows(k_cache, slots, start, block)
        vb = _block_rows(v_cache, slots, start, block)
        if kb.dtype != dt:
            # A narrower cache (kv_dtype) is read back into the compute dtype block by
            # block: XLA CPU has no fast float16 x float16 -> float32 dot, and rounding q
            # and the probabilities to the cache's dtype would add error (see the README).
            kb, vb = kb.astype(dt), vb.astype(dt)
        scores = jnp.einsum("bkgnd,bktd->bkgnt", q, kb, preferred_element_type=jnp.float32)
        scores = scores * scale
        if softcap is not None:
            scores = jnp.tanh(scores / softcap) * softcap
        kpos = _key_positions(geom, start + offsets, last_pos)[:, None, :]  # [B, 1, block]
        qp = q_pos[:, :, None]  # [B, n, 1]
        seen = (kpos >= 0) & (kpos <= qp)
        if geom.window is not None:
            seen &= kpos > qp - geom.window
        scores = jnp.where(seen[:, None, None], scores, MASK)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        correction = jnp.exp(m - m_new)
        probs = jnp.exp(scores - m_new[..., None])
        s_sum = s_sum * correction + jnp.sum(probs, axis=-1)
        pv = jnp.einsum(
            "bkgnt,bktd->bkgnd", probs.astype(dt), vb, preferred_element_type=jnp.float32
        )
        acc = acc * correction[..., None] + pv
        return m_new, s_sum, acc

    carry = (
        jnp.full((B, kvh, g, n), MASK, jnp.float32),
        jnp.zeros((B, kvh, g, n), jnp.float32),
        jnp.zeros((B, kvh, g, n, D), jnp.float32),
    )
    # Always a real loop of at least two trips (CacheGeometry.key_length): XLA inlines a
    # one-trip loop and fuses it with its neighbours, and XLA CPU contracts a * b + c into
    # an FMA wherever the ops share a fusion, so the same block rounded differently at one
    # block than inside a longer walk. One loop body for every bucket: the same bits.
    carry = jax.lax.fori_loop(0, key_len // block, step, carry)
    _, s_sum, acc = carry
    return (acc / s_sum[..., None]).astype(q.dtype)
