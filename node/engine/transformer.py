"""The transformer math of one partition, feature-major: activations are [features, rows].

Owns the norms, RoPE, the decoder layer (writing its keys and values into the cache,
then attending), the embedding lookup and the LM head. Traceable functions only; the
compiled steps that call them are steps.py's.

Feature-major because the weights stay as the checkpoint stores them, [out, in], and
y = W @ x then contracts W on the axis it lies along. It is also the faster product on
XLA CPU: measured on this 2-core machine (Qwen2.5-0.5B matrices, f32), W[9728, 896] @
x[896, 8] takes 1.4 ms where x[8, 896] @ W.T takes 2.7 ms, and the [151936, 896] head
26 ms against 47 ms; at one row 0.71 ms against 0.94 ms.

Rows are sessions times tokens: column b * n + t is token t of row b. Each layer writes
its new keys and values to (slot, position) with drop-mode scatters, so rows whose write
index is out of range (padding, idle slots) write nothing, then attends (attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from node.engine.attention import attend
from node.engine.blocks import BlockMatrix, bmatmul, bmatmul_many
from node.engine.blocks import take_rows as take_block_rows
from node.engine.cache import CacheGeometry
from node.engine.config import ModelConfig
from node.engine.moe import moe_mlp
from node.engine.quant import QuantMatrix, Weight, qmatmul, take_rows
from node.engine.weights import LayerParams, PartitionParams


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Rows:
    """Where the B x n rows of a step belong: built inside the step from its arguments.

    slots [B] (an out-of-range id for padding rows: their writes are dropped);
    q_pos [B, n] each token's position, -1 where the token is padding or the row idle;
    write [B, n] the cache row each token's key goes to, out of range to drop it;
    last_pos [B] the furthest position of each row's slot after this step.
    """

    slots: jax.Array
    q_pos: jax.Array
    write: jax.Array
    last_pos: jax.Array


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm over the feature axis (0) of x [H, M]; Gemma's weights apply as (1 + w)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=0, keepdims=True) + eps)
    if plus_one:
        # Gemma multiplies in float32 and casts after (transformers' Gemma3RMSNorm).
        return (y * (1.0 + w.astype(jnp.float32))[:, None]).astype(x.dtype)
    # transformers normalises in float32 and casts back before the weight multiply.
    return w[:, None] * y.astype(x.dtype)


def head_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm of each head of x [heads, D, M] over D (Qwen3's and Gemma 3's q/k norms)."""
    h, d, m = x.shape
    return jnp.transpose(
        rms_norm(jnp.transpose(x, (1, 0, 2)).reshape(d, h * m), w, eps, plus_one).reshape(d, h, m),
        (1, 0, 2),
    )


def linear(w: Weight, x: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """w [out, in] @ x [in, M] (+ b [out]); an int8 w takes its kernel (quant.py), GGUF
    blocks theirs (blocks.py)."""
    if isinstance(w, QuantMatrix):
        y = qmatmul(w, x)
    elif isinstance(w, BlockMatrix):
        y = bmatmul(w, x)
    else:
        y = jax.lax.dot_general(w, x, (((1,), (0,)), ((), ())))
    return y if b is None else y + b[:, None]


def linears(ws: list[Weight], x: jax.Array, bs: list[jax.Array | None]) -> list[jax.Array]:
    """[linear(w, x, b) for w, b], as one product where the weights are GGUF blocks
    (blocks.bmatmul_many: q/k/v or gate/up share the activations' quantization)."""
    blocks = [w for w in ws if isinstance(w, BlockMatrix)]
    if len(blocks) < 2 or len(blocks) != len(ws):
        return [linear(w, x, b) for w, b in zip(ws, bs, strict=True)]
    ys = bmatmul_many(blocks, x)
    return [y if b is None else y + b[:, None] for y, b in zip(ys, bs, strict=True)]


def rope_tables(
    cfg: ModelConfig,
    positions: jax.Array,
    dtype: Any,
    sliding: bool = False,
    max_context: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """cos and sin [rope_dim, M] for the positions [M] of the rows, with a sliding (local)
    layer's RoPE when `sliding`.

    longrope (Phi-3) has short factors for sequences within the original context and
    long ones past it. transformers switches by the sequence's length and, on the step
    that crosses, recomputes the whole cache with the long factors (Phi3's
    prepare_inputs_for_generation drops it); a cache cannot be re-rotated here, so the
    choice is made once, by the context the partition is loaded with (llama.cpp's rule,
    by n_ctx): long past the original context, short within it. Within it both agree with
    transformers; past it, transformers' answer for any sequence longer than the
    original context."""
    _, scaling = cfg.rope_for(sliding)
    long, factor = False, 1.0
    if scaling is not None and scaling.rope_type == "longrope":
        long = max_context > scaling.original_max_position_embeddings
        factor = scaling.attention_factor
    freqs = jnp.asarray(cfg.inv_freq(sliding, long=long))
    angles = freqs[:, None] * positions.astype(jnp.float32)[None, :]  # [D/2, M]
    emb = jnp.concatenate([angles, angles], axis=0)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [heads, D, M] (rotate_half convention, as transformers); with partial
    rotary (cos shorter than D) only the first features rotate, the rest pass."""
    rot = cos.shape[0]
    if rot < x.shape[1]:
        return jnp.concatenate([apply_rope(x[:, :rot], cos, sin), x[:, rot:]], axis=1)
    half = x.shape[1] // 2
    rotated = jnp.concatenate([-x[:, half:], x[:, :half]], axis=1)
    return x * cos[None] + rotated * sin[None]


def _activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def layer_forward(
    cfg: ModelConfig,
    geom: CacheGeometry,
    layer: LayerParams,
    k_cache: jax.Array,
    v_cache: jax.Array,
    x: jax.Array,
    rows: Rows,
    rope: tuple[jax.Array, jax.Array],
    key_len: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer on x [H, B*n]; returns x and the layer's updated caches. `geom`,
    `rows`, `rope` and `key_len` are those of the layer's kind (full or sliding)."""
    B, n = rows.q_pos.shape
    kvh, D = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // kvh
    eps, plus = cfg.rms_norm_eps, cfg.norm_plus_one
    cos, sin = rope
    h = rms_norm(x, layer.ln1, eps, plus)
    q, k, v = linears([layer.wq, layer.wk, layer.wv], h, [layer.bq, layer.bk, layer.bv])
    q, k, v = q.reshape(cfg.num_heads, D, -1), k.reshape(kvh, D, -1), v.reshape(kvh, D, -1)
    if layer.q_norm is not None and layer.k_norm is not None:
        q, k = head_norm(q, layer.q_norm, eps, plus), head_norm(k, layer.k_norm, eps, plus)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Scatter rows: [B*n, kvh, D] at (slot, :, write index, :).
    slot_idx = jnp.repeat(rows.slots, n)
    write = rows.write.reshape(-1)
    # Rounded to the cache's dtype (kv_dtype) as they are stored.
    k_new = jnp.transpose(k, (2, 0, 1)).astype(k_cache.dtype)
    v_new = jnp.transpose(v, (2, 0, 1)).astype(v_cache.dtype)
    k_cache = k_cache.at[slot_idx, :, write].set(k_new, mode="drop")
    v_cache = v_cache.at[slot_idx, :, write].set(v_new, mode="drop")
    # [H_q, D, B*n] -> [B, kvh, g, n, D] for attention, and back.
    qb = jnp.transpose(q.reshape(kvh, g, D, B, n), (3, 0, 1, 4, 2))
    out = attend(
        geom, qb, k_cache, v_cache, rows.slots, rows.q_pos, rows.last_pos, key_len,
        scale=cfg.query_scale, softcap=cfg.attn_softcap,
    )
    attn = jnp.transpose(out, (1, 2, 4, 0, 3)).reshape(cfg.q_size, B * n)
    attn = linear(layer.wo, attn, layer.bo)
    if layer.ln_pre_mlp is not None and layer.ln_post_mlp is not None:
        # Gemma: post-attention norm on the attention's output, and norms around the MLP.
        x = x + rms_norm(attn, layer.ln2, eps, plus)
        h = rms_norm(x, layer.ln_pre_mlp, eps, plus)
        return x + rms_norm(_mlp(cfg, layer, h), layer.ln_post_mlp, eps, plus), k_cache, v_cache
    x = x + attn
    h = rms_norm(x, layer.ln2, eps, plus)
    return x + _mlp(cfg, layer, h), k_cache, v_cache


def _mlp(cfg: ModelConfig, layer: LayerParams, h: jax.Array) -> jax.Array:
    """The gated MLP: down(act(gate(h)) * up(h)), or a sparse layer's experts (moe.py)."""
    if layer.moe is not None:
        return moe_mlp(layer.moe, h, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    assert layer.wg is not None and layer.wu is not None and layer.wd is not None
    gate, up = linears([layer.wg, layer.wu], h, [None, None])
    return linear(layer.wd, _activation(cfg, gate) * up)


def embed(cfg: ModelConfig, params: PartitionParams, ids: jax.Array) -> jax.Array:
    """Token ids [M] (already range-checked on the host) -> hidden [H, M] (times Gemma's
    embedding scale, rounded to the table's dtype as transformers does)."""
    assert params.embed is not None
    if isinstance(params.embed, QuantMatrix):
        x = take_rows(params.embed, ids).T
    elif isinstance(params.embed, BlockMatrix):
        x = take_block_rows(params.embed, ids).T
    else:
        x = jnp.take(params.embed, ids, axis=0).T
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, jnp.float32).astype(x.dtype)
    return x


def pooled_last(cfg: ModelConfig, params: PartitionParams, x: jax.Array) -> jax.Array:
    """Final norm on x [H, M] (each row's last token) -> L2-normalized float32 [M, H]: a
    decoder's embedding. The last token is the only one that has attended to the whole
    input (causal attention), so it is what decoder embedding models (e5-mistral, Qwen3-
    Embedding, gte-Qwen2) pool."""
    assert params.final_norm is not None
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps, cfg.norm_plus_one).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(h * h, axis=0, keepdims=True))
    return (h / jnp.maximum(norm, 1e-12)).T


def head_logits(cfg: ModelConfig, params: PartitionParams, x: jax.Array) -> jax.Array:
    """Final norm and LM head on x [H, M] -> float32 logits [M, V].

    The head's matmul accumulates and outputs float32 whatever the compute dtype: a bf16
    output rounded the logits to 8 bits of mantissa, enough to flip greedy near-ties. An
    int8 table accumulates in int32 (w8a8) or float32 and is rescaled in float32.
    """
    assert params.final_norm is not None
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    table = params.head if params.head is not None else params.embed
    assert table is not None
    if isinstance(table, QuantMatrix):
        logits = qmatmul(table, h, out_dtype=jnp.float32)
    elif isinstance(table, BlockMatrix):
        logits = bmatmul(table, h, out_dtype=jnp.float32)
    else:
        if table.dtype != jnp.float32 and jax.default_backend() == "cpu":
            # XLA CPU's generic dot has no bf16 x bf16 -> f32 kernel (only some fused dots
            # do); multiply in f32 there, exact for bf16 inputs. bf16 on CPU is slow anyway.
            table, h = table.astype(jnp.float32), h.astype(jnp.float32)
        logits = jax.lax.dot_general(
            table, h, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    # The barrier keeps the transpose a separate copy: fused with it, XLA CPU computes the
    # product as x.T @ W.T, 4.4x slower for 8 rows of the Qwen2.5 head (110 ms vs 25 ms).
    return jax.lax.optimization_barrier(logits).T
