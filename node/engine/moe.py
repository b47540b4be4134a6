"""Mixture-of-experts MLP (Qwen3-MoE): the router, the chosen experts' products, their params.

A sparse layer's MLP is E SwiGLU experts of width F (moe_intermediate_size) and a router
[E, H]. Each token (column of x [H, M], feature-major like transformer.py) goes to the k
experts with the highest softmax probability (float32, as transformers computes it), and
its output is their outputs weighted by those probabilities (renormalised to sum 1 when
norm_topk_prob), cast to the compute dtype before the weighting, as transformers does.

Only the chosen experts are computed, in one of two forms picked by the static token
count (measured on this 2-core CPU, H 1024, F 256, 32 experts, top-4, f32, ms per MLP):

- loop (M * k <= E: decode widths): a loop over the experts some token chose, in expert
  order, each on all M columns weighted per token (zero where not chosen). It reads each
  used expert once and sums in transformers' order. M=1: 0.81 ms, M=8: 5.7 ms.
- blocks (wider: prefill chunks): the M * k (token, expert) pairs sorted by expert and
  laid out in blocks of BLOCK columns, one expert per block (an expert's last block is
  padded); a loop runs the blocks in use. At most M * k + E * (BLOCK - 1) columns.
  M=128: 29 ms, M=512: 85 ms.

Rejected: every expert on every token (E / k times the work: M=512 377 ms, M=128 88 ms;
M=1 3.4 ms); gathering each token's k experts' matrices into one batched product (M=1
1.2 ms, M=8 42 ms: it copies M * k experts, and XLA CPU's batched matrix-vector product
is slow); `jax.lax.ragged_dot`, which XLA CPU computes for every group (256 rows over 32
groups: 85 ms, one group's 1.7 ms).

Weights: router `mlp.gate.weight` [E, H]; experts stacked as [E, F, H], [E, F, H],
[E, H, F], read either from one stacked tensor `mlp.experts.{gate,up,down}_proj` (GGUF
qwen3moe) or from transformers' per-expert `mlp.experts.N.{gate,up,down}_proj.weight`,
stacked on the host one layer at a time. int8 experts are QuantMatrix with q [E, rows,
cols] and scale [E, rows] (per expert and output row, as quant.py's per-row scheme).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.blocks import BlockMatrix, bmatmul, bmatmul_many
from node.engine.quant import QuantMatrix, quantize_host

# Columns per block in the block form: of 8, 16, 32 and 64, 16 was fastest for 128- and
# 512-token chunks (H 1024, F 256, 32 experts, top-4: 29 / 85 ms, 32 cols 30 / 95 ms).
BLOCK = 16


# Stacked experts: float, int8, or a GGUF's blocks [E, rows, row_bytes] (blocks.py).
Dense = jax.Array | QuantMatrix
Experts = Dense | BlockMatrix


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MoEParams:
    """One sparse layer's MLP: router [E, H] (always in the compute dtype: it decides
    the top-k, and is E/(3F) of the layer's expert bytes), experts stacked on axis 0."""

    router: jax.Array  # [E, H]
    wg: Experts  # gate [E, F, H]
    wu: Experts  # up [E, F, H]
    wd: Experts  # down [E, H, F]


def route(router: jax.Array, x: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Router on x [H, M] -> (expert ids int32 [M, k], weights [M, k] in x's dtype)."""
    logits = jax.lax.dot_general(router, x, (((1,), (0,)), ((), ())))  # [E, M]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=0).T  # [M, E]
    top, idx = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        top = top / jnp.sum(top, axis=1, keepdims=True)
    return idx.astype(jnp.int32), top.astype(x.dtype)


def _one(w: Dense, e: jax.Array) -> Dense:
    """Expert e of a stacked matrix: [rows, cols]."""
    if isinstance(w, QuantMatrix):
        return QuantMatrix(w.q[e], w.scale[e], w.compute_dtype, w.kernel)
    return w[e]


def _bmm(w: Dense, x: jax.Array) -> jax.Array:
    """Batched w [n, out, in] @ x [n, in, c] -> [n, out, c] in x's dtype."""
    dn = (((2,), (1,)), ((0,), (0,)))
    if not isinstance(w, QuantMatrix):
        return jax.lax.dot_general(w, x, dn)
    # Weight-only dequantization in the product (the scale commutes with it). The w8a8
    # kernel's int8 activations would need per-column scales per batch; the experts'
    # products are small, and an int8 weight still halves (bf16) or quarters the bytes.
    acc = jax.lax.dot_general(w.q.astype(x.dtype), x, dn, preferred_element_type=jnp.float32)
    return (acc * w.scale[:, :, None]).astype(x.dtype)


def _expand(w: Dense) -> Dense:
    if isinstance(w, QuantMatrix):
        return QuantMatrix(w.q[None], w.scale[None], w.compute_dtype, w.kernel)
    return w[None]


def _expert(moe: MoEParams, e: jax.Array, x: jax.Array) -> jax.Array:
    """Expert e's SwiGLU on x [H, c] -> [H, c]. GGUF blocks take ggml's products (gate and
    up in one call); the others a batched product of one."""
    if isinstance(moe.wg, BlockMatrix) and isinstance(moe.wu, BlockMatrix) and isinstance(moe.wd, BlockMatrix):
        g, u = bmatmul_many([_one_block(moe.wg, e), _one_block(moe.wu, e)], x)
        return bmatmul(_one_block(moe.wd, e), jax.nn.silu(g) * u)
    assert not isinstance(moe.wg, BlockMatrix) and not isinstance(moe.wu, BlockMatrix)
    assert not isinstance(moe.wd, BlockMatrix)
    g = _bmm(_expand(_one(moe.wg, e)), x[None])
    u = _bmm(_expand(_one(moe.wu, e)), x[None])
    return _bmm(_expand(_one(moe.wd, e)), jax.nn.silu(g) * u)[0]


def _one_block(w: BlockMatrix, e: jax.Array) -> BlockMatrix:
    return BlockMatrix(w.data[e], w.block_type, w.cols, w.compute_dtype, w.kernel)


def experts_blocks(moe: MoEParams, x: jax.Array, idx: jax.Array, w: jax.Array,
                   block: int = BLOCK) -> jax.Array:
    """The (token, expert) pairs sorted by expert into blocks of `block` columns, one
    expert per block; a loop runs the blocks in use. x [H, M], idx/w [M, k] -> [H, M]."""
    H, M = x.shape
    k = idx.shape[1]
    E = moe.router.shape[0]
    n = M * k
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pair ids sorted by expert
    counts = jnp.bincount(flat, length=E)
    padded = (counts + block - 1) // block * block
    pstart = jnp.cumsum(padded) - padded  # each expert's first column in the layout
    start = jnp.cumsum(counts) - counts  # ... and its first pair in `order`
    sorted_e = flat[order]
    rank = jnp.arange(n, dtype=jnp.int32) - start[sorted_e]
    col_of_sorted = pstart[sorted_e] + rank  # layout column of each sorted pair
    n_blocks_max = -(-(n + E * (block - 1)) // block)
    width = n_blocks_max * block
    # Layout: token id per column (M, an all-zero column, where padded).
    token_of_col = jnp.full((width,), M, jnp.int32).at[col_of_sorted].set(order // k)
    xz = jnp.concatenate([x, jnp.zeros((H, 1), x.dtype)], axis=1)
    xl = jnp.take(xz, token_of_col, axis=1)  # [H, width]
    ends = jnp.cumsum(padded)
    block_expert = jnp.minimum(
        jnp.searchsorted(ends, jnp.arange(n_blocks_max) * block, side="right"), E - 1
    ).astype(jnp.int32)
    used = ends[-1] // block

    def body(j: jax.Array, out: jax.Array) -> jax.Array:
        e = block_expert[j]
        xb = jax.lax.dynamic_slice_in_dim(xl, j * block, block, axis=1)
        yb = _expert(moe, e, xb)
        return jax.lax.dynamic_update_slice_in_dim(out, yb, j * block, axis=1)

    yl = jax.lax.fori_loop(0, used, body, jnp.zeros((H, width), x.dtype))
    col_of_pair = jnp.zeros((n,), jnp.int32).at[order].set(col_of_sorted)
    y = jnp.take(yl, col_of_pair, axis=1).reshape(H, M, k) * w[None]
    return jnp.sum(y, axis=2)


def experts_loop(moe: MoEParams, x: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """Each expert some token chose, on all M tokens, in expert order (transformers'
    order of summation), weighted per token (zero for a token that did not choose it):
    reads each used expert once. x [H, M], idx/w [M, k] -> [H, M]."""
    E, M = moe.router.shape[0], x.shape[1]
    coef = jnp.zeros((E, M), w.dtype).at[idx.T, jnp.arange(M)[None, :]].add(w.T)  # [E, M]
    chosen = jnp.zeros((E,), jnp.bool_).at[idx.reshape(-1)].set(True)
    size = min(E, idx.size)
    ids = jnp.nonzero(chosen, size=size, fill_value=0)[0]

    def body(i: jax.Array, out: jax.Array) -> jax.Array:
        e = ids[i]
        y = _expert(moe, e, x)
        return out + y * coef[e][None, :]

    return jax.lax.fori_loop(0, jnp.sum(chosen), body, jnp.zeros_like(x))


def moe_mlp(moe: MoEParams, x: jax.Array, k: int, norm_topk_prob: bool) -> jax.Array:
    """The sparse MLP on x [H, M] (already normed) -> [H, M]."""
    idx, w = route(moe.router, x, k, norm_topk_prob)
    E, M = moe.router.shape[0], x.shape[1]
    if M * k <= E:
        return experts_loop(moe, x, idx, w)
    return experts_blocks(moe, x, idx, w)


def stack_host(parts: list[np.ndarray]) -> np.ndarray:
    """Per-expert tensors [rows, cols] -> one [E, rows, cols] array (one host copy)."""
    out = np.empty((len(parts), *parts[0].shape), parts[0].dtype)
    for i, p in enumerate(parts):
        out[i] = p
    return out


def quantize_experts(w: np.ndarray, dtype: str, kernel: str) -> QuantMatrix:
    """int8 per expert and output row: [E, rows, cols] quantized as [E * rows, cols]."""
    E, rows, cols = w.shape
    q = quantize_host(w.reshape(E * rows, cols), dtype, kernel)
    return QuantMatrix(q.q.reshape(E, rows, cols), q.scale.reshape(E, rows), q.compute_dtype,
                       q.kernel)



def expert_names(prefix: str, experts: int, stacked: bool) -> list[str]:
    """Checkpoint names of a sparse layer's MLP (prefix "model.layers.N.mlp.")."""
    names = [prefix + "gate.weight"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        if stacked:
            names.append(prefix + f"experts.{proj}")
        else:
            names += [prefix + f"experts.{e}.{proj}.weight" for e in range(experts)]
    return names


def load_moe(
    read: Callable[[str, tuple[int, ...]], np.ndarray],
    has: Callable[[str], bool],
    prefix: str,
    shapes: tuple[int, int, int],
    put: Callable[[np.ndarray], jax.Array],
    quantize: Callable[[np.ndarray], QuantMatrix] | None,
    blocks: Callable[[str, tuple[int, ...]], BlockMatrix | None] | None = None,
) -> MoEParams:
    """Read one sparse layer's MLP (prefix "model.layers.N.mlp."): the router, and each
    expert matrix stacked [E, rows, cols] from the stacked tensor when the checkpoint has
    it, else from the per-expert ones (stacked on the host: one stacked matrix at a time).
    `read(name, shape)` returns the host array, `put` moves one to the device in the
    compute dtype, `quantize` (int8 weights) quantizes it per expert and row instead,
    `blocks(name, shape)` keeps a stacked GGUF tensor's blocks (None: not kept)."""
    E, H, F = shapes

    def matrix(proj: str, rows: int, cols: int) -> Experts:
        stacked = prefix + f"experts.{proj}"
        kept = blocks(stacked, (E, rows, cols)) if blocks is not None and has(stacked) else None
        if kept is not None:
            return kept
        if has(stacked):
            host = read(stacked, (E, rows, cols))
        else:
            host = stack_host(
                [read(prefix + f"experts.{e}.{proj}.weight", (rows, cols)) for e in range(E)]
            )
        return put(host) if quantize is None else jax.block_until_ready(quantize(host))

    return MoEParams(
        router=put(read(prefix + "gate.weight", (E, H))),
        wg=matrix("gate_proj", F, H),
        wu=matrix("up_proj", F, H),
        wd=matrix("down_proj", H, F),
    )
