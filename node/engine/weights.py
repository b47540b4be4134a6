"""Safetensors reading and partition weight loading.

Everything goes through one byte-range reader, ``read_range(file_name, offset, length) ->
bytes``: for a model directory it reads local files, and the piece store can supply one
that reads pieces. The safetensors header (8-byte little-endian length + JSON) is parsed
here, so both paths share the same code, and a partition reads only the byte ranges of the
tensors it needs, converting one layer at a time into the compute layout:

- linear weights are transposed to [in, out]; q/k/v are fused into one [hidden, q+2kv]
  matrix and gate/up into one [hidden, 2*intermediate] matrix (fewer, larger matmuls);
- the LM head is stored [hidden, vocab], except when a tied head shares the partition's
  embedding table, which is then used transposed rather than copied.

The result is a PartitionParams pytree (frozen dataclasses registered with JAX, like
KVCache): absent tensors (no bias, no embedding on a middle partition) are None fields,
which JAX flattens to nothing, so they cost no jit argument and no compiled op.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from node.engine.config import SUPPORTED_DTYPES, ModelConfig
from node.engine.errors import (
    MissingTensorError,
    ModelConfigError,
    PartitionError,
    ShapeMismatchError,
    WeightsError,
)

ReadRange = Callable[[str, int, int], bytes]

# Refuse absurd headers before allocating them (the format's own reference limit is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

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
    """One decoder layer's weights in the compute layout, matrices [in, out]."""

    ln1: jax.Array  # input RMSNorm [H]
    wqkv: jax.Array  # [H, q + 2kv]
    bqkv: jax.Array | None  # [q + 2kv]; Qwen2, or attention_bias
    wo: jax.Array  # [q, H]
    bo: jax.Array | None  # [H]; attention_bias (not Qwen2)
    ln2: jax.Array  # post-attention RMSNorm [H]
    wgu: jax.Array  # gate and up side by side [H, 2F]
    wd: jax.Array  # down [F, H]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PartitionParams:
    """A partition's weights; every array has the compute dtype."""

    embed: jax.Array | None  # [V, H] on the first partition
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array | None  # [H] on the last partition
    # [H, V] on the last partition, except None when the tied head uses `embed` transposed.
    head: jax.Array | None

    @property
    def dtype(self) -> Any:
        return jax.tree_util.tree_leaves(self)[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


def local_reader(model_dir: str | os.PathLike[str]) -> ReadRange:
    """A byte-range reader over the files of a local model directory."""
    root = Path(model_dir)

    def read_range(file_name: str, offset: int, length: int) -> bytes:
        path = root / file_name
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
        except FileNotFoundError:
            raise WeightsError(f"{path} does not exist") from None
        if len(data) != length:
            raise WeightsError(f"{path} is truncated: wanted {length} bytes at offset {offset}")
        return data

    return read_range


def parse_header(read_range: ReadRange, file_name: str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header through the byte-range reader."""
    (header_len,) = struct.unpack("<Q", read_range(file_name, 0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise WeightsError(f"{file_name}: safetensors header of {header_len} bytes is implausible")
    try:
        header = json.loads(read_range(file_name, 8, header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{file_name}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file_name}: safetensors header should be a JSON object")
    base = 8 + header_len
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            info = TensorInfo(
                name, file_name, meta["dtype"], tuple(meta["shape"]), base + begin, end - begin
            )
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{file_name}: malformed header entry for {name!r}") from None
        out[name] = info
    return out


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
        raise WeightsError(f"{root} holds no *.safetensors files")
    return files


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

    def __post_init__(self) -> None:
        if not self.index:
            for file_name in self.files:
                self.index.update(parse_header(self.read_range, file_name))

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> WeightSource:
        return cls(local_reader(model_dir), model_files(model_dir))

    @classmethod
    def from_reader(cls, read_range: ReadRange, files: Iterable[str]) -> WeightSource:
        return cls(read_range, list(files))

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
        if np_dtype is None:
            raise WeightsError(f"tensor {name!r} has unsupported dtype {info.dtype}")
        if info.length != np_dtype.itemsize * int(np.prod(info.shape, dtype=np.int64)):
            raise WeightsError(f"tensor {name!r}: byte length does not match its shape and dtype")
        data = self.read_range(info.file, info.offset, info.length)
        self.tensors_read.append(name)
        return np.frombuffer(data, dtype=np_dtype).reshape(info.shape)


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


def partition_tensor_names(config: ModelConfig, spec: PartitionSpec) -> list[str]:
    """The checkpoint tensor names a partition reads."""
    names: list[str] = []
    if spec.has_embedding or (spec.has_head and config.tie_word_embeddings):
        names.append("model.embed_tokens.weight")
    for i in range(spec.start, spec.end):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(p + f"self_attn.{proj}.weight")
        if config.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if config.o_bias:
            names.append(p + "self_attn.o_proj.bias")
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if spec.has_head:
        names.append("model.norm.weight")
        if not config.tie_word_embeddings:
            names.append("lm_head.weight")
    return names


def load_params(
    source: WeightSource, config: ModelConfig, spec: PartitionSpec, dtype: str
) -> PartitionParams:
    """Read a partition's tensors and lay them out for the model (see module docstring).

    Layers are read one at a time and a fused matrix's parts are dropped once it is on the
    device, so the host holds about one layer (plus the embedding a tied head needs).
    """
    spec.validate(config)
    np_dtype = np.dtype(jnp.dtype(dtype))
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return source.read(name, shape).astype(np_dtype)

    def put(arr: np.ndarray) -> jax.Array:
        return jnp.asarray(np.ascontiguousarray(arr))

    def layer(i: int) -> LayerParams:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        ln1 = put(get(p + "input_layernorm.weight", (H,)))
        q = get(a + "q_proj.weight", (Q, H))
        k = get(a + "k_proj.weight", (KV, H))
        v = get(a + "v_proj.weight", (KV, H))
        wqkv = put(np.concatenate([q, k, v], axis=0).T)
        del q, k, v
        wo = put(get(a + "o_proj.weight", (H, Q)).T)
        ln2 = put(get(p + "post_attention_layernorm.weight", (H,)))
        bqkv = None
        if config.qkv_bias:
            bqkv = put(
                np.concatenate(
                    [
                        get(a + "q_proj.bias", (Q,)),
                        get(a + "k_proj.bias", (KV,)),
                        get(a + "v_proj.bias", (KV,)),
                    ]
                )
            )
        bo = put(get(a + "o_proj.bias", (H,))) if config.o_bias else None
        gate = get(p + "mlp.gate_proj.weight", (F, H))
        up = get(p + "mlp.up_proj.weight", (F, H))
        wgu = put(np.concatenate([gate, up], axis=0).T)
        del gate, up
        wd = put(get(p + "mlp.down_proj.weight", (H, F)).T)
        return LayerParams(ln1, wqkv, bqkv, wo, bo, ln2, wgu, wd)

    embed: np.ndarray | None = None
    if spec.has_embedding or (spec.has_head and config.tie_word_embeddings):
        embed = get("model.embed_tokens.weight", (V, H))
    embed_param = put(embed) if spec.has_embedding and embed is not None else None
    layers = tuple(layer(i) for i in range(spec.start, spec.end))
    final_norm = head = None
    if spec.has_head:
        final_norm = put(get("model.norm.weight", (H,)))
        if not head_shares_embedding(config, spec):
            head_np = embed if config.tie_word_embeddings else get("lm_head.weight", (V, H))
            assert head_np is not None
            head = put(head_np.T)
    return PartitionParams(embed_param, layers, final_norm, head)
