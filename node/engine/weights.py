"""Safetensors reading and partition weight loading.

Everything goes through one byte-range reader, ``read_range(file_name, offset, length) ->
bytes``: for a model directory it reads local files, and the piece store can supply one
that reads pieces. The safetensors header (8-byte little-endian length + JSON) is parsed
here, so both paths share the same code, and a partition reads only the byte ranges of the
tensors it needs.

Matrices are kept exactly as the file stores them, [out, in] (torch's Linear layout): the
model computes feature-major, y[out, tokens] = W[out, in] @ x[in, tokens], which contracts
W on its second axis as it lies. Nothing is transposed or concatenated on the host, so a
tensor's bytes go from the reader to the device in one copy (before: every matrix was
transposed in numpy, ~4 s for the Qwen2.5-0.5B shape, about 16 GB of single-threaded
copying for an 8B model). Local files are read straight into 64-byte-aligned buffers,
which JAX on CPU adopts without a copy. A dtype conversion, when the compute dtype
differs from the file's, runs on the device. A tied head uses the embedding table [vocab, hidden] itself.

The result is a PartitionParams pytree (frozen dataclasses registered with JAX, like
KVCache): absent tensors (no bias, no embedding on a middle partition) are None fields,
which JAX flattens to nothing, so they cost no jit argument and no compiled op.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from node.engine.blocks import BLOCK_TYPES, DEQUANTIZE, JAX, BlockMatrix, check_kernel
from node.engine.blocks import default_kernel as default_block_kernel
from node.engine.config import SUPPORTED_DTYPES, ModelConfig
from node.engine.errors import (
    MissingTensorError,
    ModelConfigError,
    PartitionError,
    ShapeMismatchError,
    WeightsError,
)
from node.engine.gguf import (
    GGUF_MAGIC,
    GGUFWeights,
    Restore,
    check_matrix_types,
    decode,
    gguf_index,
    restore,
    unpermute,
)
from node.engine.moe import MoEParams, expert_names, load_moe, quantize_experts
from node.engine.quant import (
    NATIVE,
    QuantMatrix,
    Weight,
    check_weights,
    default_kernel,
    quantize_host,
)
from protocol.safetensors import SafetensorsError, TensorInfo, header_length
from protocol.safetensors import parse_header as parse_safetensors_header

ReadRange = Callable[[str, int, int], bytes]
# Optional faster path: fill a caller's buffer (file name, offset, buffer) in place.
ReadInto = Callable[[str, int, memoryview], None]

_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


@dataclass(frozen=True)
class PartitionSpec:
    """Layers [start, end) of a model, plus whether this partition embeds tokens
    (first partition) and/or applies the final norm, LM head and sampling (last)."""

    start: int
    end: int
    has_embedding: bool
    has_head: bool

    def validate(self, config: ModelConfig) -> None:
        if not 0 <= self.start <= self.end <= config.num_layers:
            raise PartitionError(
                f"layer range [{self.start}, {self.end}) is outside the model's "
                f"{config.num_layers} layers"
            )
        if self.start == self.end and not (self.has_embedding or self.has_head):
            raise PartitionError("an empty layer range needs has_embedding or has_head")

    @staticmethod
    def whole(config: ModelConfig) -> PartitionSpec:
        return PartitionSpec(0, config.num_layers, True, True)


def split_layers(num_layers: int, parts: int) -> list[PartitionSpec]:
    """Split num_layers into `parts` contiguous, near-equal partitions."""
    if not 1 <= parts <= max(num_layers, 1):
        raise PartitionError(f"cannot split {num_layers} layers into {parts} partitions")
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [PartitionSpec(bounds[i], bounds[i + 1], i == 0, i == parts - 1) for i in range(parts)]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerParams:
    """One decoder layer's weights as the checkpoint stores them: matrices [out, in]
    (a QuantMatrix each when loaded as int8, a BlockMatrix when a GGUF's blocks are kept;
    norms and biases stay in the compute dtype)."""

    ln1: jax.Array  # input RMSNorm [H]
    wq: Weight  # [q, H]
    wk: Weight  # [kv, H]
    wv: Weight  # [kv, H]
    bq: jax.Array | None  # [q]; Qwen2, or attention_bias
    bk: jax.Array | None  # [kv]
    bv: jax.Array | None  # [kv]
    wo: Weight  # [H, q]
    bo: jax.Array | None  # [H]; attention_bias (not Qwen2)
    ln2: jax.Array  # post-attention RMSNorm [H]
    wg: Weight | None  # gate [F, H]; None in a sparse (MoE) layer
    wu: Weight | None  # up [F, H]
    wd: Weight | None  # down [H, F]
    q_norm: jax.Array | None = None  # [D] per-head RMSNorm of q (Qwen3, Gemma 3)
    k_norm: jax.Array | None = None  # [D]
    # Gemma: ln2 is the attention output's norm; these wrap the MLP.
    ln_pre_mlp: jax.Array | None = None  # [H]
    ln_post_mlp: jax.Array | None = None  # [H]
    moe: MoEParams | None = None  # a sparse layer's experts and router (moe.py)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PartitionParams:
    """A partition's weights; every array has the compute dtype, or is a QuantMatrix
    (int8 weights) or a BlockMatrix (GGUF blocks) standing in for it."""

    embed: Weight | None  # [V, H] on the first partition
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array | None  # [H] on the last partition
    # [V, H] on the last partition, except None when a tied head uses `embed` itself.
    head: Weight | None

    @property
    def dtype(self) -> Any:
        first = jax.tree_util.tree_leaves(self, is_leaf=lambda x: isinstance(x, QuantMatrix | BlockMatrix))[0]
        return first.dtype

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))


class _ModelFiles:
    """The files of one local model directory a reader may open: only those the model
    lists (its safetensors files), by plain name, resolved inside the directory, and
    only byte ranges inside the file. Readers back piece serving to peers, so a name like
    ``../cluster.secret`` or ``/etc/passwd`` must get an error, never bytes."""

    def __init__(self, model_dir: str | os.PathLike[str], files: Iterable[str] | None) -> None:
        self.root = Path(model_dir).resolve()
        self.allowed = frozenset(model_files(self.root) if files is None else files)

    def open_range(self, file_name: str, offset: int, length: int) -> tuple[Path, Any]:
        if file_name not in self.allowed:
            raise WeightsError(f"{file_name!r} is not one of this model's weight files")
        path = (self.root / file_name).resolve()
        if path.parent != self.root and self.root not in path.parents:
            raise WeightsError(f"{file_name!r} lies outside the model directory")
        if offset < 0 or length < 0:
            raise WeightsError(f"bad byte range {offset}+{length} of {file_name!r}")
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            raise WeightsError(f"{path} does not exist") from None
        size = os.fstat(fh.fileno()).st_size
        if offset + length > size:
            fh.close()
            raise WeightsError(
                f"{path} is truncated: wanted {length} bytes at offset {offset}, it holds {size}"
            )
        fh.seek(offset)
        return path, fh


def local_reader(
    model_dir: str | os.PathLike[str], files: Iterable[str] | None = None
) -> ReadRange:
    """A byte-range reader over the weight files of a local model directory (`files`, by
    default model_files(model_dir)); any other name, or a range past a file's end, is a
    WeightsError."""
    model = _ModelFiles(model_dir, files)

    def read_range(file_name: str, offset: int, length: int) -> bytes:
        path, fh = model.open_range(file_name, offset, length)
        with fh:
            data = fh.read(length)
        if len(data) != length:
            raise WeightsError(f"{path} is truncated: wanted {length} bytes at offset {offset}")
        return data

    return read_range


def local_read_into(
    model_dir: str | os.PathLike[str], files: Iterable[str] | None = None
) -> ReadInto:
    """Read a local weight file's bytes straight into a buffer (no intermediate bytes
    object); the same checks as local_reader."""
    model = _ModelFiles(model_dir, files)

    def read_into(file_name: str, offset: int, buffer: memoryview) -> None:
        path, fh = model.open_range(file_name, offset, len(buffer))
        with fh:
            got = fh.readinto(buffer)
        if got != len(buffer):
            raise WeightsError(
                f"{path} is truncated: wanted {len(buffer)} bytes at offset {offset}"
            )

    return read_into


def _aligned_bytes(n: int, alignment: int = 64) -> np.ndarray:
    """An uninitialised uint8 array of n bytes starting on an `alignment` boundary."""
    raw = np.empty(n + alignment, np.uint8)
    skip = (-raw.ctypes.data) % alignment
    return raw[skip : skip + n]


def parse_header(read_range: ReadRange, file_name: str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header through the byte-range reader (the checks are
    protocol/safetensors.py's, shared with the importer)."""
    try:
        first8 = read_range(file_name, 0, 8)
        length = header_length(first8, file_name, None)
        return parse_safetensors_header(first8 + read_range(file_name, 8, length), file_name, None)
    except SafetensorsError as exc:
        raise WeightsError(str(exc)) from None


def model_files(model_dir: str | os.PathLike[str]) -> list[str]:
    """The safetensors files of a model directory (sharded via the index, or single)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise WeightsError(f"{index} is malformed: {exc}") from None
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        files = sorted(p.name for p in root.glob("*.gguf"))[:1]
    if not files:
        raise WeightsError(f"{root} holds no *.safetensors (or .gguf) files")
    return files


# Where a multimodal checkpoint keeps its language model (Gemma 3: transformers 4 and 5
# save `language_model.model.*`; some conversions write `model.language_model.*`).
LANGUAGE_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")


def _alias_language_model(index: dict[str, TensorInfo]) -> None:
    """File a multimodal checkpoint's language-model tensors under the causal LM's names
    too (model.*, lm_head.weight); the vision tower's stay unread."""
    if any(name.startswith("model.layers.") for name in index):
        return
    for name, info in list(index.items()):
        for prefix in LANGUAGE_MODEL_PREFIXES:
            if name.startswith(prefix):
                index.setdefault("model." + name[len(prefix):], info)
        if name == "language_model.lm_head.weight":
            index.setdefault("lm_head.weight", info)


@dataclass
class WeightSource:
    """The tensors of a checkpoint, read lazily through a byte-range reader.

    `tensors_read` records every tensor name whose data was fetched, so callers (and
    tests) can check that a partition touched only its own tensors.
    """

    read_range: ReadRange
    files: Sequence[str]
    index: dict[str, TensorInfo] = field(default_factory=dict)
    tensors_read: list[str] = field(default_factory=list)
    read_into: ReadInto | None = None
    # Each file's size; needed for GGUF files (their header has no length up front).
    sizes: dict[str, int] = field(default_factory=dict)
    # Where each weight file's header ends (its tensor data begins), when known: the
    # header parser never reads past it. A node that fetched only its layers' pieces
    # holds the header and nothing after it but its own tensors.
    headers: dict[str, int] = field(default_factory=dict)
    # GGUF tensors to bring back to the checkpoint's values (unpermute rows, take off
    # Gemma's + 1), see node/engine/gguf.py.
    restore: dict[str, Restore] = field(default_factory=dict)
    # Tensors that come from GGUF files (read_blocks keeps their blocks).
    gguf_names: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.index:
            for file_name in self.files:
                if self.read_range(file_name, 0, 4) == GGUF_MAGIC:
                    size = self.sizes.get(file_name)
                    if size is None:
                        raise WeightsError(f"{file_name} is a GGUF file: its size must be given")
                    found: GGUFWeights = gguf_index(self._header_reader(), file_name, size)
                    self.index.update(found.index)
                    self.restore.update(found.restore)
                    self.gguf_names.update(found.index)
                else:
                    self.index.update(parse_header(self.read_range, file_name))
            _alias_language_model(self.index)

    def _header_reader(self) -> ReadRange:
        """``read_range``, cut at each file's header end where it is known."""

        def read(file_name: str, offset: int, length: int) -> bytes:
            end = self.headers.get(file_name)
            if end is not None:
                length = max(0, min(length, end - offset))
                if length == 0:
                    return b""
            return self.read_range(file_name, offset, length)

        return read

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> WeightSource:
        files = model_files(model_dir)
        sizes = {f: (Path(model_dir) / f).stat().st_size for f in files}
        return cls(
            local_reader(model_dir, files), files, read_into=local_read_into(model_dir, files),
            sizes=sizes,
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> WeightSource:
        """A single GGUF file (its directory holds the config and tokenizer files, if any)."""
        p = Path(path)
        files = [p.name]
        return cls(
            local_reader(p.parent, files), files, read_into=local_read_into(p.parent, files),
            sizes={p.name: p.stat().st_size},
        )

    @classmethod
    def from_reader(cls, read_range: ReadRange, files: Iterable[str]) -> WeightSource:
        return cls(read_range, list(files))

    def _raw(self, info: TensorInfo) -> np.ndarray:
        """A tensor's bytes as uint8, 64-byte aligned with read_into (JAX CPU adopts them)."""
        if self.read_into is not None:
            buf = _aligned_bytes(info.length)
            self.read_into(info.file, info.offset, memoryview(buf.data))
            return buf
        return np.frombuffer(self.read_range(info.file, info.offset, info.length), np.uint8)

    def read_blocks(self, name: str, expected_shape: tuple[int, ...]) -> tuple[np.ndarray, str] | None:
        """A GGUF matrix's block bytes, uint8 [rows, row_bytes] ([E, rows, row_bytes] for
        stacked experts), and its block type; None when the engine does not keep it as
        blocks (not a GGUF block type, rows not whole blocks, values to restore): read()
        then decodes it. Q/K rows llama.cpp permuted are unpermuted as whole block rows."""
        info = self.index.get(name)
        if info is None or name not in self.gguf_names or info.dtype not in BLOCK_TYPES:
            return None
        if len(expected_shape) not in (2, 3) or info.shape != expected_shape:
            return None
        t = BLOCK_TYPES[info.dtype]
        cols = expected_shape[-1]
        rows = int(np.prod(expected_shape[:-1]))
        how = self.restore.get(name)
        if cols % t.block_size or info.length != rows * t.row_bytes(cols) or (how is not None and how.offset):
            return None
        data = self._raw(info).reshape(*expected_shape[:-1], t.row_bytes(cols))
        if how is not None and how.heads is not None:
            data = unpermute(data, how.heads)
        self.tensors_read.append(name)
        return data, info.dtype

    def read(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        info = self.index.get(name)
        if info is None:
            raise MissingTensorError(
                f"tensor {name!r} is in none of {list(self.files)}; the checkpoint is incomplete "
                "or does not match config.json"
            )
        if info.shape != expected_shape:
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {list(info.shape)} but config.json implies "
                f"{list(expected_shape)}"
            )
        np_dtype = _ST_DTYPES.get(info.dtype)
        if np_dtype is None or name in self.restore:
            # A GGUF tensor: quantized blocks, or values to restore.
            out = decode(info, self.read_range(info.file, info.offset, info.length))
            self.tensors_read.append(name)
            how = self.restore.get(name)
            return out if how is None else restore(out, how)
        if info.length != np_dtype.itemsize * int(np.prod(info.shape, dtype=np.int64)):
            raise WeightsError(f"tensor {name!r}: byte length does not match its shape and dtype")
        # Into a 64-byte-aligned buffer where possible (_raw): a local load then copies
        # each byte once (Qwen2.5-0.5B shape: 1.5-1.8 s instead of 3.1-3.4 s through bytes).
        out = self._raw(info).view(np_dtype).reshape(info.shape)
        self.tensors_read.append(name)
        return out


def resolve_dtype(config: ModelConfig, dtype: str | None) -> str:
    """The compute dtype: the one asked for, else the checkpoint's, else float32."""
    chosen = dtype or config.torch_dtype or "float32"
    if chosen not in SUPPORTED_DTYPES:
        if dtype is None:
            return "float32"
        raise ModelConfigError(
            f"dtype {chosen!r} is not supported (use one of {', '.join(SUPPORTED_DTYPES)})"
        )
    return chosen


def head_shares_embedding(config: ModelConfig, spec: PartitionSpec) -> bool:
    return config.tie_word_embeddings and spec.has_head and spec.has_embedding


def _layer_tensor_names(config: ModelConfig, i: int) -> list[str]:
    p = f"model.layers.{i}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    if config.sandwich_norms:
        names += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"]
    if config.fused:
        names += [p + "self_attn.qkv_proj.weight", p + "self_attn.o_proj.weight"]
    else:
        names += [p + f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if config.qk_norm:
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    if config.qkv_bias:
        names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    if config.o_bias:
        names.append(p + "self_attn.o_proj.bias")
    if config.is_sparse(i):
        names += expert_names(p + "mlp.", config.num_experts, stacked=False)
    elif config.fused:
        names += [p + "mlp.gate_up_proj.weight", p + "mlp.down_proj.weight"]
    else:
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def partition_tensor_names(config: ModelConfig, spec: PartitionSpec) -> list[str]:
    """The checkpoint tensor names a partition reads."""
    names: list[str] = []
    if spec.has_embedding or (spec.has_head and config.tie_word_embeddings):
        names.append("model.embed_tokens.weight")
    for i in range(spec.start, spec.end):
        names += _layer_tensor_names(config, i)
    if spec.has_head:
        names.append("model.norm.weight")
        if not config.tie_word_embeddings:
            names.append("lm_head.weight")
    return names


def _put(host: np.ndarray, target: Any) -> jax.Array:
    """A host array on the device in the compute dtype (converted there)."""
    arr = jnp.asarray(host)
    arr = arr if arr.dtype == target else arr.astype(target)
    # Transfers are asynchronous and keep their host bytes alive until done: wait, so
    # the host holds one tensor at a time (memory.py counts exactly that).
    return arr.block_until_ready()


def load_params(
    source: WeightSource,
    config: ModelConfig,
    spec: PartitionSpec,
    dtype: str,
    weights: str = NATIVE,
    block_kernel: str | None = None,
) -> PartitionParams:
    """Read a partition's tensors and put them on the device as they are (see the module
    docstring). One tensor at a time: the host holds at most one tensor's bytes.

    weights="native" on CPU keeps a GGUF's block-format matrices as their bytes
    (blocks.py; `block_kernel` "ggml" or "jax", default blocks.default_kernel(), or
    "dequantize" for the compute dtype's arrays); on other backends they are dequantized.
    weights="int8": every matrix (embedding, head, the layers' projections) is quantized
    on the host right after it is read (quant.py), from the file's dtype."""
    spec.validate(config)
    check_matrix_types(config.matrix_types, source.index, source.gguf_names)
    int8 = check_weights(weights) != NATIVE
    if block_kernel is None:
        keep_blocks = not int8 and jax.default_backend() == "cpu"
        kernel = default_block_kernel() if keep_blocks else JAX
    else:
        keep_blocks = not int8 and check_kernel(block_kernel) != DEQUANTIZE
        kernel = block_kernel
    target = jnp.dtype(dtype)
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size

    def get(name: str, shape: tuple[int, ...]) -> jax.Array:
        return _put(source.read(name, shape), target)

    def device(host: np.ndarray) -> Weight:
        if not int8:
            arr = jnp.asarray(host)
            return (arr if arr.dtype == target else arr.astype(target)).block_until_ready()
        return jax.block_until_ready(quantize_host(host, dtype, default_kernel()))

    def blocks_of(name: str, shape: tuple[int, ...]) -> BlockMatrix | None:  # None: read() it
        found = source.read_blocks(name, shape) if keep_blocks else None
        if found is None:
            return None
        return BlockMatrix(jnp.asarray(found[0]).block_until_ready(), found[1], shape[-1], dtype, kernel)

    def mat(name: str, shape: tuple[int, ...]) -> Weight:
        kept = blocks_of(name, shape)
        if kept is not None:
            return kept
        if not int8:
            return get(name, shape)
        return device(source.read(name, shape))

    def rows_of(name: str, parts: tuple[int, ...]) -> list[Weight]:
        """A fused matrix (Phi-3's qkv_proj, gate_up_proj) split by rows into `parts`."""
        bounds = list(itertools.pairwise(np.cumsum((0, *parts))))
        kept = blocks_of(name, (sum(parts), H))
        if kept is not None:
            return [BlockMatrix(kept.data[a:b], kept.block_type, H, dtype, kernel) for a, b in bounds]
        fused = source.read(name, (sum(parts), H))
        return [device(fused[a:b]) for a, b in bounds]

    def sparse_mlp(i: int) -> MoEParams:
        int8_kernel = default_kernel()
        return load_moe(
            source.read, lambda name: name in source.index, f"model.layers.{i}.mlp.",
            (config.num_experts, H, config.moe_intermediate_size),
            lambda host: _put(host, target),
            (lambda host: quantize_experts(host, dtype, int8_kernel)) if int8 else None,
            blocks_of,
        )

    def layer(i: int) -> LayerParams:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        bias = config.qkv_bias
        sparse = config.is_sparse(i)
        wg: Weight | None = None
        wu: Weight | None = None
        if config.fused:
            wq, wk, wv = rows_of(a + "qkv_proj.weight", (Q, KV, KV))
            wg, wu = rows_of(p + "mlp.gate_up_proj.weight", (F, F))
        else:
            wq, wk, wv = (mat(a + f"{x}_proj.weight", s) for x, s in (("q", (Q, H)), ("k", (KV, H)), ("v", (KV, H))))
            if not sparse:
                wg, wu = mat(p + "mlp.gate_proj.weight", (F, H)), mat(p + "mlp.up_proj.weight", (F, H))
        D = config.head_dim
        sandwich = config.sandwich_norms
        return LayerParams(
            ln1=get(p + "input_layernorm.weight", (H,)),
            wq=wq,
            wk=wk,
            wv=wv,
            bq=get(a + "q_proj.bias", (Q,)) if bias else None,
            bk=get(a + "k_proj.bias", (KV,)) if bias else None,
            bv=get(a + "v_proj.bias", (KV,)) if bias else None,
            wo=mat(a + "o_proj.weight", (H, Q)),
            bo=get(a + "o_proj.bias", (H,)) if config.o_bias else None,
            ln2=get(p + "post_attention_layernorm.weight", (H,)),
            wg=wg,
            wu=wu,
            wd=None if sparse else mat(p + "mlp.down_proj.weight", (H, F)),
            q_norm=get(a + "q_norm.weight", (D,)) if config.qk_norm else None,
            k_norm=get(a + "k_norm.weight", (D,)) if config.qk_norm else None,
            ln_pre_mlp=get(p + "pre_feedforward_layernorm.weight", (H,)) if sandwich else None,
            ln_post_mlp=get(p + "post_feedforward_layernorm.weight", (H,)) if sandwich else None,
            moe=sparse_mlp(i) if sparse else None,
        )

    embed = mat("model.embed_tokens.weight", (V, H)) if spec.has_embedding else None
    layers = tuple(layer(i) for i in range(spec.start, spec.end))
    final_norm = head = None
    if spec.has_head:
        final_norm = get("model.norm.weight", (H,))
        if not head_shares_embedding(config, spec):
            name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            head = mat(name, (V, H))
    return PartitionParams(embed, layers, final_norm, head)
