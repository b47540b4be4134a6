"""Model configuration: Hugging Face config.json -> a validated, hashable ModelConfig.

Every architectural number the engine uses comes from the checkpoint's config.json; the
only defaults are the ones transformers itself applies when a key is absent (documented
next to each). Problems are reported as ModelConfigError / UnsupportedModelError.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.engine.errors import ModelConfigError, UnsupportedModelError

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
# Encoder-only embedding models, served by node/engine/bert.py (no JAX imported here).
BERT_ARCHITECTURES = ("BertModel",)


def is_bert(raw: Mapping[str, Any]) -> bool:
    """Whether a config.json describes a BERT embedding model (BertModel, model_type bert)."""
    archs = raw.get("architectures")
    if isinstance(archs, list) and len(archs) == 1 and archs[0] in BERT_ARCHITECTURES:
        return True
    return not archs and raw.get("model_type") == "bert"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# transformers' activation names for each supported MLP (gate activation * up).
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"  # a kv_dtype the engine chooses
KV_DTYPES = (AUTO, "float32", "float16", "bfloat16")
# What "auto" stores beside a float32 compute dtype (a 16-bit compute dtype stores its
# own: a wider cache would only hold the same rounded numbers). float16 keeps 3 more
# mantissa bits than bfloat16 and keys/values stay far inside its range; measured in the
# README (greedy agreement with the float32 cache, logit differences).
AUTO_KV_DTYPE = "float16"


def resolve_kv_dtype(kv_dtype: str | None, compute_dtype: str) -> str:
    """The cache's dtype for `kv_dtype` ("auto" or None: AUTO_KV_DTYPE beside float32
    compute, else the compute dtype); a name outside KV_DTYPES raises ValueError."""
    if kv_dtype is None or kv_dtype == AUTO:
        return AUTO_KV_DTYPE if compute_dtype == "float32" else compute_dtype
    if kv_dtype not in KV_DTYPES:
        raise ValueError(
            f"kv_dtype {kv_dtype!r} is not supported (use one of {', '.join(KV_DTYPES)})"
        )
    return kv_dtype


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (rope_scaling / rope_parameters)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0
    # longrope (Phi-3): per-frequency divisors for sequences up to / past the original
    # context, and the factor cos and sin are multiplied by.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one decoder-only transformer, as the engine runs it.

    Frozen and hashable so it can be a static argument of jitted functions: one
    compilation serves every partition and session of the same model shape.
    """

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    torch_dtype: str | None = None
    # Per-frequency divisors of the inverse frequencies (GGUF rope_freqs.weight, llama.cpp's
    # form of Llama 3.1's rope scaling), applied after rope_scaling.
    rope_factors: tuple[float, ...] | None = None
    # Which layers attend within sliding_window; None: every layer, when a window is set
    # (Mistral). Qwen2/3 and Gemma 3 name each layer's type in config.json.
    layer_sliding: tuple[bool, ...] | None = None
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # Gemma: RMSNorm weights apply as (1 + w)
    activation: str = "silu"  # the MLP gate's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden)
    query_scale: float | None = None  # attention scale; None: head_dim ** -0.5
    sandwich_norms: bool = False  # Gemma: norms after attention and around the MLP too
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    attn_softcap: float | None = None  # attention scores, the same way
    # Sliding layers' own RoPE: base (Gemma 3's rope_local_base_freq) and scaling.
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling | None = None
    rotary_dim: int | None = None  # partial rotary (Phi): the first features of each head
    fused: bool = False  # Phi-3 checkpoints: qkv_proj and gate_up_proj, split at load
    # Mixture of experts (Qwen3-MoE, node/engine/moe.py): the layers in sparse_layers have
    # num_experts experts of moe_intermediate_size, num_experts_per_tok chosen per token;
    # the others a dense MLP of intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    sparse_layers: tuple[int, ...] = ()
    # A GGUF's matrices in a type other than F32, (Hugging Face name, GGUF type) sorted by
    # name (config.json's gguf_matrix_types, written with the GGUF's sidecars): what the
    # memory figures count for blocks kept as the file holds them (blocks.py).
    matrix_types: tuple[tuple[str, str], ...] = ()

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is the mixture of experts."""
        return layer in self.sparse_layers

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def rope_dim(self) -> int:
        """Features of each head that RoPE rotates (the first rope_dim; the rest pass)."""
        return self.rotary_dim or self.head_dim

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends within sliding_window."""
        if self.sliding_window is None:
            return False
        return True if self.layer_sliding is None else self.layer_sliding[layer]

    @property
    def any_sliding(self) -> bool:
        return any(self.is_sliding(i) for i in range(self.num_layers))

    def rope_for(self, sliding: bool) -> tuple[float, RopeScaling | None]:
        """RoPE base and scaling of a sliding (local) or full layer."""
        if sliding and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def inv_freq(self, sliding: bool = False, long: bool = False) -> np.ndarray:
        """RoPE inverse frequencies (float32, length rope_dim/2), scaling applied as
        transformers does; `sliding` picks a local layer's RoPE, `long` longrope's long
        factors."""
        theta, rs = self.rope_for(sliding)
        dim = self.rope_dim
        inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        if self.rope_factors is not None:
            inv = inv / np.asarray(self.rope_factors, dtype=np.float32)
        if rs is None or rs.rope_type == "default":
            return inv.astype(np.float32)
        if rs.rope_type == "linear":
            return (inv / rs.factor).astype(np.float32)
        if rs.rope_type == "longrope":
            factors = np.asarray(rs.long_factor if long else rs.short_factor, np.float32)
            return (1.0 / (factors * theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))).astype(
                np.float32
            )
        # llama3: keep high frequencies, divide low ones by `factor`, interpolate between.
        old_ctx = rs.original_max_position_embeddings
        low_wavelen = old_ctx / rs.low_freq_factor
        high_wavelen = old_ctx / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old_ctx / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


def _require(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in raw or raw[key] is None:
        raise ModelConfigError(
            f"config.json has no {key!r}; the engine needs it to build the model. "
            "Use the config.json that came with the checkpoint."
        )
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelConfigError(f"config.json key {key!r} should be {kind.__name__}, got {value!r}")
    return value


def _factors(source: Mapping[str, Any], key: str, count: int) -> tuple[float, ...]:
    values = source.get(key)
    if (
        not isinstance(values, list) or len(values) != count
        or not all(isinstance(f, int | float) and not isinstance(f, bool) and 0 < f < math.inf
                   for f in values)
    ):
        raise ModelConfigError(f"config.json longrope {key} must be {count} positive numbers")
    return tuple(float(f) for f in values)


def _rope_scaling(
    source: Mapping[str, Any], raw: Mapping[str, Any], rope_dim: int
) -> RopeScaling | None:
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return None
    try:
        if rope_type == "longrope":
            original = int(
                source.get("original_max_position_embeddings")
                or raw["original_max_position_embeddings"]
            )
            factor = source.get("factor")
            factor = float(factor) if factor else raw["max_position_embeddings"] / original
            attention = source.get("attention_factor")
            if attention is None:
                attention = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
                )
            return RopeScaling(
                "longrope", factor=factor, original_max_position_embeddings=original,
                short_factor=_factors(source, "short_factor", rope_dim // 2),
                long_factor=_factors(source, "long_factor", rope_dim // 2),
                attention_factor=float(attention),
            )
        factor = float(source["factor"])
        if rope_type == "linear":
            return RopeScaling("linear", factor=factor)
        return RopeScaling(
            "llama3",
            factor=factor,
            low_freq_factor=float(source["low_freq_factor"]),
            high_freq_factor=float(source["high_freq_factor"]),
            original_max_position_embeddings=int(source["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ModelConfigError(
            f"config.json {rope_type} rope scaling lacks {exc.args[0]!r}"
        ) from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelConfigError(f"config.json {rope_type} rope scaling is malformed: {exc}") from None


def _parse_rope(
    raw: Mapping[str, Any], rope_dim: int, layer_type: str | None = None
) -> tuple[float, RopeScaling | None]:
    # transformers < 5 writes rope_theta + rope_scaling; 5.x writes rope_parameters
    # (with rope_theta inside), per layer type for Gemma 3. Read both spellings, the
    # newer one winning.
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    elif isinstance(params, Mapping) and "full_attention" in params:
        params = params["full_attention"]
    scaling = raw.get("rope_scaling")
    source = params if isinstance(params, Mapping) else scaling
    theta_raw = None
    if isinstance(params, Mapping):
        theta_raw = params.get("rope_theta")
    if theta_raw is None:
        theta_raw = raw.get("rope_theta")
    # transformers' default when a config omits it (early Llama configs do).
    theta = 10000.0 if theta_raw is None else _positive(theta_raw, "rope_theta")
    if source is None:
        return theta, None
    if not isinstance(source, Mapping):
        raise ModelConfigError(f"config.json rope_scaling should be an object, got {source!r}")
    return theta, _rope_scaling(source, raw, rope_dim)


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ModelConfigError(f"config.json {key} should be a positive number, got {value!r}")
    return float(value)


def _optional_positive(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else _positive(value, key)


def _layer_sliding(raw: Mapping[str, Any], model_type: str, layers: int) -> tuple[bool, ...] | None:
    """Each layer's attention type from `layer_types` (transformers 5), else from the older
    keys (Gemma 3's sliding_window_pattern, Qwen2/3's use_sliding_window and
    max_window_layers); None where every layer follows sliding_window (Mistral, Phi-3)."""
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or not all(
            t in ("full_attention", "sliding_attention") for t in types
        ):
            raise ModelConfigError(
                f"config.json layer_types should list {layers} of 'full_attention' or "
                "'sliding_attention'"
            )
        return tuple(t == "sliding_attention" for t in types)
    if model_type == "gemma3_text":
        pattern = raw.get("sliding_window_pattern", 6)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ModelConfigError(f"config.json sliding_window_pattern should be >= 1, got {pattern!r}")
        return tuple(bool((i + 1) % pattern) for i in range(layers))
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window"):
            return tuple(False for _ in range(layers))
        first = raw.get("max_window_layers", layers)
        return tuple(i >= first for i in range(layers))
    return None


def _parse_moe(raw: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The mixture-of-experts keys of a Qwen3-MoE config.json, as ModelConfig fields.

    Sparse layers as transformers decides them: layer i is sparse unless it is listed in
    mlp_only_layers, when (i + 1) is a multiple of decoder_sparse_step."""
    names = [k for k in ("num_experts", "num_local_experts") if raw.get(k) is not None]
    if not names:
        raise ModelConfigError(
            "config.json has no 'num_experts' (or 'num_local_experts'); a Qwen3-MoE model "
            "needs its expert count. Use the config.json that came with the checkpoint."
        )
    experts = _require(raw, names[0], int)
    if len(names) == 2 and raw[names[1]] != experts:
        raise ModelConfigError(
            f"config.json num_experts={raw['num_experts']!r} and num_local_experts="
            f"{raw['num_local_experts']!r} disagree; keep one of them"
        )
    top_k = _require(raw, "num_experts_per_tok", int)
    width = _require(raw, "moe_intermediate_size", int)
    step = raw.get("decoder_sparse_step", 1)  # transformers' defaults, here and below
    dense = raw.get("mlp_only_layers") or []
    norm = raw.get("norm_topk_prob", False)
    if experts < 1 or width < 1:
        raise ModelConfigError(
            f"config.json num_experts={experts} and moe_intermediate_size={width} must be >= 1"
        )
    if not 1 <= top_k <= experts:
        raise ModelConfigError(
            f"config.json num_experts_per_tok={top_k} must be between 1 and num_experts={experts}"
        )
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ModelConfigError(f"config.json decoder_sparse_step should be an integer >= 1, got {step!r}")
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ModelConfigError(f"config.json mlp_only_layers should be a list of layer numbers, got {dense!r}")
    if not isinstance(norm, bool):
        raise ModelConfigError(f"config.json norm_topk_prob should be true or false, got {norm!r}")
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"Qwen3-MoE experts with hidden_act {raw['hidden_act']!r}: only 'silu' is supported")
    if raw.get("shared_expert_intermediate_size"):
        raise UnsupportedModelError("shared experts (shared_expert_intermediate_size) are not supported")
    sparse = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": width,
        "norm_topk_prob": norm,
        "sparse_layers": sparse,
    }


def _text_config(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """Gemma3ForConditionalGeneration's text_config, as the causal LM it holds."""
    text = raw.get("text_config")
    if not isinstance(text, Mapping):
        raise ModelConfigError("config.json of Gemma3ForConditionalGeneration has no text_config object")
    merged = dict(text)
    merged["architectures"] = ["Gemma3ForCausalLM"]
    if "tie_word_embeddings" not in merged:
        merged["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    for key in ("dtype", "torch_dtype"):
        if key in raw and key not in merged:
            merged[key] = raw[key]
    return merged


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    """Validate a parsed config.json and turn it into a ModelConfig."""
    archs = raw.get("architectures")
    if archs == ["Gemma3ForConditionalGeneration"]:
        # The multimodal Gemma 3: its language model runs as Gemma3ForCausalLM (the
        # weights' prefix is the reader's: WeightSource), its vision tower stays unread.
        raw = _text_config(raw)
        archs = raw["architectures"]
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise UnsupportedModelError(
                f"config.json architectures should name one class, got {archs!r}"
            )
        arch = archs[0]
    elif raw.get("model_type") in _MODEL_TYPES:
        arch = _MODEL_TYPES[raw["model_type"]]
    else:
        raise ModelConfigError("config.json has neither 'architectures' nor a known 'model_type'")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    model_type = SUPPORTED_ARCHITECTURES[arch]
    gemma = model_type == "gemma3_text"
    act = raw.get("hidden_activation" if gemma else "hidden_act", "gelu_pytorch_tanh" if gemma else "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    if raw.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")

    hidden = _require(raw, "hidden_size", int)
    layers = _require(raw, "num_hidden_layers", int)
    heads = _require(raw, "num_attention_heads", int)
    kv_heads = raw.get("num_key_value_heads") or heads  # transformers: absent means MHA
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ModelConfigError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    rotary_dim: int | None = None
    params = raw.get("rope_parameters")
    partial = raw.get("partial_rotary_factor")
    if partial is None and isinstance(params, Mapping):
        partial = params.get("partial_rotary_factor")
    if partial is not None:
        factor = _positive(partial, "partial_rotary_factor")
        rotary_dim = int(int(head_dim) * factor)
        if not 2 <= rotary_dim <= head_dim or rotary_dim % 2:
            raise ModelConfigError(
                f"config.json partial_rotary_factor {partial!r} gives {rotary_dim} rotary "
                f"features of {head_dim}; RoPE needs an even number from 2 to head_dim"
            )
        rotary_dim = None if rotary_dim == head_dim else rotary_dim
    rope_dim = rotary_dim or int(head_dim)
    theta, scaling = _parse_rope(raw, rope_dim, "full_attention")

    sliding = raw.get("sliding_window")
    layer_sliding = _layer_sliding(raw, model_type, layers)
    if model_type == "llama" or (layer_sliding is not None and not any(layer_sliding)):
        sliding = None
    if model_type == "qwen3_moe" and raw.get("use_sliding_window"):
        raise UnsupportedModelError(f"{arch} sliding-window attention (use_sliding_window) is not supported")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not raw.get("use_sliding_window"):
        sliding = layer_sliding = None  # as transformers: no window unless asked for
    if sliding is not None and (isinstance(sliding, bool) or not isinstance(sliding, int) or sliding < 1):
        raise ModelConfigError(f"config.json sliding_window should be a positive integer, got {sliding!r}")
    if layer_sliding is not None and any(layer_sliding) and sliding is None:
        raise ModelConfigError("config.json names sliding layers but has no sliding_window")
    local_theta: float | None = None
    local_scaling: RopeScaling | None = None
    if gemma:
        local_theta, local_scaling = _parse_rope(raw, rope_dim, "sliding_attention")
        if not isinstance(params, Mapping) or "sliding_attention" not in params:
            # Older configs: rope_local_base_freq, default RoPE for the local layers.
            local_theta = _positive(raw.get("rope_local_base_freq", 10000.0), "rope_local_base_freq")
            local_scaling = None
            if raw.get("rope_theta") is None and not isinstance(params, Mapping):
                theta = 1_000_000.0  # Gemma 3's global default
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention (an encoder Gemma) is not supported")
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    factors = raw.get("rope_factors")
    if factors is not None and (
        not isinstance(factors, list) or len(factors) != rope_dim // 2
        or not all(isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in factors)
    ):
        raise ModelConfigError(f"config.json rope_factors must be {rope_dim // 2} positive numbers")
    query_scalar = _optional_positive(raw, "query_pre_attn_scalar") if gemma else None
    qkv_bias = model_type == "qwen2" or bool(raw.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=_require(raw, "intermediate_size", int),
        vocab_size=_require(raw, "vocab_size", int),
        rms_norm_eps=_require(raw, "rms_norm_eps", float),
        rope_theta=theta,
        max_position_embeddings=_require(raw, "max_position_embeddings", int),
        # Gemma ties by default in transformers; the others do not.
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        qkv_bias=qkv_bias,
        o_bias=model_type != "qwen2" and bool(raw.get("attention_bias", False)),
        rope_scaling=scaling,
        sliding_window=int(sliding) if sliding else None,
        torch_dtype=str(dtype) if dtype else None,
        rope_factors=tuple(float(f) for f in factors) if factors is not None else None,
        layer_sliding=layer_sliding if sliding else None,
        qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
        norm_plus_one=gemma,
        activation=ACTIVATIONS[act],
        embed_scale=float(hidden) ** 0.5 if gemma else None,
        query_scale=query_scalar**-0.5 if query_scalar is not None else None,
        sandwich_norms=gemma,
        final_softcap=_optional_positive(raw, "final_logit_softcapping"),
        attn_softcap=_optional_positive(raw, "attn_logit_softcapping") if gemma else None,
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
        rotary_dim=rotary_dim,
        fused=model_type == "phi3",
        matrix_types=_matrix_types(raw),
        **(_parse_moe(raw, layers) if model_type == "qwen3_moe" else {}),
    )


_MAX_MATRIX_TYPES = 1 << 16


def _matrix_types(raw: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    types = raw.get("gguf_matrix_types")
    if types is None:
        return ()
    if not isinstance(types, dict) or len(types) > _MAX_MATRIX_TYPES or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 256 and len(v) <= 16 for k, v in types.items()
    ):
        raise ModelConfigError(
            f"config.json gguf_matrix_types should map at most {_MAX_MATRIX_TYPES} tensor names to GGUF types"
        )
    return tuple(sorted(types.items()))


def load_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """Read and validate MODEL_DIR/config.json."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(
            f"{path} does not exist; point the engine at a Hugging Face model directory"
        ) from None
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path} should hold a JSON object")
    return parse_config(raw)
