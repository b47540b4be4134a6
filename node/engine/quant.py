"""int8 weights: symmetric per-output-channel quantization and the products that use it.

A matrix W [out, in] becomes q = round(W / s) in [-127, 127] (int8) with one float32
scale per output row, s = max|W[row]| / 127 (1 for an all-zero row). Rounding error is at
most s/2 per entry. A load quantizes on the host (quantize_host), in blocks of rows with
16 MB of temporaries, from the tensor as read (f32/bf16/f16, or a dequantized GGUF
tensor): it never holds a second copy, and only int8 bytes travel to the device.
quantize() is the same on the device, jitted.

Two products, chosen per backend when the weights are loaded (`default_kernel`):

- CPU, "w8a8": x [in, M] (feature-major, so one token per column) is quantized per
  column on the fly (dynamic symmetric int8, scale max|x[:, m]| / 127), then int8 x int8
  -> int32 (XLA CPU sends this to its YNNPACK int8 kernel), then rescaled by
  scale[out] * x_scale[M]. A single column is padded to two: XLA CPU lowers an int8
  matrix-vector product to a generic dot on int32 copies of the whole matrix, 14x slower
  (896x4864: 6.2 ms against 0.44 ms padded).
- elsewhere, "weight_only": q.astype(compute dtype) @ x accumulated in float32, times the
  row scales (which commute with the contraction), inside the jitted step so that XLA
  fuses the convert into the matmul. On XLA CPU it does not: it writes the whole
  converted matrix first, ~10x slower than either f32 or w8a8, hence the split.

Measured on this 2-core AVX2 VM (no VNNI), ms per matmul, weights cold (16 distinct
matrices per call, more than the 32 MB L3), best of interleaved rounds
(scripts/bench_quant.py):

    W [out, in]   rows    f32     w8a8   weight_only   f32 / w8a8
    896x4864         1   0.551   0.452     5.34          1.22x
                     2   0.541   0.441     5.34          1.23x
                     8   0.672   0.445     5.57          1.51x
                   512   25.0    25.7      31.9          0.97x
    4864x896         1   0.552   0.558     5.62          0.99x
                     2   0.663   0.556     5.49          1.19x
                     8   0.801   0.543     5.80          1.48x
                   512   26.5    31.7      33.8          0.83x
    896x896          1   0.109   0.098     1.03          1.11x
    151936x896       1   18.0    16.7      169           1.08x
    (the LM head)    8   25.4    16.4      179           1.55x

The int8 kernel costs the same for 1 to 8 columns (it computes a whole tile and is
compute-bound here: 4.4 MB of int8 in 0.45 ms, where f32 streams 17 MB in 0.55 ms), so
its gain grows with the rows. Whole Qwen2.5-0.5B shape, random weights, tail steps
(scripts/bench_engine.py --only int8): with one activation term, batch 1 0.91-0.98x the
f32 tok/s (the per-column activation quantization adds five small ops per product) and
8 slots 1.28x; with the two terms kept (below: one cost SmolLM2 +3.4% perplexity), batch
1 0.84x and 8 slots 0.79x (16 GEMM columns); weights 0.25x.
A reviewer's 2.3x at 2 rows did not reproduce with cold weights (hot, with the f32
matrix in L3, f32 is the faster one: 0.29 ms against 0.43 ms). The head is quantized too:
not slower at one row, 1.3-1.55x faster from two, and with tied embeddings it is the
embedding table, 136M of the model's 494M parameters, needed as int8 for 0.25x.

The embedding lookup takes the int8 rows it needs times their scales (take_rows), so a
tied table is stored once, as int8, for both uses.

Accuracy (tests/node/engine/test_int8.py, random checkpoints only): logits cosine to
float32 0.9998-0.99996 on the transformers-initialised tiny models, either kernel; on
the deliberately sensitive tinymodel ones (sharp attention) int8 picks float32's top
token at 62-88% of teacher-forced steps where bfloat16 weights do at 83-100%, the weight
rounding alone (weight-only shows the same). W8A8 also quantizes activations per
token: models with large outliers in a few activation channels (OPT-6.7B and up, per the
LLM.int8() and SmoothQuant papers) lose accuracy that way; weight-only does not. The GPU
path has not been measured here (no GPU in this task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.blocks import BlockMatrix
from node.engine.errors import PartitionError

NATIVE, INT8 = "native", "int8"
WEIGHT_FORMATS = (NATIVE, INT8)
W8A8, WEIGHT_ONLY = "w8a8", "weight_only"
KERNELS = (W8A8, WEIGHT_ONLY)
QMAX = 127

# w [out, in] contracted with x [in, M] on the axis w lies along.
_DN = (((1,), (0,)), ((), ()))


def check_weights(weights: str) -> str:
    """The weight format asked for, or a PartitionError naming the allowed ones."""
    if weights not in WEIGHT_FORMATS:
        raise PartitionError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    return weights


def default_kernel(platform: str | None = None) -> str:
    """The int8 product for a platform (default: this machine's JAX backend)."""
    return W8A8 if (platform or jax.default_backend()) == "cpu" else WEIGHT_ONLY


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantMatrix:
    """An int8 matrix with one float32 scale per output row: W ~= q * scale[:, None].

    `compute_dtype` is the dtype the matrix stands in for (products and embedding rows
    come out in it); `kernel` picks the product. Both are static (part of the pytree
    structure, hence of a compiled step's key); q and scale are the leaves.
    """

    q: jax.Array  # int8 [out, in]
    scale: jax.Array  # float32 [out]
    compute_dtype: str = field(metadata={"static": True})
    kernel: str = field(default=W8A8, metadata={"static": True})

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.compute_dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + int(self.scale.nbytes)


# A matrix as loaded: the compute dtype's array, int8 (above) or GGUF blocks (blocks.py).
Weight = jax.Array | QuantMatrix | BlockMatrix


def quantized_bytes(rows: int, cols: int) -> int:
    """Bytes of a QuantMatrix [rows, cols]: int8 entries plus a float32 scale per row."""
    return rows * cols + 4 * rows


# Rows quantized per call: blocks of about 4M entries keep the float32 temporaries at
# 16 MB. In one call over the whole matrix, XLA CPU upcast a bf16 input whole for the
# row maxima (its reduction kernel takes f32): a 545 MB temporary for the Qwen2.5
# embedding, 2.1 GB for Llama-3-8B's, on top of the tensor itself.
BLOCK_ENTRIES = 1 << 22


@partial(jax.jit, static_argnames=("rows",), donate_argnames=("q", "scale"))
def _quantize_rows(
    w: jax.Array, q: jax.Array, scale: jax.Array, start: jax.Array, rows: int
) -> tuple[jax.Array, jax.Array]:
    """Quantize w[start : start + rows] into q and scale (donated, updated in place)."""
    block = jax.lax.dynamic_slice_in_dim(w, start, rows, axis=0).astype(jnp.float32)
    amax = jnp.max(jnp.abs(block), axis=1)
    s = jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)
    qb = jnp.clip(jnp.round(block / s[:, None]), -QMAX, QMAX).astype(jnp.int8)
    q = jax.lax.dynamic_update_slice_in_dim(q, qb, start, axis=0)
    return q, jax.lax.dynamic_update_slice_in_dim(scale, s, start, axis=0)


def quantize(w: jax.Array, compute_dtype: Any, kernel: str = W8A8) -> QuantMatrix:
    """Quantize w [out, in] (any float dtype) per output row, on w's device, in blocks of
    rows (the last block overlaps the one before: its shared rows come out the same)."""
    out, cols = w.shape
    rows = max(1, min(out, BLOCK_ENTRIES // max(cols, 1)))
    q = jnp.zeros((out, cols), jnp.int8, device=w.device)
    scale = jnp.zeros((out,), jnp.float32, device=w.device)
    for start in range(0, out, rows):
        q, scale = _quantize_rows(w, q, scale, jnp.int32(min(start, out - rows)), rows)
    return QuantMatrix(q, scale, str(jnp.dtype(compute_dtype)), kernel)


def quantize_host(w: np.ndarray, compute_dtype: Any, kernel: str = W8A8) -> QuantMatrix:
    """quantize() on the host, for a tensor just read: in blocks of rows into an int8
    array, so a load holds the tensor as read plus one float32 block, and only int8
    bytes go to the device (a device copy of the float32 tensor first doubled the peak:
    SmolLM2's int8 load transient went from 232 MiB to 121 MiB)."""
    out, cols = w.shape
    rows = max(1, min(out, BLOCK_ENTRIES // max(cols, 1)))
    q = np.empty((out, cols), np.int8)
    scale = np.empty((out,), np.float32)
    for start in range(0, out, rows):
        block = np.asarray(w[start : start + rows], dtype=np.float32)
        amax = np.abs(block).max(axis=1)
        s = np.where(amax > 0, amax / np.float32(QMAX), np.float32(1.0)).astype(np.float32)
        q[start : start + rows] = np.clip(np.round(block / s[:, None]), -QMAX, QMAX)
        scale[start : start + rows] = s
    return QuantMatrix(jnp.asarray(q), jnp.asarray(scale), str(jnp.dtype(compute_dtype)), kernel)


def dequantize(w: QuantMatrix) -> jax.Array:
    """The matrix q * scale in its compute dtype."""
    return (w.q.astype(jnp.float32) * w.scale[:, None]).astype(w.dtype)


def take_rows(w: QuantMatrix, ids: jax.Array) -> jax.Array:
    """Rows `ids` of the dequantized matrix, [len(ids), in]: an int8 embedding lookup
    reads 1 byte per entry of the rows it needs, never the whole table."""
    rows = jnp.take(w.q, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(w.scale, ids)[:, None]).astype(w.dtype)


def _quantize_columns(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-column symmetric int8 of x [in, M]: (xq int8 [in, M], scale float32 [M])."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=0)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    return jnp.clip(jnp.round(xf / scale[None, :]), -QMAX, QMAX).astype(jnp.int8), scale


def _w8a8(w: QuantMatrix, x: jax.Array) -> jax.Array:
    """Activations in two int8 terms: x ~= s1 * q1 + s2 * q2, q2 quantizing what q1 left
    (error about max|x| / 127^2 instead of / 127). One int8 activation term cost SmolLM2
    +3.4% perplexity on the tests' text, the weights alone +0.07%: its activations have
    outlier channels. The second term rides in the GEMM's free columns (the int8 kernel
    costs the same for 2 to 16 columns here), so batch 1 pays nothing for it; a prefill
    chunk pays twice the int8 GEMM. (The weight-only product for prefill chunks made XLA
    CPU convert every layer's matrix to float32 up front: SmolLM2 held 409 MiB of
    temporaries for 129 MiB of int8 weights.)"""
    m = x.shape[1]
    q1, s1 = _quantize_columns(x)
    q2, s2 = _quantize_columns(x.astype(jnp.float32) - q1.astype(jnp.float32) * s1[None, :])
    acc = jax.lax.dot_general(w.q, jnp.concatenate([q1, q2], axis=1), _DN,
                              preferred_element_type=jnp.int32).astype(jnp.float32)
    y = acc[:, :m] * s1[None, :] + acc[:, m:] * s2[None, :]
    return y * w.scale[:, None]


def _weight_only(w: QuantMatrix, x: jax.Array) -> jax.Array:
    acc = jax.lax.dot_general(w.q.astype(x.dtype), x, _DN, preferred_element_type=jnp.float32)
    return acc * w.scale[:, None]


def qmatmul(w: QuantMatrix, x: jax.Array, out_dtype: Any = None) -> jax.Array:
    """w [out, in] @ x [in, M] -> [out, M] in out_dtype (default x's), by w.kernel.
    Both kernels accumulate exactly (int32) or in float32 and rescale in float32."""
    if w.kernel == W8A8:
        y = _w8a8(w, x)
    elif w.kernel == WEIGHT_ONLY:
        y = _weight_only(w, x)
    else:
        raise ValueError(f"unknown int8 kernel {w.kernel!r}; use one of {', '.join(KERNELS)}")
    return y.astype(out_dtype or x.dtype)
