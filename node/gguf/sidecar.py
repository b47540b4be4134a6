"""The Hugging Face files a GGUF implies: config.json and the tokenizer's files.

An import writes these next to the GGUF in the model's manifest (as small files,
stored as pieces even for an ``--in-place`` import), so every node reads a GGUF
model's configuration and tokenizer exactly like a safetensors model's.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

from node.gguf.config import SUPPORTED_TYPES, GGUFConfigError, hf_config
from node.gguf.tokenizer import tokenizer_files
from node.gguf.wordpiece import bert_tokenizer_files
from protocol.gguf import GGUFHeader, hf_name
from protocol.safetensors import TensorInfo

__all__ = ["check_types", "read_sidecars", "sidecar_files", "write_sidecars"]

_MAX_ROPE_FACTORS = 1 << 15  # head_dim / 2; real heads are 64 to 256 wide


def check_types(header: GGUFHeader) -> None:
    """GGUFConfigError naming the first tensor type the engine cannot dequantize."""
    for t in header.tensors:
        if t.dtype not in SUPPORTED_TYPES:
            raise GGUFConfigError(
                f"tensor {t.name!r} is {t.dtype}, which the engine cannot dequantize "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); use a file quantized with one of those"
            )


def _factors(info: TensorInfo | None, read: Callable[[int, int], bytes]) -> list[float] | None:
    """The values of a RoPE factor tensor (rope_freqs, rope_factors_short/long), None if absent.
    One factor per rotated pair of a head's dimensions: read no more than that can be."""
    if info is None:
        return None
    if info.dtype != "F32" or len(info.shape) != 1 or info.shape[0] > _MAX_ROPE_FACTORS:
        raise GGUFConfigError(
            f"{info.name} should be a 1-D F32 tensor of at most {_MAX_ROPE_FACTORS} factors, "
            f"got {info.dtype} {list(info.shape)}"
        )
    raw = read(info.offset, info.length)
    if len(raw) != info.length:
        raise GGUFConfigError(f"{info.name} runs past the end of the file (truncated?)")
    return list(struct.unpack(f"<{info.shape[0]}f", raw))


def sidecar_files(header: GGUFHeader, read: Callable[[int, int], bytes]) -> dict[str, bytes]:
    """{file name: bytes} for config.json, tokenizer.json, tokenizer_config.json and
    generation_config.json; ``read(offset, length)`` reads the GGUF (for the RoPE factor
    tensors: rope_freqs, or Phi-3's rope_factors_short and rope_factors_long)."""
    check_types(header)
    names = {t.name: t for t in header.tensors}
    factors = _factors(names.get("rope_freqs.weight"), read)
    short = _factors(names.get("rope_factors_short.weight"), read)
    long = _factors(names.get("rope_factors_long.weight"), read)
    if (short is None) != (long is None):
        raise GGUFConfigError(
            "the GGUF has only one of rope_factors_short.weight and rope_factors_long.weight; "
            "longrope needs both"
        )
    longrope = (short, long) if short is not None and long is not None else None
    plain = {t.dtype for t in header.tensors if t.dtype in ("F16", "BF16")}
    dtype = "bfloat16" if plain == {"BF16"} else "float32"
    config = hf_config(header.metadata, tied="output.weight" not in names, rope_factors=factors,
                       longrope=longrope, dtype=dtype)
    types = {}
    for t in header.tensors:
        name = hf_name(t.name, header.architecture)
        if name is not None and len(t.shape) in (2, 3) and t.dtype != "F32":
            types[name] = t.dtype
    if types:
        config["gguf_matrix_types"] = types
    files = {"config.json": json.dumps(config, indent=1).encode()}
    if header.metadata.get("tokenizer.ggml.model") == "bert":
        files.update(bert_tokenizer_files(header.metadata))
    else:
        files.update(tokenizer_files(header.metadata))
    return files


def read_sidecars(gguf_path: str | os.PathLike[str]) -> tuple[GGUFHeader, dict[str, bytes]]:
    """A local GGUF file's header and its sidecar files (sidecar_files over the file)."""
    from node.gguf.files import read_header

    path = Path(gguf_path)
    header = read_header(path)
    with path.open("rb") as fh:
        def read(offset: int, length: int) -> bytes:
            fh.seek(offset)
            return fh.read(length)

        return header, sidecar_files(header, read)


def write_sidecars(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write the GGUF's sidecar files into ``out_dir`` (made if absent) and return it: a
    directory the engine's ``load_config`` and ``Tokenizer.from_model_dir`` read (scripts
    and tests that load a GGUF without a store)."""
    out = Path(out_dir)
    _, files = read_sidecars(gguf_path)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out
