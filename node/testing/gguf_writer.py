"""Writing a Hugging Face checkpoint as a GGUF file, the way llama.cpp's converter does.

For tests and the tiny demo: the metadata under llama.cpp's keys, the byte-level BPE
tokenizer (tokens, token types, merges, special ids, chat template), tensors under
llama.cpp's names, Q and K rows permuted for llama-architecture models (its
``convert_hf_to_gguf.py`` ``permute``), matrices quantized with the ``gguf`` package
(norms and biases stay F32, as llama.cpp keeps them), and ``rope_freqs.weight`` for
a Llama 3 rope scaling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

__all__ = ["GGUF_NAMES", "write_gguf"]

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_NAMES = dict(_GLOBAL)


def _gguf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, _, rest = name.partition(".layers.")
    layer, _, tail = rest.partition(".")
    return f"blk.{int(layer)}.{_LAYER[tail]}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(cfg: dict[str, Any], head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for rope_scaling llama3 (its converter's arithmetic)."""
    rs = cfg["rope_scaling"]
    base = float(cfg.get("rope_theta", 10000.0))
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


def write_gguf(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, qtype: str = "F32",
               chat_template: bool = True) -> Path:
    """Write the checkpoint in ``model_dir`` as the GGUF ``out`` with matrices in ``qtype``
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ... whatever gguf.quants can quantize)."""
    import gguf
    from gguf.quants import quantize

    root = Path(model_dir)
    cfg = json.loads((root / "config.json").read_text())
    tok = json.loads((root / "tokenizer.json").read_text())
    tcfg = json.loads((root / "tokenizer_config.json").read_text())
    arch = cfg["model_type"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    # The tokenizer: ids in order, added (special) tokens marked CONTROL.
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * cfg["vocab_size"]
    for text, idx in vocab.items():
        tokens[idx] = text
    specials = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    for key, setter in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                        ("pad_token", w.add_pad_token_id)):
        if tcfg.get(key):
            setter(vocab[tcfg[key]])
    w.add_add_bos_token(tcfg.get("bos_token") is not None and arch == "llama")
    if chat_template and tcfg.get("chat_template"):
        w.add_chat_template(tcfg["chat_template"])
    qt = gguf.GGMLQuantizationType[qtype]
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(cfg, head_dim))
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(root.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name in sorted(tensors):
        t = tensors[name].astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, kv)
        if t.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            data = quantize(t.astype(np.float16) if qtype == "F16" else t, qt)
            w.add_tensor(_gguf_name(name), data, raw_shape=data.shape, raw_dtype=qt)
        else:
            w.add_tensor(_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)
