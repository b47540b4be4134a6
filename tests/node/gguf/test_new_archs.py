"""Qwen3, Qwen3-MoE, Gemma 3 and Phi-3 GGUFs written from tiny transformers checkpoints as
llama.cpp's converter writes them: the metadata becomes the config.json transformers saved
(every key the engine reads, and one transformers itself builds the same model from), every
checkpoint tensor comes back under its name (stacked experts, fused qkv and gate_up, Gemma's
norms without llama.cpp's + 1) equal to the original, and each new key, malformed, is refused
naming it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from node.engine.gguf import GGUFWeights, Restore, decode, restore
from node.gguf.config import GGUFConfigError, hf_config
from node.gguf.files import read_header
from node.gguf.sidecar import read_sidecars, write_sidecars
from node.testing.gguf_writer import write_gguf
from protocol.gguf import GGUFHeader, hf_name
from tests.helpers.tiny_archs import ARCHS, config_json, make_tiny_arch

transformers = pytest.importorskip("transformers")

QTYPES = ("F32", "F16", "Q8_0")
_COMMON = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
           "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
           "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
_KEYS = {
    "qwen3": ("head_dim", "hidden_act", "rope_parameters", "attention_bias", "layer_types", "sliding_window",
              "use_sliding_window"),
    "qwen3moe": ("head_dim", "hidden_act", "rope_parameters", "attention_bias", "sliding_window",
                 "use_sliding_window", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"),
    "gemma3": ("head_dim", "hidden_activation", "rope_parameters", "layer_types", "sliding_window",
               "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"),
    "phi3": ("hidden_act", "rope_parameters", "partial_rotary_factor", "sliding_window",
             "original_max_position_embeddings"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_arch(arch, root / arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def ggufs(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("ggufs")
    return {(arch, q): write_gguf(checkpoints[arch], root / f"{arch}-{q}.gguf", qtype=q)
            for arch in ARCHS for q in QTYPES}


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trips(arch: str, checkpoints: dict[str, Path], ggufs: dict[tuple[str, str], Path],
                            tmp_path: Path) -> None:
    original = config_json(checkpoints[arch])
    _, files = read_sidecars(ggufs[arch, "Q8_0"])
    ours = json.loads(files["config.json"])
    for key in (*_COMMON, *_KEYS[arch]):
        assert ours.get(key) == original.get(key), key
    if arch == "phi3":  # transformers' Phi3Config has no head_dim key: hidden / heads
        assert ours["head_dim"] == original["hidden_size"] // original["num_attention_heads"]
    # transformers builds the very same model from it: every parameter's name and shape.
    side = write_sidecars(ggufs[arch, "F32"], tmp_path / "side")
    want = transformers.AutoConfig.from_pretrained(checkpoints[arch])
    got = transformers.AutoConfig.from_pretrained(side)
    shapes = {}
    for cfg in (want, got):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        shapes[id(cfg)] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes[id(got)] == shapes[id(want)]
    for attr in ("layer_types", "sliding_window", "rope_parameters", "head_dim"):
        if not (arch == "phi3" and attr == "head_dim"):  # ours says it (hidden / heads); Phi3Config has none
            assert getattr(got, attr, None) == getattr(want, attr, None), attr


def _decoded(path: Path) -> tuple[GGUFHeader, dict[str, np.ndarray]]:
    header = read_header(path)
    found = GGUFWeights(header)
    data = path.read_bytes()
    out = {}
    for name, info in found.index.items():
        arr = decode(info, data[info.offset : info.offset + info.length])
        how = found.restore.get(name)
        out[name] = np.asarray(arr if how is None else restore(arr, how), dtype=np.float32)
    return header, out


def _expected(arch: str, model_dir: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under the engine's names: experts stacked [E, ...]."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if arch == "qwen3moe" and len(parts) == 8 and parts[3:5] == ["mlp", "experts"]:
            experts.setdefault(".".join([*parts[:5], parts[6]]), {})[int(parts[5])] = t
        else:
            out[name] = t
    for name, by_id in experts.items():
        out[name] = np.stack([by_id[i] for i in range(len(by_id))])
    return out


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_comes_back(arch: str, qtype: str, checkpoints: dict[str, Path],
                                 ggufs: dict[tuple[str, str], Path]) -> None:
    header, got = _decoded(ggufs[arch, qtype])
    want = _expected(arch, checkpoints[arch])
    assert sorted(got) == sorted(want)
    unnamed = {t.name for t in header.tensors if hf_name(t.name, arch) is None}
    assert unnamed == ({"rope_factors_long.weight", "rope_factors_short.weight"} if arch == "phi3" else set())
    if arch == "qwen3moe":
        assert got["model.layers.1.mlp.experts.gate_proj"].shape == (8, 32, 64)
        assert got["model.layers.1.mlp.experts.down_proj"].shape == (8, 64, 32)
        assert got["model.layers.1.mlp.gate.weight"].shape == (8, 64)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        gemma_norm = arch == "gemma3" and name.endswith("norm.weight")
        if gemma_norm:
            # llama.cpp stored 1 + w in float32; taking 1 off is exact, the + 1 rounded.
            np.testing.assert_array_equal(g, (w + np.float32(1)) - np.float32(1), err_msg=name)
            np.testing.assert_allclose(g, w, atol=1.2e-7, rtol=0, err_msg=name)
        elif qtype == "F32" or w.ndim == 1 or name.endswith("mlp.gate.weight"):
            np.testing.assert_array_equal(g, w, err_msg=name)  # F32 as llama.cpp keeps them
        elif qtype == "F16":
            np.testing.assert_array_equal(g, w.astype(np.float16).astype(np.float32), err_msg=name)
        else:  # Q8_0: blocks of 32 scaled by their largest value / 127 (the scale an F16)
            blocks = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs((g - w).reshape(-1, 32))
            assert (err <= blocks * (0.5 / 127 + 2.0**-11) + 1e-7).all(), name
    restored = GGUFWeights(header).restore
    if arch == "gemma3":
        norms = {n for n in want if n.endswith("norm.weight")}
        assert restored == dict.fromkeys(norms, Restore(offset=1.0)) and len(norms) == 7 * 6 + 1
    else:
        assert restored == {}  # NeoX RoPE in llama.cpp: rows kept in transformers' order


def _metadata(ggufs: dict[tuple[str, str], Path], arch: str) -> dict[str, Any]:
    return dict(read_header(ggufs[arch, "F32"]).metadata)


_LONGROPE = ([1.0] * 6, [2.0] * 6)

_BAD = [
    ("qwen3moe", "qwen3moe.expert_count", 0, "'qwen3moe.expert_count' should be an integer from 1"),
    ("qwen3moe", "qwen3moe.expert_count", None, "has no 'qwen3moe.expert_count'"),
    ("qwen3moe", "qwen3moe.expert_used_count", 9, "expert_used_count 9 is more than qwen3moe.expert_count 8"),
    ("qwen3moe", "qwen3moe.expert_used_count", "2", "'qwen3moe.expert_used_count' should be an integer"),
    ("qwen3moe", "qwen3moe.expert_feed_forward_length", -1, "'qwen3moe.expert_feed_forward_length' should be"),
    ("qwen3moe", "qwen3moe.expert_weights_norm", 1, "'qwen3moe.expert_weights_norm' should be true or false"),
    ("qwen3moe", "qwen3moe.expert_gating_func", 2, "'qwen3moe.expert_gating_func' 2 is not supported"),
    ("qwen3", "qwen3.attention.key_length", 33, "'qwen3.attention.key_length'.* is 33; rotary"),
    ("qwen3", "qwen3.rope.scaling.type", "yarn", r"RoPE scaling 'yarn' \(qwen3.rope.scaling.type\)"),
    ("gemma3", "gemma3.attention.sliding_window", -8, "'gemma3.attention.sliding_window' should be an integer from 0"),
    ("gemma3", "gemma3.attention.sliding_window_pattern", 0, "'gemma3.attention.sliding_window_pattern' should be"),
    ("gemma3", "gemma3.attention.sliding_window_pattern", [True, False],
     r"'gemma3.attention.sliding_window_pattern' should be a period or one true/false per layer \(7\)"),
    ("gemma3", "gemma3.rope.freq_base_swa", 0.0, "'gemma3.rope.freq_base_swa' should be a positive number"),
    ("gemma3", "gemma3.final_logit_softcapping", math.nan, "'gemma3.final_logit_softcapping' should be a positive"),
    ("gemma3", "gemma3.rope.freq_base", "1e6", "'gemma3.rope.freq_base' should be a positive number"),
    ("phi3", "phi3.rope.dimension_count", 13, "'phi3.rope.dimension_count' 13 should be even and at most"),
    ("phi3", "phi3.rope.dimension_count", 18, "'phi3.rope.dimension_count' 18 should be even and at most .* 16"),
    ("phi3", "phi3.rope.scaling.original_context_length", None,
     "has no 'phi3.rope.scaling.original_context_length'"),
    ("phi3", "phi3.rope.scaling.original_context_length", 0.5, "'phi3.rope.scaling.original_context_length' should"),
    ("phi3", "phi3.attention.sliding_window", True, "'phi3.attention.sliding_window' should be an integer"),
    ("phi3", "phi3.rope.scaling.attn_factor", -1.0, "'phi3.rope.scaling.attn_factor' should be a positive"),
]


@pytest.mark.parametrize(("arch", "key", "value", "message"), _BAD)
def test_malformed_new_keys_are_named(arch: str, key: str, value: Any, message: str,
                                      ggufs: dict[tuple[str, str], Path]) -> None:
    md = _metadata(ggufs, arch)
    tied = arch == "gemma3"
    longrope = _LONGROPE if arch == "phi3" else None
    hf_config(md, tied=tied, longrope=longrope)  # valid as written
    if value is None:
        del md[key]
    else:
        md[key] = value
    with pytest.raises(GGUFConfigError, match=message):
        hf_config(md, tied=tied, longrope=longrope)


def test_longrope_factors_are_checked(ggufs: dict[tuple[str, str], Path]) -> None:
    md = _metadata(ggufs, "phi3")
    with pytest.raises(GGUFConfigError, match=r"rope_factors_long\.weight has 5 factors; phi3.rope.dimension_count 12"):
        hf_config(md, tied=False, longrope=([1.0] * 6, [1.0] * 5))
    with pytest.raises(GGUFConfigError, match=r"rope_factors_short\.weight should hold positive finite"):
        hf_config(md, tied=False, longrope=([1.0] * 5 + [math.inf], [1.0] * 6))
    plain = hf_config(md, tied=False)  # no factor tensors: plain RoPE on the rotated part
    assert plain["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    md["phi3.rope.scaling.attn_factor"] = 1.5  # not what the lengths imply: kept
    assert hf_config(md, tied=False, longrope=_LONGROPE)["rope_parameters"]["attention_factor"] == 1.5


def test_gemma3_layouts_llama_cpp_fixes_in_code(ggufs: dict[tuple[str, str], Path]) -> None:
    md = _metadata(ggufs, "gemma3")
    assert "gemma3.attention.sliding_window_pattern" not in md  # the default: five sliding, one global
    md["gemma3.attention.sliding_window_pattern"] = 2
    assert hf_config(md, tied=True)["layer_types"][:4] == ["sliding_attention", "full_attention"] * 2
    md["gemma3.attention.sliding_window_pattern"] = [False] * 7
    assert set(hf_config(md, tied=True)["layer_types"]) == {"full_attention"}
    md["gemma3.attention.sliding_window"] = 0  # llama.cpp: no sliding window at all
    config = hf_config(md, tied=True)
    assert config["sliding_window"] is None and set(config["layer_types"]) == {"full_attention"}
    md.update({"gemma3.block_count": 62, "gemma3.embedding_length": 96})  # the 27B's rule: hidden / heads
    assert hf_config(md, tied=True)["query_pre_attn_scalar"] == 24
    md["gemma3.rope.scaling.type"], md["gemma3.rope.scaling.factor"] = "linear", 8.0
    rope = hf_config(md, tied=True)["rope_parameters"]
    assert rope["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_qwen3moe_without_renormalized_weights(ggufs: dict[tuple[str, str], Path]) -> None:
    md = _metadata(ggufs, "qwen3moe")
    md["qwen3moe.expert_weights_norm"] = False
    assert hf_config(md, tied=False)["norm_topk_prob"] is False
