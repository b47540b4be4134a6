"""A GGUF's metadata as the Hugging Face ``config.json`` the engine reads.

llama.cpp writes the architecture under ``general.architecture`` and its numbers
under ``<arch>.*`` keys; this maps them to transformers' names for the
architectures the engine runs (llama: Llama 2/3.x, SmolLM2, DeepSeek-R1's Llama
distills; qwen2: Qwen2/2.5, DeepSeek-R1's Qwen distills; mistral files say
``llama``; qwen3 and qwen3moe: Qwen3 dense and MoE; gemma3: Gemma 3's text model;
phi3: Phi-3/3.5 and Phi-4-mini; bert: BertModel embedding models, mean-pooled).
Written at import next to the GGUF, so a GGUF model is loaded, planned and fetched
by layer range exactly like a safetensors one. The newer architectures get the keys
transformers 5 writes (``rope_parameters``, ``layer_types``).

Where llama.cpp fixes a setting in code rather than metadata, this fixes it the same
way: Qwen3-MoE normalizes its top-k weights (unless ``expert_weights_norm`` says
otherwise); Gemma 3 alternates five sliding layers and one global layer (unless
``attention.sliding_window_pattern`` is given), rotates sliding layers with base
10000 (unless ``rope.freq_base_swa``), and scales queries by 1/sqrt(head_dim) (by
1/sqrt(hidden / heads) for the 62-layer 27B, as Google's reference does).

Two facts are not metadata: whether the head is tied (no ``output.weight``
tensor) and the per-frequency RoPE factors of Llama 3.1+ files
(``rope_freqs.weight``, llama.cpp's form of ``rope_scaling: llama3``), and Phi-3's
longrope factors (``rope_factors_short.weight`` and ``rope_factors_long.weight``). The
caller passes them; the factors go in ``rope_factors``, a key of ours that
node/engine/config.py reads (inverse frequencies are divided by them, as
llama.cpp does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from protocol.gguf import GGUFArray, short_f32

__all__ = ["ARCHITECTURES", "SUPPORTED_TYPES", "GGUFConfigError", "hf_config"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
    "bert": "BertModel",
}
# transformers' model_type where it is not the GGUF's architecture name.
_MODEL_TYPES = {"qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}
_MEAN_POOLING = 1  # llama.cpp's pooling_type: 0 none, 1 mean, 2 cls, 3 last
# The tensor types the engine dequantizes (node/engine/gguf.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
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


def _bool(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key, default)
    if not isinstance(value, bool):
        raise GGUFConfigError(f"GGUF metadata {key!r} should be true or false, got {_show(value)}")
    return value


def _factors(values: Sequence[float], name: str, count: int, what: str) -> list[float]:
    if len(values) != count:
        raise GGUFConfigError(f"{name} has {len(values)} factors; {what} needs {count}")
    if not all(0 < _number(f) < math.inf for f in values):
        raise GGUFConfigError(f"{name} should hold positive finite factors")
    return [short_f32(float(f)) for f in values]  # as written: 1.05, not 1.0499999523162842


def _linear_scaling(md: Mapping[str, Any], p: str) -> float | None:
    """The factor of a linear RoPE scaling, None for none; GGUFConfigError for another kind."""
    scaling = md.get(p + "rope.scaling.type")
    if scaling is None or scaling == "none":
        return None
    if scaling != "linear":
        raise GGUFConfigError(
            f"RoPE scaling {_show(scaling)} ({p}rope.scaling.type) is not supported (linear is)"
        )
    return _float(md, p + "rope.scaling.factor")


def _rope(theta: float, factor: float | None) -> dict[str, Any]:
    """transformers 5's rope_parameters for a default or linear RoPE."""
    if factor is None:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def hf_config(
    md: Mapping[str, Any], *, tied: bool, rope_factors: Sequence[float] | None = None,
    longrope: tuple[Sequence[float], Sequence[float]] | None = None, dtype: str = "float32",
) -> dict[str, Any]:
    """config.json for a GGUF's metadata; GGUFConfigError, naming the key, for an
    architecture or setting the engine does not run and for any malformed value.
    ``rope_factors``: rope_freqs.weight's values; ``longrope``: Phi-3's
    (rope_factors_short.weight, rope_factors_long.weight) values."""
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
    if arch == "phi3":  # its rope.dimension_count is the rotated part of a head
        head_dim = _int(md, p + "attention.key_length", hidden // heads)
        if md.get(p + "attention.key_length") is None and hidden % heads:
            raise GGUFConfigError(
                f"the head dimension ({p}embedding_length {hidden} / {p}attention.head_count {heads}) "
                "is not a whole number"
            )
    else:
        head_dim = _head_dim(md, p, hidden, heads)
    vocab, vocab_key = _vocab_size(md, p)
    layers = _int(md, p + "block_count")
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 0,  # set below
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": _float(md, p + "attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": _int(md, p + "context_length"),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    theta = _float(md, p + "rope.freq_base", 10000.0)
    if arch == "qwen3moe":
        config.update(_qwen3moe(md, p))
        config["intermediate_size"] = _int(md, p + "feed_forward_length", config["moe_intermediate_size"])
    else:
        config["intermediate_size"] = _int(md, p + "feed_forward_length")
    if arch in ("llama", "qwen2"):
        config["rope_theta"] = theta
        factor = _linear_scaling(md, p)
        if factor is not None:
            config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        if rope_factors is not None:
            config["rope_factors"] = _factors(rope_factors, "rope_freqs.weight", head_dim // 2,
                                              f"head_dim {head_dim}")
    elif arch in ("qwen3", "qwen3moe"):
        config.update({
            "rope_parameters": _rope(theta, _linear_scaling(md, p)), "attention_bias": False,
            "use_sliding_window": False, "sliding_window": None,
        })
        if arch == "qwen3":  # Qwen3MoeConfig has no layer_types
            config["layer_types"] = ["full_attention"] * layers
    elif arch == "gemma3":
        del config["hidden_act"]  # Gemma's config names it hidden_activation
        config.update(_gemma3(md, p, theta, head_dim, layers))
    else:
        config.update(_phi3(md, p, theta, head_dim, longrope))
    # pad too: transformers' default pad id for a family (Phi-3's 32000) may lie outside the vocabulary
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if md.get(f"tokenizer.ggml.{key}") is not None:
            config[name] = _int(md, f"tokenizer.ggml.{key}", low=0)
            if config[name] >= vocab:
                raise GGUFConfigError(
                    f"GGUF metadata tokenizer.ggml.{key} {config[name]} is outside the vocabulary "
                    f"of {vocab} tokens ({vocab_key})"
                )
    return config


_SOFTMAX_GATING = 1  # llama.cpp's expert_gating_func: 1 softmax, 2 sigmoid


def _qwen3moe(md: Mapping[str, Any], p: str) -> dict[str, Any]:
    """Qwen3-MoE's experts: every layer sparse, softmax router, top-k weights renormalized."""
    experts = _int(md, p + "expert_count")
    used = _int(md, p + "expert_used_count")
    if used > experts:
        raise GGUFConfigError(
            f"GGUF metadata {p}expert_used_count {used} is more than {p}expert_count {experts}"
        )
    gating = md.get(p + "expert_gating_func", _SOFTMAX_GATING)
    if gating != _SOFTMAX_GATING:
        raise GGUFConfigError(
            f"GGUF metadata {p + 'expert_gating_func'!r} {_show(gating)} is not supported (Qwen3-MoE routes "
            "with a softmax, 1)"
        )
    return {
        "num_experts": experts,
        "num_local_experts": experts,  # transformers 5 writes this name for num_experts
        "num_experts_per_tok": used,
        "moe_intermediate_size": _int(md, p + "expert_feed_forward_length"),
        "norm_topk_prob": _bool(md, p + "expert_weights_norm", True),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


_GEMMA3_PATTERN = 6  # five sliding layers, then one global (llama.cpp's set_swa_pattern(6))
_GEMMA3_SWA_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62


def _gemma3(md: Mapping[str, Any], p: str, theta: float, head_dim: int, layers: int) -> dict[str, Any]:
    window = _int(md, p + "attention.sliding_window", 0, low=0)
    key = p + "attention.sliding_window_pattern"
    pattern = md.get(key, _GEMMA3_PATTERN)
    if window == 0:  # llama.cpp: no sliding window at all
        sliding = [False] * layers
    elif isinstance(pattern, int) and not isinstance(pattern, bool):
        period = _int(md, key, _GEMMA3_PATTERN)
        sliding = [(i + 1) % period != 0 for i in range(layers)]
    elif isinstance(pattern, GGUFArray | list | tuple) and len(pattern) == layers \
            and all(isinstance(v, bool) for v in pattern):
        sliding = list(pattern)
    else:
        raise GGUFConfigError(
            f"GGUF metadata {key!r} should be a period or one true/false per layer ({layers}), "
            f"got {_show(pattern)}"
        )
    hidden, heads = md[p + "embedding_length"], md[p + "attention.head_count"]
    softcap = md.get(p + "final_logit_softcapping")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": window or None,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "query_pre_attn_scalar": hidden // heads if layers == _GEMMA3_27B_LAYERS else head_dim,
        "final_logit_softcapping": None if softcap is None else _float(md, p + "final_logit_softcapping"),
        "attn_logit_softcapping": None,
        "rope_parameters": {
            "full_attention": _rope(theta, _linear_scaling(md, p)),
            "sliding_attention": _rope(_float(md, p + "rope.freq_base_swa", _GEMMA3_SWA_BASE), None),
        },
    }


def _phi3(md: Mapping[str, Any], p: str, theta: float, head_dim: int,
          longrope: tuple[Sequence[float], Sequence[float]] | None) -> dict[str, Any]:
    key = p + "rope.dimension_count"
    rotary = _int(md, key, head_dim)
    if rotary % 2 or rotary > head_dim:
        raise GGUFConfigError(
            f"GGUF metadata {key!r} {rotary} should be even and at most the head dimension {head_dim}"
        )
    partial = rotary / head_dim
    window = _int(md, p + "attention.sliding_window", 0, low=0)
    out: dict[str, Any] = {"partial_rotary_factor": partial, "sliding_window": window or None}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
    if longrope is not None:
        short, long = (_factors(f, f"rope_factors_{name}.weight", rotary // 2, f"{key} {rotary}")
                       for f, name in zip(longrope, ("short", "long"), strict=True))
        original = _int(md, p + "rope.scaling.original_context_length")
        rope = {"rope_type": "longrope", "rope_theta": theta, "short_factor": short, "long_factor": long,
                "original_max_position_embeddings": original, "partial_rotary_factor": partial}
        out["original_max_position_embeddings"] = original
        # transformers derives the attention factor from the two lengths, as llama.cpp's
        # converter did when it wrote rope.scaling.attn_factor; a file that says otherwise wins.
        scale = md[p + "context_length"] / original
        implied = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 and original > 1 else 1.0
        if md.get(p + "rope.scaling.attn_factor") is not None:
            given = _float(md, p + "rope.scaling.attn_factor")
            if abs(given - implied) > 1e-5 * implied:
                rope["attention_factor"] = given
    out["rope_parameters"] = rope
    return out


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
