"""GGUF weights for the engine: the tensor index under Hugging Face names, dequantizing,
and undoing what llama.cpp's converter changed (Q/K row order, Gemma's norm offset).

``gguf_index`` parses a GGUF header through the byte-range reader (protocol/gguf.py)
and files each tensor under the name ``load_params`` asks for, so a partition reads
only its own tensors' byte ranges, exactly as from safetensors. ``decode`` turns a
tensor's bytes into a float array: F32/F16/BF16 as they lie, quantized blocks
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) through the ``gguf`` package's numpy
dequantizers (llama.cpp's own reference code, kept with the format), on the host
one tensor at a time; the cast to the compute dtype then runs on the device.

llama.cpp's converter permutes the rows of Q and K of llama-architecture models
(``convert_hf_to_gguf.py``'s ``permute``: within each head, the two rotary halves
are interleaved, for its RoPE that rotates adjacent pairs). The engine rotates
halves, as transformers does, so ``unpermute`` restores the original order. Only
``llama`` files are permuted: qwen2, qwen3, qwen3moe, gemma3 and phi3 run with NeoX
RoPE in llama.cpp (halves, like transformers), and their converters keep the rows.

Gemma's RMSNorm multiplies by (1 + w); llama.cpp's converter stores every Gemma 3 norm
weight (input, post-attention, pre- and post-feedforward, q/k and final) as 1 + w. The
engine follows transformers (it holds w and adds 1), so 1 is taken off again at load:
exact for stored values in [0.5, 2] (Sterbenz), and within an ulp of 1 otherwise.

Each tensor to change is listed in ``GGUFWeights.restore`` with a ``Restore``;
``restore`` applies it to the decoded array. Qwen3-MoE's experts are 3-D ([E, F, H]
gate and up, [E, H, F] down: one matrix per expert, stacked); ``decode`` dequantizes
them row by row like any matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from node.engine.errors import WeightsError
from protocol.gguf import GGUFError, GGUFHeader, hf_name, parse_gguf
from protocol.safetensors import TensorInfo

__all__ = ["DEQUANTIZED", "GGUF_MAGIC", "GGUFWeights", "Restore", "check_matrix_types", "decode", "gguf_index", "restore", "unpermute"]

GGUF_MAGIC = b"GGUF"
_PLAIN = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
DEQUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


_NORM_OFFSET_ARCHS = {"gemma3": 1.0}  # architecture -> what llama.cpp added to its norms


@dataclass(frozen=True)
class Restore:
    """How to bring one decoded GGUF tensor back to the Hugging Face checkpoint's values."""

    heads: int | None = None  # unpermute its rows into this many heads
    offset: float = 0.0  # subtract this (Gemma's norms are stored as 1 + w)


class GGUFWeights:
    """What the engine needs of one GGUF file: tensors by HF name, and how to restore them.

    ``restore`` lists every tensor the converter changed."""

    def __init__(self, header: GGUFHeader) -> None:
        self.header = header
        self.index: dict[str, TensorInfo] = {}
        for t in header.tensors:
            name = hf_name(t.name, header.architecture)
            if name is not None:
                self.index[name] = t
        md = header.metadata
        self.restore: dict[str, Restore] = {}
        if header.architecture == "llama":
            heads = md.get("llama.attention.head_count")
            kv = md.get("llama.attention.head_count_kv", heads)
            if not isinstance(heads, int) or not isinstance(kv, int):
                raise WeightsError("the GGUF has no llama.attention.head_count")
            for name in self.index:
                if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                    self.restore[name] = Restore(heads=heads)
                elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                    self.restore[name] = Restore(heads=kv)
        offset = _NORM_OFFSET_ARCHS.get(header.architecture or "")
        if offset is not None:
            for name in self.index:
                if name.endswith("norm.weight"):
                    self.restore[name] = Restore(offset=offset)


def gguf_index(read_range: Callable[[str, int, int], bytes], file_name: str, size: int) -> GGUFWeights:
    """Parse the GGUF header of ``file_name`` (``size`` bytes) through the byte-range reader."""
    try:
        header = parse_gguf(lambda off, n: read_range(file_name, off, n), size, file_name)
    except GGUFError as exc:
        raise WeightsError(str(exc)) from None
    return GGUFWeights(header)


def check_matrix_types(claimed: Iterable[tuple[str, str]], index: Mapping[str, TensorInfo],
                       from_gguf: Container[str]) -> None:
    """The GGUF types config.json claims (gguf_matrix_types, what the memory figures were
    planned from) against the file's own header: a member cannot make a plan count Q4
    bytes for matrices the file holds at F16."""
    for name, typ in claimed:
        info = index.get(name)
        if info is not None and name in from_gguf and info.dtype != typ:
            raise WeightsError(f"config.json's gguf_matrix_types says {name} is {typ[:16]!r}; the file holds "
                               f"{info.dtype}")


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


def restore(out: np.ndarray, how: Restore) -> np.ndarray:
    """A decoded tensor as the Hugging Face checkpoint had it (see ``Restore``); float32
    when an offset is taken off (w is small next to 1 + w: a 16-bit type would round it)."""
    if how.heads is not None:
        out = unpermute(out, how.heads)
    if how.offset:
        out = out.astype(np.float32) - np.float32(how.offset)
    return out


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
