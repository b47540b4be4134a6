"""A GGUF's metadata as the Hugging Face ``config.json`` the engine reads.

llama.cpp writes the architecture under ``general.architecture`` and its numbers
under ``<arch>.*`` keys; this maps them to transformers' names for the
architectures the engine runs (llama: Llama 2/3.x, SmolLM2, DeepSeek-R1's Llama
distills; qwen2: Qwen2/2.5, DeepSeek-R1's Qwen distills; mistral files say
``llama``; bert: BertModel embedding models, mean-pooled). Written at import next to the GGUF, so a GGUF model is loaded, planned
and fetched by layer range exactly like a safetensors one.

Two facts are not metadata: whether the head is tied (no ``output.weight``
tensor) and the per-frequency RoPE factors of Llama 3.1+ files
(``rope_freqs.weight``, llama.cpp's form of ``rope_scaling: llama3``). The caller
passes both; the factors go in ``rope_factors``, a key of ours that
node/engine/config.py reads (inverse frequencies are divided by them, as
llama.cpp does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from protocol.gguf import GGUFArray

__all__ = ["ARCHITECTURES", "SUPPORTED_TYPES", "GGUFConfigError", "hf_config"]

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "bert": "BertModel"}
_MEAN_POOLING = 1  # llama.cpp's pooling_type: 0 none, 1 mean, 2 cls, 3 last
# The tensor types the engine dequantizes (node/engine/gguf.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_MAX_INT = 2**31 - 1  # sizes and counts become int32 shapes and indices in the engine


class GGUFConfigError(ValueError):
    """A GGUF whose metadata does not describe a model the engine runs."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(md: Mapping[str, Any], key: str, default: int | None = None, low: int = 1) -> int:
    value = md.get(key, default)
    if value is None:
        raise GGUFConfigError(f"the GGUF metadata has no {key!r}; the engine needs it")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_INT:
        raise GGUFConfigError(
            f"GGUF metadata {key!r} should be an integer from {low} to {_MAX_INT}, got {_show(value)}"
        )
    return value


def _float(md: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = md.get(key, default)
    if value is None:
        raise GGUFConfigError(f"the GGUF metadata has no {key!r}; the engine needs it")
    if not 0 < _number(value) < math.inf:  # NaN is not either
        raise GGUFConfigError(f"GGUF metadata {key!r} should be a positive number, got {_show(value)}")
    return float(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        return math.inf


def _vocab_size(md: Mapping[str, Any], p: str) -> tuple[int, str]:
    """The vocabulary's size, and the key it comes from."""
    if md.get(p + "vocab_size") is not None:
        return _int(md, p + "vocab_size"), p + "vocab_size"
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GGUFArray | list | tuple) and 1 <= len(tokens) <= _MAX_INT:
        return len(tokens), "tokenizer.ggml.tokens"
    raise GGUFConfigError(f"the GGUF metadata has no {p}vocab_size and no tokenizer.ggml.tokens list")


def _head_dim(md: Mapping[str, Any], p: str, hidden: int, heads: int) -> int:
    """key_length, else rope.dimension_count, else hidden / heads; even, as RoPE rotates halves."""
    for key in (p + "attention.key_length", p + "rope.dimension_count"):
        if md.get(key) is not None:
            head_dim, source = _int(md, key), repr(key)
            break
    else:
        head_dim, source = hidden // heads, f"{p}embedding_length {hidden} / {p}attention.head_count {heads}"
        if hidden % heads:
            raise GGUFConfigError(f"the head dimension ({source}) is not a whole number")
    if head_dim % 2:
        raise GGUFConfigError(f"the head dimension ({source}) is {head_dim}; rotary embeddings need it even")
    return head_dim


def hf_config(
    md: Mapping[str, Any], *, tied: bool, rope_factors: Sequence[float] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """config.json for a GGUF's metadata; GGUFConfigError, naming the key, for an
    architecture or setting the engine does not run and for any malformed value."""
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise GGUFConfigError(
            f"GGUF architecture {_show(arch)} is not supported (general.architecture; supported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    p = f"{arch}."
    if arch == "bert":
        return _bert_config(md, dtype)
    heads = _int(md, p + "attention.head_count")
    hidden = _int(md, p + "embedding_length")
    kv_heads = _int(md, p + "attention.head_count_kv", heads)
    if heads % kv_heads:
        raise GGUFConfigError(
            f"GGUF metadata {p}attention.head_count_kv {kv_heads} should divide "
            f"{p}attention.head_count {heads}"
        )
    head_dim = _head_dim(md, p, hidden, heads)
    vocab, vocab_key = _vocab_size(md, p)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": _int(md, p + "block_count"),
        "intermediate_size": _int(md, p + "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": _float(md, p + "attention.layer_norm_rms_epsilon"),
        "rope_theta": _float(md, p + "rope.freq_base", 10000.0),
        "max_position_embeddings": _int(md, p + "context_length"),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    scaling = md.get(p + "rope.scaling.type")
    if scaling is not None and scaling != "none":
        if scaling != "linear":
            raise GGUFConfigError(
                f"RoPE scaling {_show(scaling)} ({p}rope.scaling.type) is not supported (linear is)"
            )
        config["rope_scaling"] = {"rope_type": "linear", "factor": _float(md, p + "rope.scaling.factor")}
    if rope_factors is not None:
        if len(rope_factors) != head_dim // 2:
            raise GGUFConfigError(
                f"rope_freqs.weight has {len(rope_factors)} factors; head_dim {head_dim} needs {head_dim // 2}"
            )
        if not all(0 < _number(f) < math.inf for f in rope_factors):
            raise GGUFConfigError("rope_freqs.weight should hold positive finite factors")
        config["rope_factors"] = [float(f) for f in rope_factors]
    for name in ("bos_token_id", "eos_token_id"):
        if md.get(f"tokenizer.ggml.{name}") is not None:
            config[name] = _int(md, f"tokenizer.ggml.{name}", low=0)
            if config[name] >= vocab:
                raise GGUFConfigError(
                    f"GGUF metadata tokenizer.ggml.{name} {config[name]} is outside the vocabulary "
                    f"of {vocab} tokens ({vocab_key})"
                )
    return config


def _bert_config(md: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json of a ``bert`` GGUF (all-MiniLM and its kin): BertModel, mean pooling."""
    pooling = md.get("bert.pooling_type", _MEAN_POOLING)
    if pooling != _MEAN_POOLING:
        raise GGUFConfigError(
            f"bert.pooling_type {_show(pooling)} is not supported: the engine pools BERT models by the "
            "mean (pooling_type 1)"
        )
    heads, hidden = _int(md, "bert.attention.head_count"), _int(md, "bert.embedding_length")
    if hidden % heads:
        raise GGUFConfigError(f"bert.embedding_length {hidden} is not a multiple of bert.attention.head_count {heads}")
    vocab, _ = _vocab_size(md, "bert.")
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": hidden,
        "num_hidden_layers": _int(md, "bert.block_count"),
        "intermediate_size": _int(md, "bert.feed_forward_length"),
        "num_attention_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": _int(md, "bert.context_length"),
        "type_vocab_size": _int(md, "bert.token_type_count", 2),
        "layer_norm_eps": _float(md, "bert.attention.layer_norm_epsilon"),
        "hidden_act": "gelu",
        "torch_dtype": dtype,
    }
