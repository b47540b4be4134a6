"""GGUF block formats held as the file holds them, and the products that use them.

A GGUF matrix [N, K] in a block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K,
or F16/BF16) is a uint8 array [N, row_bytes]: each row is K / block_size blocks, each
block a few scales and packed integers (ggml's layout, which the file stores). A
``BlockMatrix`` keeps those bytes on the device, so a Q4_K_M model holds ~0.56-0.6 bytes
per parameter instead of 4 (float32) or 1 (int8).

Blocks are kept on CPU (weights.load_params); other backends dequantize at load. Two
kernels, chosen when the weights are loaded (``default_kernel``; "dequantize" asks for
no blocks at all):

- "ggml" (when ggml.py can load the kernels): at decode widths (up to
  ``GGML_MAX_COLUMNS`` columns) an XLA FFI call into ggml's own dot kernels
  (kernels/ggml_ffi.cc): each activation row is quantized once to the type's dot type
  (Q8_0/Q8_1/Q8_K), as llama.cpp does; ``bmatmul_many`` does q/k/v (or gate/up) in one
  call, the activations quantized once. Wider (prefill chunks): ggml dequantizes the
  matrix to float32, then XLA's GEMM.
- "jax" (the kernels cannot load): the blocks are dequantized inside the step by the
  pure-JAX decoders below (the ``gguf`` package's numpy reference, in jnp), then the
  product in the compute dtype. The same values as "ggml"'s wide path; ~10x slower than
  float32 weights at decode (XLA CPU writes the float32 matrix first).

At prefill, the dequantized matrix waits for the layer's input (an optimization
barrier ties them), so XLA cannot hoist every layer's float32 copy to the start of the
step: one layer's matrices are live at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.ggml import DEQUANTIZE_TARGET, MATMUL_MANY_TARGET, MATMUL_TARGET, unavailable

__all__ = ["BLOCK_KERNELS", "BLOCK_TYPES", "DEQUANTIZE", "GGML", "JAX", "BlockMatrix", "BlockType", "bmatmul",
           "bmatmul_many", "check_kernel", "decode_blocks", "default_kernel", "dequantize", "take_rows"]

GGML, JAX, DEQUANTIZE = "ggml", "jax", "dequantize"
BLOCK_KERNELS = (GGML, JAX, DEQUANTIZE)  # DEQUANTIZE: no blocks kept (load_params)
# Columns up to which a product calls ggml's dot kernels; wider ones dequantize and GEMM.
GGML_MAX_COLUMNS = 16
# Threads a ggml call may use: 0 is XLA's intra-op pool (this machine's cores).
GGML_THREADS = 0
_DN = (((1,), (0,)), ((), ()))


@dataclass(frozen=True)
class BlockType:
    name: str
    ggml_id: int  # ggml's enum ggml_type
    block_size: int  # values per block
    type_bytes: int  # bytes per block

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_bytes


BLOCK_TYPES = {t.name: t for t in (
    BlockType("F16", 1, 1, 2), BlockType("BF16", 30, 1, 2),
    BlockType("Q4_0", 2, 32, 18), BlockType("Q4_1", 3, 32, 20),
    BlockType("Q5_0", 6, 32, 22), BlockType("Q5_1", 7, 32, 24), BlockType("Q8_0", 8, 32, 34),
    BlockType("Q4_K", 12, 256, 144), BlockType("Q5_K", 13, 256, 176),
    BlockType("Q6_K", 14, 256, 210),
)}


def check_kernel(kernel: str) -> str:
    if kernel not in BLOCK_KERNELS:
        raise ValueError(f"block kernel must be one of {', '.join(BLOCK_KERNELS)}, got {kernel!r}")
    return kernel


def default_kernel(platform: str | None = None) -> str:
    """ggml's kernels on CPU where they load, else the pure-JAX path."""
    if (platform or jax.default_backend()) != "cpu":
        return JAX
    return GGML if unavailable() is None else JAX


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class BlockMatrix:
    """A matrix [..., N, K] as GGUF blocks: ``data`` uint8 [..., N, row_bytes].

    ``block_type``, ``cols`` (K), ``compute_dtype`` (what the matrix stands in for) and
    ``kernel`` are static (part of a compiled step's key); ``data`` is the leaf."""

    data: jax.Array
    block_type: str = field(metadata={"static": True})
    cols: int = field(metadata={"static": True})
    compute_dtype: str = field(metadata={"static": True})
    kernel: str = field(default=JAX, metadata={"static": True})

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.compute_dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.cols)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def _half(b: jax.Array, at: int) -> jax.Array:
    """The little-endian float16 at byte `at` of each block of b [n, bytes], as float32."""
    return jax.lax.bitcast_convert_type(b[:, at:at + 2], jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """[..., m] packed bytes -> [..., 2, m]: the low nibbles, then the high ones."""
    return jnp.stack([qs & 0x0F, qs >> 4], axis=-2)


def _high_bits(qh: jax.Array) -> jax.Array:
    """[n, 4] bytes holding 32 bits (little-endian) -> [n, 32] of 0/1, bit j at j."""
    word = jax.lax.bitcast_convert_type(qh, jnp.uint32)
    return ((word[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.uint8)


def _q4_0(b: jax.Array) -> jax.Array:
    q = _nibbles(b[:, 2:18]).reshape(-1, 32).astype(jnp.float32) - 8
    return _half(b, 0)[:, None] * q


def _q4_1(b: jax.Array) -> jax.Array:
    q = _nibbles(b[:, 4:20]).reshape(-1, 32).astype(jnp.float32)
    return _half(b, 0)[:, None] * q + _half(b, 2)[:, None]


def _q5_0(b: jax.Array) -> jax.Array:
    q = _nibbles(b[:, 6:22]).reshape(-1, 32) | (_high_bits(b[:, 2:6]) << 4)
    return _half(b, 0)[:, None] * (q.astype(jnp.float32) - 16)


def _q5_1(b: jax.Array) -> jax.Array:
    q = _nibbles(b[:, 8:24]).reshape(-1, 32) | (_high_bits(b[:, 4:8]) << 4)
    return _half(b, 0)[:, None] * q.astype(jnp.float32) + _half(b, 2)[:, None]


def _q8_0(b: jax.Array) -> jax.Array:
    q = jax.lax.bitcast_convert_type(b[:, 2:34], jnp.int8).astype(jnp.float32)
    return _half(b, 0)[:, None] * q


def _k_scales(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K/Q5_K's 12 scale bytes -> eight 6-bit scales and eight 6-bit mins, [n, 8] each."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(jnp.float32), mn.astype(jnp.float32)


def _q4_k(b: jax.Array) -> jax.Array:
    sc, mn = _k_scales(b[:, 4:16])
    scale, low = _half(b, 0)[:, None] * sc, _half(b, 2)[:, None] * mn  # [n, 8]
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32).astype(jnp.float32)
    return (scale[:, :, None] * q - low[:, :, None]).reshape(-1, 256)


def _q5_k(b: jax.Array) -> jax.Array:
    sc, mn = _k_scales(b[:, 4:16])
    scale, low = _half(b, 0)[:, None] * sc, _half(b, 2)[:, None] * mn
    ql = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    qh = (b[:, None, 16:48] >> jnp.arange(8, dtype=jnp.uint8)[None, :, None]) & 1  # [n, 8, 32]
    q = (ql | (qh << 4)).astype(jnp.float32)
    return (scale[:, :, None] * q - low[:, :, None]).reshape(-1, 256)


def _q6_k(b: jax.Array) -> jax.Array:
    scales = jax.lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(jnp.float32)
    d = _half(b, 208)[:, None] * scales  # [n, 16]
    ql = _nibbles(b[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    shifts = jnp.array([0, 2, 4, 6], jnp.uint8)[None, None, :, None]
    qh = ((b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    q = (ql | (qh << 4)).astype(jnp.float32) - 32
    return (d[:, :, None] * q.reshape(-1, 16, 16)).reshape(-1, 256)


def _plain(dtype: Any) -> Callable[[jax.Array], jax.Array]:
    def decode(b: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(b.reshape(-1, 1, 2), dtype).astype(jnp.float32)

    return decode


_DECODERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "F16": _plain(jnp.float16), "BF16": _plain(jnp.bfloat16),
}


def decode_blocks(data: jax.Array, block_type: str, cols: int) -> jax.Array:
    """Pure-JAX dequantization of data uint8 [..., N, row_bytes] -> float32 [..., N, cols]."""
    t = BLOCK_TYPES[block_type]
    lead = data.shape[:-1]
    blocks = data.reshape(-1, t.type_bytes)
    return _DECODERS[block_type](blocks).reshape(*lead, cols)


def _ggml_call(target: str, out: Any) -> Callable[..., Any]:
    """An FFI call into ggml's kernels (loaded on first use; an error if they cannot be)."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"the ggml kernel was asked for but {reason}")
    return jax.ffi.ffi_call(target, out)


def _ggml_dequantize(data: jax.Array, t: BlockType, cols: int) -> jax.Array:
    rows = int(np.prod(data.shape[:-1], dtype=np.int64))
    out = _ggml_call(DEQUANTIZE_TARGET, jax.ShapeDtypeStruct((rows, cols), jnp.float32))(
        data.reshape(rows, -1), ggml_type=np.int32(t.ggml_id), threads=np.int32(GGML_THREADS))
    return out.reshape(*data.shape[:-1], cols)


def dequantize(w: BlockMatrix, dtype: Any = None) -> jax.Array:
    """The matrix in `dtype` (default its compute dtype)."""
    t = BLOCK_TYPES[w.block_type]
    if w.kernel == GGML:
        out = _ggml_dequantize(w.data, t, w.cols)
    else:
        out = decode_blocks(w.data, w.block_type, w.cols)
    return out.astype(dtype or w.dtype)


def take_rows(w: BlockMatrix, ids: jax.Array) -> jax.Array:
    """Rows `ids` of the matrix, [len(ids), K], decoding only those rows (embeddings)."""
    rows = jnp.take(w.data, ids, axis=0)
    return decode_blocks(rows, w.block_type, w.cols).astype(w.dtype)


def bmatmul(w: BlockMatrix, x: jax.Array, out_dtype: Any = None) -> jax.Array:
    """w [N, K] @ x [K, M] -> [N, M] in out_dtype (default x's); see the module docstring."""
    out_dtype = out_dtype or x.dtype
    m = x.shape[1]
    if w.kernel == GGML and m <= GGML_MAX_COLUMNS and w.data.ndim == 2:
        y = _ggml_call(MATMUL_TARGET, jax.ShapeDtypeStruct((m, w.data.shape[0]), jnp.float32))(
            w.data, x.T.astype(jnp.float32), ggml_type=np.int32(BLOCK_TYPES[w.block_type].ggml_id),
            threads=np.int32(GGML_THREADS))
        return y.T.astype(out_dtype)
    # The float32 matrix may only be computed once x is (see the module docstring).
    data, x = jax.lax.optimization_barrier((w.data, x))
    wf = dequantize(BlockMatrix(data, w.block_type, w.cols, w.compute_dtype, w.kernel), x.dtype)
    return jax.lax.dot_general(wf, x, _DN, preferred_element_type=jnp.float32).astype(out_dtype)


def bmatmul_many(ws: list[BlockMatrix], x: jax.Array, out_dtype: Any = None) -> list[jax.Array]:
    """[w @ x for w in ws]; at decode widths with ggml's kernels one call for all (x is
    quantized once per dot type, and the threads share out the rows of every matrix: one
    call instead of three for q/k/v, two for gate/up)."""
    m = x.shape[1]
    if len(ws) < 2 or m > GGML_MAX_COLUMNS or any(w.kernel != GGML or w.data.ndim != 2 for w in ws):
        return [bmatmul(w, x, out_dtype) for w in ws]
    outs = _ggml_call(MATMUL_MANY_TARGET, [jax.ShapeDtypeStruct((m, w.data.shape[0]), jnp.float32) for w in ws])(
        x.T.astype(jnp.float32), *(w.data for w in ws),
        ggml_types=np.array([BLOCK_TYPES[w.block_type].ggml_id for w in ws], np.int32), threads=np.int32(GGML_THREADS))
    return [y.T.astype(out_dtype or x.dtype) for y in outs]
