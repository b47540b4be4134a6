"""A GGUF's metadata as the Hugging Face ``config.json`` the engine reads.

llama.cpp writes the architecture under ``general.architecture`` and its numbers
under ``<arch>.*`` keys; this maps them to transformers' names for the
architectures the engine runs (llama: Llama 2/3.x, SmolLM2, DeepSeek-R1's Llama
distills; qwen2: Qwen2/2.5, DeepSeek-R1's Qwen distills; mistral files say
``llama``). Written at import next to the GGUF, so a GGUF model is loaded, planned
and fetched by layer range exactly like a safetensors one.

Two facts are not metadata: whether the head is tied (no ``output.weight``
tensor) and the per-frequency RoPE factors of Llama 3.1+ files
(``rope_freqs.weight``, llama.cpp's form of ``rope_scaling: llama3``). The caller
passes both; the factors go in ``rope_factors``, a key of ours that
node/engine/config.py reads (inverse frequencies are divided by them, as
llama.cpp does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ARCHITECTURES", "SUPPORTED_TYPES", "GGUFConfigError", "hf_config"]

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# The tensor types the engine dequantizes (node/engine/gguf.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFConfigError(ValueError):
    """A GGUF whose metadata does not describe a model the engine runs."""


def _get(md: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = md.get(key, default)
    if value is None:
        raise GGUFConfigError(f"the GGUF metadata has no {key!r}; the engine needs it")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise GGUFConfigError(f"GGUF metadata {key!r} should be {kind.__name__}, got {value!r}")
    return value


def hf_config(
    md: Mapping[str, Any], *, tied: bool, rope_factors: Sequence[float] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """config.json for a GGUF's metadata; GGUFConfigError for an architecture or
    setting the engine does not run."""
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFConfigError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    p = f"{arch}."
    heads = _get(md, p + "attention.head_count", int)
    hidden = _get(md, p + "embedding_length", int)
    kv_heads = _get(md, p + "attention.head_count_kv", int, heads)
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = md.get(p + "vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        raise GGUFConfigError(f"the GGUF metadata has no {p}vocab_size and no tokenizer.ggml.tokens")
    head_dim = md.get(p + "attention.key_length") or md.get(p + "rope.dimension_count") or hidden // heads
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": _get(md, p + "block_count", int),
        "intermediate_size": _get(md, p + "feed_forward_length", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(head_dim),
        "vocab_size": vocab,
        "rms_norm_eps": _get(md, p + "attention.layer_norm_rms_epsilon", float),
        "rope_theta": _get(md, p + "rope.freq_base", float, 10000.0),
        "max_position_embeddings": _get(md, p + "context_length", int),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    scaling = md.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFConfigError(f"RoPE scaling {scaling!r} is not supported (linear is)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": _get(md, p + "rope.scaling.factor", float)}
    if rope_factors is not None:
        if len(rope_factors) != int(head_dim) // 2:
            raise GGUFConfigError(
                f"rope_freqs.weight has {len(rope_factors)} factors; head_dim {head_dim} needs {int(head_dim) // 2}"
            )
        config["rope_factors"] = [float(f) for f in rope_factors]
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = md.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and not isinstance(value, bool):
            config[name] = value
    return config
