"""The GGUF header: a model's metadata and where each tensor lies, checked and bounded.

GGUF (llama.cpp's format, and what Ollama stores) is::

    "GGUF" | u32 version (2 or 3) | u64 tensor count | u64 metadata count
    metadata: (string key, u32 type, value) * count
    tensor infos: (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset) * count
    padding to ``general.alignment`` (default 32) | tensor data

with strings as u64 length + UTF-8 bytes, all little-endian. ``parse_gguf`` reads
the header through ``read(offset, length) -> bytes`` (a local file, or pieces of the
store), so nothing but the header is read. It returns the metadata as plain Python
values, except arrays, which are ``GGUFArray``: read-only sequences that keep the
header's bytes and decode an item when it is read (a list of Python floats or short
strings takes 6 to 8 times the bytes they were in the file). Every tensor is a
``TensorInfo`` with an absolute byte range, its ggml type name as dtype ("F32",
"Q4_K", ...) and its shape in numpy order (GGUF lists the fastest dimension first:
a [out, in] matrix is stored with dims (in, out)).

A file is untrusted (any member of a cluster can publish one), so the parser is
bounded in memory and in time. The header may be at most ``max_header_bytes``
(default 64 MiB: the largest real headers, vocabularies of 150k to 260k tokens with
their scores or merges, take 7 to 20 MB); a length or count is checked against what
is left of that before anything is read or allocated for it, and parsing holds at
most about twice the header's bytes. All metadata values together, array items at
every depth included, may number at most ``max_items`` (default 4M; Gemma's 262k
tokens with scores and types are 0.8M), which bounds the work (an array of empty
arrays is 12 bytes an item); arrays nest at most ``max_depth`` levels. A tensor
whose range runs past the file, overlaps another, or is misaligned is refused.
Pure: bytes in, header out (the gguf package's reader memory-maps a whole local
file, which cannot read through the piece store, and trusts the counts it reads).
"""

from __future__ import annotations

import itertools
import math
import struct
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from protocol.safetensors import TensorInfo

__all__ = [
    "GGML_TYPES",
    "MAX_DEPTH",
    "MAX_HEADER_BYTES",
    "MAX_ITEMS",
    "GGUFArray",
    "GGUFError",
    "GGUFHeader",
    "hf_name",
    "parse_gguf",
    "short_f32",
    "tensor_bytes",
]

MAGIC = b"GGUF"
# The largest real headers are vocabularies: Qwen2.5's 151,936 tokens and 151,387 merges
# take about 7 MB; Gemma's 262k tokens with scores about 12 MB; SmolLM2's 1.8 MB.
MAX_HEADER_BYTES = 64 * 2**20
# Values in all, array items at every depth included: 5 times Gemma's 0.8M.
MAX_ITEMS = 1 << 22
MAX_DEPTH = 2  # an array of arrays, as llama.cpp's gguf allows; no real file nests at all
MAX_METADATA = 1 << 16
MAX_TENSORS = 1 << 16
MAX_STRING = 16 * 2**20
MAX_DIMS = 4
_CHUNK = 1 << 20  # bytes a read asks for at least, and at most 4 times as many

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
_STRUCTS = {kind: struct.Struct("<" + fmt) for kind, fmt in _SCALARS.items()}
_STRING, _ARRAY, _F32, _BOOL = 8, 9, 6, 7
_U32, _U64, _ARRAY_HEAD = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<IQ")


def short_f32(value: float) -> float:
    """The shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06):
    metadata read back as it was written."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return value


def _text(raw: bytes | bytearray) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")


class GGUFError(ValueError):
    """A file that is not a usable GGUF file (the message says why)."""


class GGUFArray(Sequence[Any]):
    """A metadata array as the header's bytes, each item decoded when it is read.

    ``item_type`` is int, float, bool, str or GGUFArray (an array of arrays), the same
    for every item. It compares equal to a list or tuple of the same items; ``tolist()``
    decodes it whole. Where strings and arrays start is found by reading through them, and
    remembered (4 bytes an item) only once one is asked for by index.
    """

    __slots__ = ("_count", "_kind", "_raw", "_starts")

    def __init__(self, kind: int, count: int, raw: bytes) -> None:
        # raw: the items as the header has them (checked by the parser)
        self._kind, self._count, self._raw = kind, count, raw
        self._starts: array[int] | None = None

    @property
    def item_type(self) -> type:
        if self._kind == _STRING:
            return str
        if self._kind == _ARRAY:
            return GGUFArray
        if self._kind == _BOOL:
            return bool
        return float if _SCALARS[self._kind] in "fd" else int

    def __len__(self) -> int:
        return self._count

    def _decode(self, start: int, end: int) -> Any:
        if self._kind == _STRING:
            return _text(self._raw[start + 8 : end])
        item, count = _ARRAY_HEAD.unpack_from(self._raw, start)
        return GGUFArray(item, count, self._raw[start + 12 : end])

    def _ends(self) -> Iterator[int]:
        p = 0
        for _ in range(self._count):
            p = _item_end(self._raw, p, self._kind)
            yield p

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        i = index.__index__()
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("GGUFArray index out of range")
        fixed = _STRUCTS.get(self._kind)
        if fixed is not None:
            return fixed.unpack_from(self._raw, i * fixed.size)[0]
        if self._starts is None:
            starts = array("I" if len(self._raw) < 1 << 32 else "Q", [0])
            starts.extend(self._ends())
            self._starts = starts
        return self._decode(self._starts[i], self._starts[i + 1])

    def __iter__(self) -> Iterator[Any]:
        fixed = _STRUCTS.get(self._kind)
        if fixed is not None:
            return (v for (v,) in fixed.iter_unpack(self._raw))
        return (self._decode(start, end) for start, end in itertools.pairwise(itertools.chain((0,), self._ends())))

    def tolist(self) -> list[Any]:
        fixed = _STRUCTS.get(self._kind)
        if fixed is not None:
            return list(struct.unpack(f"<{self._count}{_SCALARS[self._kind]}", self._raw))
        return list(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GGUFArray | list | tuple):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(v)[:40] for v in itertools.islice(self, 3))
        more = ", ..." if self._count > 3 else ""
        return f"GGUFArray({self.item_type.__name__} * {self._count}: [{head}{more}])"


def _item_end(raw: bytes, p: int, kind: int) -> int:
    """Where the string or array at ``p`` in ``raw`` (checked by the parser) ends."""
    if kind == _STRING:
        return p + 8 + int(_U64.unpack_from(raw, p)[0])
    item, count = _ARRAY_HEAD.unpack_from(raw, p)
    p += 12
    fixed = _STRUCTS.get(item)
    if fixed is not None:
        return p + fixed.size * count
    for _ in range(count):
        p = _item_end(raw, p, item)
    return p


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


class _Parser:
    """Reads the header front to back through ``read`` into one buffer (never past
    ``limit``), and decodes values at absolute offsets in it, counting the values."""

    def __init__(self, read: Callable[[int, int], bytes], file_size: int | None, name: str,
                 limit: int, items: int, max_depth: int) -> None:
        self.read, self.file_size, self.name = read, file_size, name
        self.cap = limit
        self.limit = limit if file_size is None else min(limit, file_size)
        self.items, self.max_items, self.max_depth = items, items, max_depth
        self.buf = bytearray()

    def need(self, end: int) -> None:
        """Have the bytes up to ``end`` read; refuses before reading what the cap does not allow."""
        if end <= len(self.buf):
            return
        if end > self.limit:
            if self.file_size is not None and end > self.file_size:
                raise GGUFError(f"{self.name}: the header runs past the end of the file (truncated?)")
            raise GGUFError(
                f"{self.name}: the GGUF header is over {self.cap} bytes, more than any real model's "
                "(its metadata or tensor list is implausibly large); refusing it"
            )
        while len(self.buf) < end:
            have = len(self.buf)
            want = min(max(_CHUNK, end - have), 4 * _CHUNK, self.limit - have)
            got = self.read(have, want)
            if not got:
                raise GGUFError(f"{self.name}: the header runs past the end of the file (truncated?)")
            self.buf += got[:want]

    def u32(self, p: int) -> int:
        self.need(p + 4)
        return int(_U32.unpack_from(self.buf, p)[0])

    def u64(self, p: int) -> int:
        self.need(p + 8)
        return int(_U64.unpack_from(self.buf, p)[0])

    def charge(self, n: int, key: str) -> None:
        if n > self.items:
            raise GGUFError(
                f"{self.name}: {key!r} claims {n} items; at most {self.max_items} metadata values "
                "(array items included) are allowed in all, and a real model has far fewer"
            )
        self.items -= n

    def string(self, p: int, what: str) -> tuple[str, int]:
        length = self.u64(p)
        if length > MAX_STRING:
            raise GGUFError(f"{self.name}: {what} claims {length} bytes; at most {MAX_STRING}")
        end = p + 8 + length
        self.need(end)
        return _text(self.buf[p + 8 : end]), end

    def value(self, kind: int, p: int, key: str) -> tuple[Any, int]:
        fixed = _STRUCTS.get(kind)
        if fixed is not None:
            self.need(p + fixed.size)
            value = fixed.unpack_from(self.buf, p)[0]
            return (short_f32(value) if kind == _F32 else value), p + fixed.size
        if kind == _STRING:
            return self.string(p, f"the value of {key!r}")
        if kind == _ARRAY:
            return self.array_value(p, key, 1, build=True)
        raise GGUFError(f"{self.name}: metadata {key!r} has unknown value type {kind}")

    def array_value(self, p: int, key: str, depth: int, *, build: bool) -> tuple[Any, int]:
        """The array at ``p`` (a GGUFArray when ``build``, else None) and where it ends."""
        item, count = self.u32(p), self.u64(p + 4)
        p = start = p + 12
        self.charge(count, key)
        fixed = _STRUCTS.get(item)
        if fixed is not None:
            p += fixed.size * count
            self.need(p)
        elif item == _STRING:
            self.need(p + 8 * count)  # the least its items can take
            p = self._strings(p, count, key)
        elif item == _ARRAY:
            if depth >= self.max_depth:
                raise GGUFError(f"{self.name}: {key!r} nests arrays more than {self.max_depth} deep")
            self.need(p + 12 * count)  # the least its items can take
            p = self._arrays(p, count, key, depth + 1)
        else:
            raise GGUFError(f"{self.name}: metadata {key!r} is an array of unknown value type {item}")
        if not build:
            return None, p
        with memoryview(self.buf) as view:
            raw = bytes(view[start:p])
        return GGUFArray(item, count, raw), p

    def _arrays(self, p: int, count: int, key: str, depth: int) -> int:
        buf, unpack = self.buf, _ARRAY_HEAD.unpack_from
        for _ in range(count):
            if p + 12 > len(buf):
                self.need(p + 12)
            item, n = unpack(buf, p)
            fixed = _STRUCTS.get(item)
            if fixed is None:  # strings, or an array nested too deep: the general path says which
                p = self.array_value(p, key, depth, build=False)[1]
                continue
            self.charge(n, key)
            p += 12 + fixed.size * n
            self.need(p)
        return p

    def _strings(self, p: int, count: int, key: str) -> int:
        buf, unpack = self.buf, _U64.unpack_from
        for _ in range(count):  # the hot loop of a vocabulary: kept to a few steps an item
            if p + 8 > len(buf):
                self.need(p + 8)
            length = unpack(buf, p)[0]
            if length > MAX_STRING:
                raise GGUFError(f"{self.name}: an item of {key!r} claims {length} bytes; at most {MAX_STRING}")
            p += 8 + length
        self.need(p)
        return p


def parse_gguf(
    read: Callable[[int, int], bytes], file_size: int | None, name: str = "model.gguf", *,
    max_header_bytes: int = MAX_HEADER_BYTES, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH,
) -> GGUFHeader:
    """The header of a GGUF file read through ``read``; ``file_size`` None when the reader
    does not know it (tensor ranges are then checked by the reads themselves). GGUFError
    for a file that is not a usable GGUF or exceeds the limits (see the module's docstring)."""
    cur = _Parser(read, file_size, name, max_header_bytes, max_items, max_depth)
    cur.need(4)
    if cur.buf[:4] != MAGIC:
        raise GGUFError(f"{name} is not a GGUF file (it does not start with 'GGUF')")
    version = cur.u32(4)
    if version not in (2, 3):
        raise GGUFError(f"{name}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_meta = cur.u64(8), cur.u64(16)
    if n_tensors > MAX_TENSORS or n_meta > MAX_METADATA:
        raise GGUFError(f"{name}: {n_tensors} tensors and {n_meta} metadata entries are implausible")
    p = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_meta):
        key, p = cur.string(p, "a metadata key")
        if key in metadata:
            raise GGUFError(f"{name}: metadata {key!r} appears twice")
        cur.charge(1, key)
        metadata[key], p = cur.value(cur.u32(p), p + 4, key)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16 \
            or alignment & (alignment - 1):
        raise GGUFError(f"{name}: general.alignment {alignment!r} is not a power of two")
    infos: list[tuple[str, tuple[int, ...], str, int]] = []
    for _ in range(n_tensors):
        tname, p = cur.string(p, "a tensor name")
        n_dims = cur.u32(p)
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{name}: tensor {tname!r} has {n_dims} dimensions; 1 to {MAX_DIMS} are allowed")
        cur.need(p + 4 + 8 * n_dims + 12)
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, p + 4)
        kind, offset = struct.unpack_from("<IQ", cur.buf, p + 4 + 8 * n_dims)
        p += 4 + 8 * n_dims + 12
        if kind not in GGML_TYPES:
            raise GGUFError(f"{name}: tensor {tname!r} has unknown ggml type {kind}")
        if any(d == 0 or d > 1 << 40 for d in dims) or math.prod(dims) > 1 << 42:
            raise GGUFError(f"{name}: tensor {tname!r} has implausible dimensions {list(dims)}")
        if offset % alignment:
            raise GGUFError(f"{name}: tensor {tname!r} is not aligned to {alignment} bytes")
        infos.append((tname, tuple(reversed(dims)), GGML_TYPES[kind][0], offset))
    data_start = -(-p // alignment) * alignment
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
# fetch use, for the llama family (llama, qwen2, mistral share them) and the layers of
# the architectures built on it (qwen3, qwen3moe, gemma3, phi3: _ARCH_LAYER_NAMES).
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
_QK_NORMS = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # per head: [head_dim]
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# Where an architecture's layers differ from the llama family's. Qwen3-MoE's experts are
# stacked by llama.cpp's converter ([E, F, H] gate and up, [E, H, F] down), kept so under
# names of ours (transformers saves one matrix per expert: mlp.experts.N.gate_proj.weight);
# Gemma 3's ffn_norm is the norm before the MLP, its post_attention_norm the one after
# attention; Phi-3 keeps Q, K, V fused in attn_qkv and gate and up fused in ffn_up.
_ARCH_LAYER_NAMES: dict[str, dict[str, str]] = {
    "qwen3": {**_LAYER_NAMES, **_QK_NORMS},
    "qwen3moe": {
        **{k: v for k, v in _LAYER_NAMES.items() if not k.startswith(("ffn_gate", "ffn_up", "ffn_down"))},
        **_QK_NORMS,
        "ffn_gate_inp.weight": "mlp.gate.weight",  # the router, [E, H]
        "ffn_gate_exps.weight": "mlp.experts.gate_proj",
        "ffn_up_exps.weight": "mlp.experts.up_proj",
        "ffn_down_exps.weight": "mlp.experts.down_proj",
    },
    "gemma3": {
        **_LAYER_NAMES,
        **_QK_NORMS,
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
    "phi3": {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_qkv.weight": "self_attn.qkv_proj.weight",  # [q; k; v] rows
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_up.weight": "mlp.gate_up_proj.weight",  # [gate; up] rows
        "ffn_down.weight": "mlp.down_proj.weight",
    },
}


# The same for BERT (``bert``: all-MiniLM and other sentence encoders), as BertModel names them.
_BERT_GLOBAL_NAMES = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "position_embd.weight": "embeddings.position_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
}
_BERT_LAYER_NAMES = {
    f"{gguf}.{kind}": f"{hf}.{kind}"
    for gguf, hf in (("attn_q", "attention.self.query"), ("attn_k", "attention.self.key"),
                     ("attn_v", "attention.self.value"), ("attn_output", "attention.output.dense"),
                     ("attn_output_norm", "attention.output.LayerNorm"), ("ffn_up", "intermediate.dense"),
                     ("ffn_down", "output.dense"), ("layer_output_norm", "output.LayerNorm"))
    for kind in ("weight", "bias")
}


def hf_name(name: str, architecture: str | None = None) -> str | None:
    """The Hugging Face name of a GGUF tensor (llama family, qwen3, qwen3moe, gemma3, phi3,
    or ``bert``), None for one without (``rope_freqs.weight``, Phi-3's
    ``rope_factors_long.weight``: read into config.json, or a tensor the engine does not use)."""
    if architecture == "bert":
        table, layers, prefix = _BERT_GLOBAL_NAMES, _BERT_LAYER_NAMES, "encoder.layer"
    else:
        table, prefix = _GLOBAL_NAMES, "model.layers"
        layers = _ARCH_LAYER_NAMES.get(architecture or "", _LAYER_NAMES)
    if name in table:
        return table[name]
    if name.startswith("blk."):
        layer, _, rest = name[4:].partition(".")
        if layer.isdigit() and rest in layers:
            return f"{prefix}.{int(layer)}.{layers[rest]}"
    return None
