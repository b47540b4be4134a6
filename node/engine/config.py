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
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (rope_scaling / rope_parameters)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0


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
    # Mixture of experts (Qwen3-MoE, node/engine/moe.py): the layers in sparse_layers have
    # num_experts experts of moe_intermediate_size, num_experts_per_tok chosen per token;
    # the others a dense MLP of intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    sparse_layers: tuple[int, ...] = ()

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is the mixture of experts."""
        return layer in self.sparse_layers

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float32, length head_dim/2), scaling applied as transformers does."""
        dim = self.head_dim
        inv = 1.0 / (
            self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
        )
        rs = self.rope_scaling
        if self.rope_factors is not None:
            inv = inv / np.asarray(self.rope_factors, dtype=np.float32)
        if rs is None or rs.rope_type == "default":
            return inv.astype(np.float32)
        if rs.rope_type == "linear":
            return (inv / rs.factor).astype(np.float32)
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


def _parse_rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers < 5 writes rope_theta + rope_scaling; 5.x writes rope_parameters
    # (with rope_theta inside). Read both spellings, the newer one winning.
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    source = params if isinstance(params, Mapping) else scaling
    theta_raw = None
    if isinstance(params, Mapping):
        theta_raw = params.get("rope_theta")
    if theta_raw is None:
        theta_raw = raw.get("rope_theta")
    # transformers' default when a config omits it (early Llama configs do).
    theta = 10000.0 if theta_raw is None else float(theta_raw)
    if source is None:
        return theta, None
    if not isinstance(source, Mapping):
        raise ModelConfigError(f"config.json rope_scaling should be an object, got {source!r}")
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    try:
        factor = float(source["factor"])
        if rope_type == "linear":
            return theta, RopeScaling("linear", factor=factor)
        return theta, RopeScaling(
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


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    """Validate a parsed config.json and turn it into a ModelConfig."""
    archs = raw.get("architectures")
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
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is")
    if raw.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    model_type = SUPPORTED_ARCHITECTURES[arch]

    hidden = _require(raw, "hidden_size", int)
    layers = _require(raw, "num_hidden_layers", int)
    heads = _require(raw, "num_attention_heads", int)
    kv_heads = raw.get("num_key_value_heads") or heads  # transformers: absent means MHA
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ModelConfigError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    theta, scaling = _parse_rope(raw)

    sliding: int | None = None
    if model_type == "mistral":
        sliding = raw.get("sliding_window")
    elif model_type in ("qwen2", "qwen3_moe"):
        types = raw.get("layer_types") or []
        if raw.get("use_sliding_window") or any(t != "full_attention" for t in types):
            raise UnsupportedModelError(
                f"{arch} sliding-window attention (use_sliding_window/layer_types) is not supported"
            )
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    factors = raw.get("rope_factors")
    if factors is not None and (
        not isinstance(factors, list) or len(factors) != int(head_dim) // 2
        or not all(isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in factors)
    ):
        raise ModelConfigError(f"config.json rope_factors must be {int(head_dim) // 2} positive numbers")
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
        # All three architectures default to untied in transformers.
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(raw.get("attention_bias", False)),
        rope_scaling=scaling,
        sliding_window=int(sliding) if sliding else None,
        torch_dtype=str(dtype) if dtype else None,
        rope_factors=tuple(float(f) for f in factors) if factors is not None else None,
        **(_parse_moe(raw, layers) if model_type == "qwen3_moe" else {}),
    )


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
