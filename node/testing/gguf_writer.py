"""Writing a Hugging Face checkpoint as a GGUF file, the way llama.cpp's converter does.

For tests and the tiny demo. Architectures: llama, qwen2, qwen3, qwen3_moe, gemma3_text
and phi3 checkpoints (config.json as transformers 4 or 5 writes it). What the converter
(``convert_hf_to_gguf.py``) does and this does too:

- metadata under llama.cpp's keys, tensors under llama.cpp's names (the ``gguf``
  package's own name map, the one the converter uses);
- Q and K rows permuted for ``llama`` models (its ``permute``), no other architecture;
- Qwen3-MoE's per-expert matrices stacked into one [E, ...] tensor per layer and kind;
- Gemma 3's norm weights stored as 1 + w, its embedding table tied (no output.weight);
- Phi-3's fused qkv_proj and gate_up_proj kept fused, a longrope scaling's factors as
  ``rope_factors_short.weight`` / ``rope_factors_long.weight`` with
  ``rope.scaling.original_context_length`` and ``rope.scaling.attn_factor``;
- ``rope_freqs.weight`` for a Llama 3 rope scaling;
- matrices in ``qtype`` (quantized with the ``gguf`` package, the K types with ggml's
  own quantizer; stacked experts too),
  norms, biases, routers and factors F32, as llama.cpp keeps them.

Where a checkpoint departs from what llama.cpp fixes in code, the writer records it in
the keys llama.cpp has for it, which hf_config reads: a Gemma 3 layer layout other than
five sliding and one global (``attention.sliding_window_pattern``, one bool a layer), a
sliding RoPE base other than 10000 (``rope.freq_base_swa``), Qwen3-MoE without top-k
renormalization (``expert_weights_norm`` false). A Gemma 3 ``query_pre_attn_scalar``
that llama.cpp would not derive cannot be written and is refused.

The tokenizer: a byte-level BPE (``tokenizer.ggml.model`` gpt2: tokens, merges, the
family's ``tokenizer.ggml.pre``), or a SentencePiece-style BPE with byte fallback, as
Gemma's (``llama``: tokens, scores, token types and no merges, as the converter writes
from tokenizer.model; the scores are taken as minus the id, SentencePiece's order).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

__all__ = ["ARCHITECTURES", "DEFAULT_PRE", "write_gguf"]

# transformers model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3", "phi3": "phi3"}
# The tokenizer.ggml.pre llama.cpp's converter finds for each family's real tokenizer.
DEFAULT_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "qwen3moe": "qwen2", "phi3": "gpt-4o"}
_GEMMA3_PATTERN = 6
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _gguf_name(name: str, arch: str = "llama", layers: int = 256) -> str:
    """llama.cpp's name for a checkpoint tensor (the converter's own name map)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    found = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ValueError(f"llama.cpp's {arch} has no tensor for {name!r}")
    return found


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE settings (rope_theta, rope_type, ...) from transformers 5's rope_parameters
    (per layer type for Gemma 3) or 4's rope_theta and rope_scaling."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        if layer_type in params:
            return dict(params[layer_type])
        return dict(params)
    out = dict(cfg.get("rope_scaling") or {})
    out.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    out.setdefault("rope_type", out.get("type", "default"))
    return out


def _llama3_factors(cfg: dict[str, Any], head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for rope_scaling llama3 (its converter's arithmetic)."""
    rs = _rope(cfg)
    base = float(rs["rope_theta"])
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _hparams(w: Any, arch: str, cfg: dict[str, Any]) -> None:
    """The model's metadata, key by key as the converter writes it for ``arch``."""
    import gguf

    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = _rope(cfg)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("llama", "qwen2"):
        w.add_rope_dimension_count(head_dim)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if arch == "qwen3moe":
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if not cfg.get("norm_topk_prob", True):
            w.add_expert_weights_norm(False)
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ValueError("llama.cpp's qwen3moe has experts in every layer")
    elif arch == "gemma3":
        _gemma3(w, cfg, head_dim)
    elif arch == "phi3":
        _phi3(w, cfg, rope, hidden, heads)


def _gemma3(w: Any, cfg: dict[str, Any], head_dim: int) -> None:
    layers = cfg["num_hidden_layers"]
    w.add_sliding_window(cfg["sliding_window"])
    types = cfg.get("layer_types") or []
    default = ["full_attention" if (i + 1) % _GEMMA3_PATTERN == 0 else "sliding_attention"
               for i in range(layers)]
    if types and types != default:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    local = float(_rope(cfg, "sliding_attention")["rope_theta"])
    if local != 10000.0:
        w.add_rope_freq_base_swa(local)
    expected = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else head_dim
    if cfg.get("query_pre_attn_scalar", expected) != expected:
        raise ValueError(
            f"query_pre_attn_scalar {cfg['query_pre_attn_scalar']} is not what llama.cpp derives "
            f"({expected}); a GGUF cannot hold it"
        )
    if cfg.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))


def _phi3(w: Any, cfg: dict[str, Any], rope: dict[str, Any], hidden: int, heads: int) -> None:
    rotary = int(cfg.get("partial_rotary_factor", 1.0) * hidden) // heads
    w.add_rope_dimension_count(rotary)
    w.add_sliding_window(cfg.get("sliding_window") or 0)
    original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if original is not None:
        w.add_rope_scaling_orig_ctx_len(original)
    if rope["rope_type"] == "longrope":
        if original is None:
            raise ValueError("a longrope scaling needs original_max_position_embeddings")
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


def _extra_tensors(arch: str, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    rope = _rope(cfg)
    if arch == "llama" and rope["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_factors(cfg, cfg.get("head_dim") or
                                                   cfg["hidden_size"] // cfg["num_attention_heads"])
    if arch == "phi3" and rope["rope_type"] == "longrope":
        yield "rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32)


def _tokenizer(w: Any, arch: str, cfg: dict[str, Any], root: Path, pre: str | None, chat_template: bool) -> None:
    tok = json.loads((root / "tokenizer.json").read_text())
    tcfg = json.loads((root / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * max(cfg["vocab_size"], len(vocab))
    for text, idx in vocab.items():
        tokens[idx] = text
    added_types = {a["id"]: _CONTROL if a.get("special") else _USER_DEFINED for a in tok.get("added_tokens", [])}
    if tok["model"].get("byte_fallback"):
        # SentencePiece-style: the converter reads tokenizer.model's pieces, scores and types.
        unk = tok["model"].get("unk_token")
        types = []
        for i, t in enumerate(tokens):
            if i in added_types:
                types.append(added_types[i])
            elif t == unk:
                types.append(_UNKNOWN)
            elif re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                types.append(_BYTE)
            else:
                types.append(_NORMAL)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) if ty == _NORMAL else 0.0 for i, ty in enumerate(types)])
        w.add_token_types(types)
        normalizer = json.dumps(tok.get("normalizer"))
        w.add_add_space_prefix("Prepend" in normalizer or "prepend_scheme" in json.dumps(tok.get("pre_tokenizer")))
        if unk is not None:
            w.add_unk_token_id(vocab[unk])
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or DEFAULT_PRE.get(arch, "llama-bpe"))
        w.add_token_list(tokens)
        w.add_token_types([added_types.get(i, _NORMAL) for i in range(len(tokens))])
        w.add_token_merges(merges)
    for key, setter in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                        ("pad_token", w.add_pad_token_id)):
        if tcfg.get(key):
            setter(vocab[tcfg[key]])
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
        add_bos = tcfg.get("bos_token") is not None and arch in ("llama", "gemma3")
    w.add_add_bos_token(bool(add_bos))
    if chat_template and tcfg.get("chat_template"):
        w.add_chat_template(tcfg["chat_template"])


def _checkpoint(arch: str, cfg: dict[str, Any], root: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as the converter hands them to its name map: experts
    stacked, Gemma's norms + 1, llama's Q and K permuted."""
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(root.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    for name, value in tensors.items():
        t = value.astype(np.float32)
        if (m := _EXPERT.fullmatch(name)) is not None:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, kv)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            t = t + np.float32(1.0)  # Gemma3RMSNorm multiplies by (1 + w)
        out[name] = t
    for (layer, kind), by_id in experts.items():
        out[f"model.layers.{layer}.mlp.experts.{kind}.weight"] = np.stack([by_id[i] for i in range(len(by_id))])
    if arch == "gemma3":
        out.pop("lm_head.weight", None)  # tied: llama.cpp writes the embedding table once
    return out


_GGML_QUANTIZED = ("Q4_K", "Q5_K", "Q6_K")


def write_gguf(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, qtype: str = "F32",
               chat_template: bool = True, pre: str | None = None) -> Path:
    """Write the checkpoint in ``model_dir`` as the GGUF ``out`` with matrices in ``qtype``
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ... whatever gguf.quants can quantize, and Q4_K,
    Q5_K, Q6_K through ggml's quantizer: rows must be whole 256-value blocks); ``pre``
    overrides the byte-level tokenizer's tokenizer.ggml.pre (default: the family's)."""
    import gguf
    from gguf.quants import quantize

    root = Path(model_dir)
    cfg = json.loads((root / "config.json").read_text())
    arch = ARCHITECTURES.get(cfg["model_type"])
    if arch is None:
        raise ValueError(f"model_type {cfg['model_type']!r} is not one the writer knows ({', '.join(ARCHITECTURES)})")
    if arch == "qwen3moe":
        cfg["num_experts"] = cfg.get("num_experts") or cfg["num_local_experts"]
    w = gguf.GGUFWriter(str(out), arch)
    _hparams(w, arch, cfg)
    _tokenizer(w, arch, cfg, root, pre, chat_template)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, t in _extra_tensors(arch, cfg):
        w.add_tensor(name, t)
    for name, t in sorted(_checkpoint(arch, cfg, root).items()):
        gguf_name = _gguf_name(name, arch, cfg["num_hidden_layers"])
        router = gguf_name.endswith("ffn_gate_inp.weight")  # llama.cpp keeps routers F32
        if t.ndim >= 2 and not router and qt != gguf.GGMLQuantizationType.F32:
            if qtype in _GGML_QUANTIZED:
                # The gguf package cannot write these: ggml's own quantizer does.
                from node.engine.ggml import quantize as ggml_quantize

                data = ggml_quantize(t.reshape(-1, t.shape[-1]), int(qt)).reshape(*t.shape[:-1], -1)
            else:
                data = quantize(t.astype(np.float16) if qtype == "F16" else t, qt)
            w.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            w.add_tensor(gguf_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)
