"""BERT-family embedding models (``BertModel``: all-MiniLM, nomic-embed-text's family in
GGUF as ``bert``): config, weights and the encoder, whole on one node.

An encoder attends in both directions, so a text's vector needs all of its tokens at
once: there is no KV cache, no chunked prefill and no layer split (an embedding model
is small: all-MiniLM-L6 holds 90 MB). The vector is the mean of the last hidden states
over the real tokens (the attention mask), L2-normalized: what sentence-transformers'
pooling config says for these models and what Ollama's ``bert`` models return. Inputs
are padded to power-of-two buckets (>= 16) so a handful of compilations serve every
length; padding is masked out of attention and of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.buckets import MIN_BUCKET, pow2_bucket
from node.engine.config import BERT_ARCHITECTURES, is_bert
from node.engine.errors import (
    ContextOverflowError,
    ModelConfigError,
    TokenRangeError,
    UnsupportedModelError,
)
from node.engine.weights import WeightSource

__all__ = [
    "BERT_ARCHITECTURES",
    "BertConfig",
    "BertEncoder",
    "encoder_memory",
    "is_bert",
    "load_bert",
    "load_encoder",
    "parse_bert_config",
]

_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class BertConfig:
    """A BERT encoder's shape (hashable: a static argument of the compiled encoder)."""

    hidden_size: int
    depth: int  # encoder layers (num_hidden_layers)
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    architecture: str = "BertModel"
    torch_dtype: str | None = None
    is_encoder: bool = True  # embeddings only: no generation, one stage

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_layers(self) -> int:
        """What the planner splits: one unit, since an encoder runs whole on one node."""
        return 1


def _get(raw: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = raw.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelConfigError(f"config.json key {key!r} should be {kind.__name__}, got {value!r}")
    return value


def parse_bert_config(raw: Mapping[str, Any]) -> BertConfig:
    """A BERT config.json (transformers' defaults where a key is absent) -> BertConfig."""
    act = raw.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise UnsupportedModelError(f"BERT hidden_act {act!r} is not supported (supported: {', '.join(_ACTS)})")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError("BERT position_embedding_type other than 'absolute' is not supported")
    hidden, heads = _get(raw, "hidden_size", int, 768), _get(raw, "num_attention_heads", int, 12)
    if hidden % heads:
        raise ModelConfigError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return BertConfig(
        hidden_size=hidden,
        depth=_get(raw, "num_hidden_layers", int, 12),
        num_heads=heads,
        intermediate_size=_get(raw, "intermediate_size", int, 3072),
        vocab_size=_get(raw, "vocab_size", int),
        max_position_embeddings=_get(raw, "max_position_embeddings", int, 512),
        type_vocab_size=_get(raw, "type_vocab_size", int, 2),
        layer_norm_eps=_get(raw, "layer_norm_eps", float, 1e-12),
        hidden_act=str(act),
        torch_dtype=str(dtype) if dtype else None,
    )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class BertLayer:
    wq: jax.Array  # [H, H] as stored ([out, in])
    bq: jax.Array
    wk: jax.Array
    bk: jax.Array
    wv: jax.Array
    bv: jax.Array
    wo: jax.Array
    bo: jax.Array
    ln1_w: jax.Array
    ln1_b: jax.Array
    wi: jax.Array  # [F, H]
    bi: jax.Array
    wd: jax.Array  # [H, F]
    bd: jax.Array
    ln2_w: jax.Array
    ln2_b: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class BertParams:
    words: jax.Array  # [V, H]
    positions: jax.Array  # [P, H]
    types: jax.Array  # [T, H]
    ln_w: jax.Array
    ln_b: jax.Array
    layers: tuple[BertLayer, ...]

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))


def bert_tensor_names(config: BertConfig, prefix: str = "") -> list[str]:
    """The checkpoint tensors the encoder reads (the pooler and any head are not used)."""
    e = prefix + "embeddings."
    names = [e + "word_embeddings.weight", e + "position_embeddings.weight", e + "token_type_embeddings.weight",
             e + "LayerNorm.weight", e + "LayerNorm.bias"]
    for i in range(config.depth):
        p = f"{prefix}encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                     "output.dense", "output.LayerNorm"):
            names += [p + part + ".weight", p + part + ".bias"]
    return names


def weight_bytes(config: BertConfig, dtype: str = "float32") -> int:
    H, F = config.hidden_size, config.intermediate_size
    per_layer = 4 * H * H + 4 * H + 2 * H * F + F + H + 4 * H
    total = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size + 2) * H
    return (total + config.depth * per_layer) * int(jnp.dtype(dtype).itemsize)


def load_bert(source: WeightSource, config: BertConfig, dtype: str = "float32") -> BertParams:
    """Read the encoder's tensors (with or without a ``bert.`` prefix, as BertFor* heads save them)."""
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in source.index else ""
    target = jnp.dtype(dtype)
    H, F = config.hidden_size, config.intermediate_size

    def get(name: str, shape: tuple[int, ...]) -> jax.Array:
        arr = jnp.asarray(source.read(prefix + name, shape))
        return (arr if arr.dtype == target else arr.astype(target)).block_until_ready()

    def pair(name: str, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        return get(name + ".weight", shape), get(name + ".bias", (shape[0],))

    def layer(i: int) -> BertLayer:
        p = f"encoder.layer.{i}."
        wq, bq = pair(p + "attention.self.query", (H, H))
        wk, bk = pair(p + "attention.self.key", (H, H))
        wv, bv = pair(p + "attention.self.value", (H, H))
        wo, bo = pair(p + "attention.output.dense", (H, H))
        ln1_w, ln1_b = pair(p + "attention.output.LayerNorm", (H,))
        wi, bi = pair(p + "intermediate.dense", (F, H))
        wd, bd = pair(p + "output.dense", (H, F))
        ln2_w, ln2_b = pair(p + "output.LayerNorm", (H,))
        return BertLayer(wq, bq, wk, bk, wv, bv, wo, bo, ln1_w, ln1_b, wi, bi, wd, bd, ln2_w, ln2_b)

    e = "embeddings."
    ln_w, ln_b = pair(e + "LayerNorm", (H,))
    return BertParams(
        words=get(e + "word_embeddings.weight", (config.vocab_size, H)),
        positions=get(e + "position_embeddings.weight", (config.max_position_embeddings, H)),
        types=get(e + "token_type_embeddings.weight", (config.type_vocab_size, H)),
        ln_w=ln_w, ln_b=ln_b,
        layers=tuple(layer(i) for i in range(config.depth)),
    )


def _layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w + b


def _linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("bni,oi->bno", x, w) + b


def _act(name: str, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=name != "gelu")


@partial(jax.jit, static_argnames=("config",))
def encode(params: BertParams, ids: jax.Array, mask: jax.Array, *, config: BertConfig) -> jax.Array:
    """ids, mask [B, n] (mask 1 for real tokens) -> mean-pooled, L2-normalized float32 [B, H]."""
    B, n = ids.shape
    nh, d = config.num_heads, config.head_dim
    x = params.words[ids] + params.positions[:n][None] + params.types[0][None, None]
    x = _layer_norm(x, params.ln_w, params.ln_b, config.layer_norm_eps)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e30).astype(jnp.float32)  # [B, 1, 1, n]
    for layer in params.layers:
        q = _linear(x, layer.wq, layer.bq).reshape(B, n, nh, d)
        k = _linear(x, layer.wk, layer.bk).reshape(B, n, nh, d)
        v = _linear(x, layer.wv, layer.bv).reshape(B, n, nh, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, n, nh * d)
        x = _layer_norm(x + _linear(attn, layer.wo, layer.bo), layer.ln1_w, layer.ln1_b, config.layer_norm_eps)
        h = _act(config.hidden_act, _linear(x, layer.wi, layer.bi))
        x = _layer_norm(x + _linear(h, layer.wd, layer.bd), layer.ln2_w, layer.ln2_b, config.layer_norm_eps)
    m = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
    return pooled / jnp.maximum(norm, 1e-12)


def encoder_memory(config: BertConfig, slots: int, context: int, dtype: str = "float32") -> int:
    """Bytes a loaded encoder holds: its weights, plus the largest step's activations
    (``slots`` inputs of ``context`` tokens: attention scores and the MLP's rows, twice
    over for XLA's temporaries)."""
    n = min(context, config.max_position_embeddings)
    rows = slots * n
    scores = slots * config.num_heads * n * n
    acts = rows * (6 * config.hidden_size + 2 * config.intermediate_size)
    return weight_bytes(config, dtype) + 2 * 4 * (scores + acts)


@dataclass
class BertEncoder:
    """A loaded BERT model: ``embed(inputs)`` gives one unit vector per token-id list."""

    config: BertConfig
    params: BertParams
    dtype: str = "float32"
    context: int | None = None  # at most max_position_embeddings

    @property
    def max_context(self) -> int:
        limit = self.config.max_position_embeddings
        return limit if self.context is None else min(limit, self.context)

    def _check(self, ids: Any, i: int) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise TokenRangeError(f"input {i} must be a non-empty list of token ids")
        if arr.size > self.max_context:
            raise ContextOverflowError(f"input {i} has {arr.size} tokens; the model takes at most {self.max_context}")
        vocab = self.config.vocab_size
        if int(arr.min()) < 0 or int(arr.max()) >= vocab:
            raise TokenRangeError(f"input {i} holds a token id outside the vocabulary (0..{vocab - 1})")
        return arr.astype(np.int32)

    def embed(self, inputs: Sequence[Any]) -> np.ndarray:
        """Token-id lists -> float32 [len(inputs), hidden], each row of unit length."""
        rows = [self._check(x, i) for i, x in enumerate(inputs)]
        if not rows:
            return np.zeros((0, self.config.hidden_size), np.float32)
        n = pow2_bucket(max(r.size for r in rows), floor=MIN_BUCKET, cap=self.max_context)
        width = pow2_bucket(len(rows))
        ids = np.zeros((width, n), np.int32)
        mask = np.zeros((width, n), np.int32)
        for j, r in enumerate(rows):
            ids[j, : r.size], mask[j, : r.size] = r, 1
        out = encode(self.params, ids, mask, config=self.config)
        return np.asarray(out)[: len(rows)].astype(np.float32)


def load_encoder(source: WeightSource, config: BertConfig, dtype: str | None = None, *,
                 max_context: int | None = None) -> BertEncoder:
    """Load an encoder; ``max_context`` caps the tokens of one input (the model's
    max_position_embeddings at most)."""
    chosen = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    return BertEncoder(config, load_bert(source, config, chosen), chosen, max_context)
