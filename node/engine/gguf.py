"""GGUF weights for the engine: the tensor index under Hugging Face names, dequantizing,
and undoing llama.cpp's Q/K permutation.

``gguf_index`` parses a GGUF header through the byte-range reader (protocol/gguf.py)
and files each tensor under the name ``load_params`` asks for, so a partition reads
only its own tensors' byte ranges, exactly as from safetensors. ``decode`` turns a
tensor's bytes into a float array: F32/F16/BF16 as they lie, quantized blocks
(Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) through the ``gguf`` package's numpy
dequantizers (llama.cpp's own reference code, kept with the format), on the host
one tensor at a time; the cast to the compute dtype then runs on the device.

llama.cpp's converter permutes the rows of Q and K of llama-architecture models
(``convert_hf_to_gguf.py``'s ``permute``: within each head, the two rotary halves
are interleaved, for its RoPE that rotates adjacent pairs). The engine rotates
halves, as transformers does, so ``unpermute`` restores the original order; Qwen2
files are not permuted (llama.cpp runs them with NeoX RoPE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from node.engine.errors import WeightsError
from protocol.gguf import GGUFError, GGUFHeader, hf_name, parse_gguf
from protocol.safetensors import TensorInfo

__all__ = ["DEQUANTIZED", "GGUF_MAGIC", "GGUFWeights", "decode", "gguf_index", "unpermute"]

GGUF_MAGIC = b"GGUF"
_PLAIN = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
DEQUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFWeights:
    """What the engine needs of one GGUF file: tensors by HF name, and which to unpermute."""

    def __init__(self, header: GGUFHeader) -> None:
        self.header = header
        self.index: dict[str, TensorInfo] = {}
        for t in header.tensors:
            name = hf_name(t.name, header.architecture)
            if name is not None:
                self.index[name] = t
        md = header.metadata
        self.permuted: dict[str, int] = {}
        if header.architecture == "llama":
            heads = md.get("llama.attention.head_count")
            kv = md.get("llama.attention.head_count_kv", heads)
            if not isinstance(heads, int) or not isinstance(kv, int):
                raise WeightsError("the GGUF has no llama.attention.head_count")
            for name in self.index:
                if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                    self.permuted[name] = heads
                elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                    self.permuted[name] = kv


def gguf_index(read_range: Callable[[str, int, int], bytes], file_name: str, size: int) -> GGUFWeights:
    """Parse the GGUF header of ``file_name`` (``size`` bytes) through the byte-range reader."""
    try:
        header = parse_gguf(lambda off, n: read_range(file_name, off, n), size, file_name)
    except GGUFError as exc:
        raise WeightsError(str(exc)) from None
    return GGUFWeights(header)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation of w [heads * D, ...] (or a bias [heads * D])."""
    rows = w.shape[0]
    if rows % (2 * heads):
        raise WeightsError(f"cannot unpermute {rows} rows into {heads} heads")
    half = rows // heads // 2
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    )


def decode(info: TensorInfo, raw: np.ndarray | bytes) -> np.ndarray:
    """A GGUF tensor's bytes as an array of its numpy-order shape (float32 when quantized)."""
    data = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes | bytearray) else raw
    plain = _PLAIN.get(info.dtype)
    if plain is not None:
        return data.view(plain).reshape(info.shape)
    if info.dtype not in DEQUANTIZED:
        raise WeightsError(
            f"tensor {info.name!r} has GGUF type {info.dtype}, which the engine cannot dequantize "
            f"(supported: {', '.join((*_PLAIN, *DEQUANTIZED))}); use a file quantized with one of those"
        )
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = data.reshape(int(np.prod(info.shape[:-1], dtype=np.int64)), -1)
    out: Any = dequantize(rows, GGMLQuantizationType[info.dtype])
    return np.asarray(out, dtype=np.float32).reshape(info.shape)
