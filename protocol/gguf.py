"""The GGUF header: a model's metadata and where each tensor lies, checked and bounded.

GGUF (llama.cpp's format, and what Ollama stores) is::

    "GGUF" | u32 version (2 or 3) | u64 tensor count | u64 metadata count
    metadata: (string key, u32 type, value) * count
    tensor infos: (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset) * count
    padding to ``general.alignment`` (default 32) | tensor data

with strings as u64 length + UTF-8 bytes, all little-endian. ``parse_gguf`` reads
the header through ``read(offset, length) -> bytes`` (a local file, or pieces of the
store), so nothing but the header is read. It returns the metadata as plain Python
values (arrays as lists) and every tensor as a ``TensorInfo`` with an absolute byte
range, its ggml type name as dtype ("F32", "Q4_K", ...) and its shape in numpy
order (GGUF lists the fastest dimension first: a [out, in] matrix is stored with
dims (in, out)).

Everything a hostile file could use to make a reader allocate is capped before it
is read: header bytes, counts, string and array lengths, dimensions; a tensor
whose range runs past the file, overlaps another, or is misaligned is refused.
Pure: bytes in, header out (the gguf package's reader memory-maps a whole local
file, which cannot read through the piece store, and trusts the counts it reads).
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.safetensors import TensorInfo

__all__ = [
    "GGML_TYPES",
    "MAX_HEADER_BYTES",
    "GGUFError",
    "GGUFHeader",
    "hf_name",
    "parse_gguf",
    "tensor_bytes",
]

MAGIC = b"GGUF"
# The largest real headers are vocabularies: Qwen2.5's 151,936 tokens and 151,387 merges
# take about 7 MB; Gemma's 262k tokens with scores about 12 MB.
MAX_HEADER_BYTES = 128 * 2**20
MAX_METADATA = 1 << 16
MAX_TENSORS = 1 << 16
MAX_STRING = 16 * 2**20
MAX_ARRAY = 1 << 24
MAX_DIMS = 4
_CHUNK = 1 << 20

# ggml type id -> (name, elements per block, bytes per block), from ggml.h / gguf-py.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
_TYPE_BY_NAME = {name: (block, size) for name, block, size in GGML_TYPES.values()}

# Metadata value types: id -> struct format for the scalar ones.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _F32 = 8, 9, 6


def _short_f32(value: float) -> float:
    """The shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06):
    metadata read back as it was written."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return value


class GGUFError(ValueError):
    """A file that is not a usable GGUF file (the message says why)."""


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int  # absolute offset of the tensor data

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ggml type ``dtype`` and numpy-order ``shape``; GGUFError if the
    type is unknown or the rows are not whole blocks."""
    found = _TYPE_BY_NAME.get(dtype)
    if found is None:
        raise GGUFError(f"unknown ggml type {dtype!r}")
    block, size = found
    count = math.prod(shape)
    row = shape[-1] if shape else 1
    if row % block:
        raise GGUFError(f"a {dtype} tensor's rows must be whole blocks of {block}, got rows of {row}")
    return count // block * size


class _Cursor:
    """Sequential reads over ``read(offset, length)``, in chunks, within the header cap."""

    def __init__(self, read: Callable[[int, int], bytes], file_size: int | None, name: str) -> None:
        self.read, self.name = read, name
        self.limit = MAX_HEADER_BYTES if file_size is None else min(MAX_HEADER_BYTES, file_size)
        self.file_size = file_size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next byte

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.limit:
            if self.file_size is not None and end > self.file_size:
                raise GGUFError(f"{self.name}: the header runs past the end of the file (truncated?)")
            raise GGUFError(f"{self.name}: a GGUF header over {MAX_HEADER_BYTES} bytes is implausible")
        while end > self.base + len(self.buf):
            have = self.base + len(self.buf)
            want = min(max(_CHUNK, end - have), self.limit - have)
            got = self.read(have, want)
            if not got:
                raise GGUFError(f"{self.name}: the header runs past the end of the file (truncated?)")
            self.buf = self.buf[self.pos - self.base :] + got
            self.base = self.pos
        start = self.pos - self.base
        self.pos = end
        return self.buf[start : start + n]

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self, what: str) -> str:
        length = self.unpack("Q")
        if length > MAX_STRING:
            raise GGUFError(f"{self.name}: {what} claims {length} bytes; at most {MAX_STRING}")
        raw = self.take(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, key: str, depth: int = 0) -> Any:
        if kind == _F32:
            return _short_f32(self.unpack("f"))
        fmt = _SCALARS.get(kind)
        if fmt is not None:
            return self.unpack(fmt)
        if kind == _STRING:
            return self.string(f"the value of {key!r}")
        if kind == _ARRAY and depth < 2:
            item, count = self.unpack("I"), self.unpack("Q")
            if count > MAX_ARRAY:
                raise GGUFError(f"{self.name}: {key!r} claims {count} items; at most {MAX_ARRAY}")
            item_fmt = _SCALARS.get(item)
            if item_fmt is not None:
                size = struct.calcsize("<" + item_fmt)
                data = self.take(size * count)
                return list(struct.unpack(f"<{count}{item_fmt}", data))
            return [self.value(item, key, depth + 1) for _ in range(count)]
        raise GGUFError(f"{self.name}: metadata {key!r} has unknown value type {kind}")


def parse_gguf(read: Callable[[int, int], bytes], file_size: int | None, name: str = "model.gguf") -> GGUFHeader:
    """The header of a GGUF file read through ``read``; ``file_size`` None when the reader
    does not know it (tensor ranges are then checked by the reads themselves)."""
    cur = _Cursor(read, file_size, name)
    if cur.take(4) != MAGIC:
        raise GGUFError(f"{name} is not a GGUF file (it does not start with 'GGUF')")
    version = cur.unpack("I")
    if version not in (2, 3):
        raise GGUFError(f"{name}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_meta = cur.unpack("Q"), cur.unpack("Q")
    if n_tensors > MAX_TENSORS or n_meta > MAX_METADATA:
        raise GGUFError(f"{name}: {n_tensors} tensors and {n_meta} metadata entries are implausible")
    metadata: dict[str, Any] = {}
    for _ in range(n_meta):
        key = cur.string("a metadata key")
        if key in metadata:
            raise GGUFError(f"{name}: metadata {key!r} appears twice")
        metadata[key] = cur.value(cur.unpack("I"), key)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16 \
            or alignment & (alignment - 1):
        raise GGUFError(f"{name}: general.alignment {alignment!r} is not a power of two")
    infos: list[tuple[str, tuple[int, ...], str, int]] = []
    for _ in range(n_tensors):
        tname = cur.string("a tensor name")
        n_dims = cur.unpack("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{name}: tensor {tname!r} has {n_dims} dimensions; 1 to {MAX_DIMS} are allowed")
        dims = tuple(cur.unpack("Q") for _ in range(n_dims))
        kind = cur.unpack("I")
        if kind not in GGML_TYPES:
            raise GGUFError(f"{name}: tensor {tname!r} has unknown ggml type {kind}")
        offset = cur.unpack("Q")
        if any(d == 0 or d > 1 << 40 for d in dims) or math.prod(dims) > 1 << 42:
            raise GGUFError(f"{name}: tensor {tname!r} has implausible dimensions {list(dims)}")
        if offset % alignment:
            raise GGUFError(f"{name}: tensor {tname!r} is not aligned to {alignment} bytes")
        infos.append((tname, tuple(reversed(dims)), GGML_TYPES[kind][0], offset))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for tname, shape, dtype, offset in infos:
        if tname in seen:
            raise GGUFError(f"{name}: tensor {tname!r} appears twice")
        seen.add(tname)
        try:
            length = tensor_bytes(dtype, shape)
        except GGUFError as exc:
            raise GGUFError(f"{name}: tensor {tname!r}: {exc}") from None
        begin = data_start + offset
        if file_size is not None and begin + length > file_size:
            raise GGUFError(f"{name}: tensor {tname!r} runs past the end of the file (truncated download?)")
        tensors.append(TensorInfo(tname, name, dtype, shape, begin, length))
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in itertools.pairwise(ordered):
        if a.offset + a.length > b.offset:
            raise GGUFError(f"{name}: tensors {a.name!r} and {b.name!r} overlap")
    return GGUFHeader(version, metadata, tensors, alignment, data_start)



# llama.cpp's tensor names -> the Hugging Face names the engine and the layer-range
# fetch use, for the llama family (llama, qwen2, mistral share them).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama-family GGUF tensor, None for one without
    (``rope_freqs.weight``, or a tensor the engine does not use)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
        layer, _, rest = name[4:].partition(".")
        if layer.isdigit() and rest in _LAYER_NAMES:
            return f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"
    return None
