"""config.json parsing: both rope spellings, architecture coverage, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from node.engine import (
    ModelConfigError,
    PartitionSpec,
    UnsupportedModelError,
    WeightSource,
    load_chain,
    load_config,
    parse_config,
)

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _with(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return raw


def test_both_rope_spellings_agree() -> None:
    old = parse_config(_with(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **LLAMA3}))
    old_type = parse_config(_with(rope_theta=5e5, rope_scaling={"type": "llama3", **LLAMA3}))
    new = parse_config(_with(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}))
    assert old == new == old_type
    assert new.rope_theta == 5e5 and new.rope_scaling is not None
    np.testing.assert_array_equal(old.inv_freq(), new.inv_freq())
    plain = parse_config(_with(rope_theta=5e5))
    assert plain.rope_scaling is None
    assert not np.allclose(plain.inv_freq(), new.inv_freq())


def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "architectures"},
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3},
    )
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    cfg = parse_config(_with(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}))
    np.testing.assert_allclose(cfg.inv_freq(), inv.numpy(), rtol=1e-6)


def test_values_come_from_config() -> None:
    cfg = parse_config(
        _with(head_dim=32, tie_word_embeddings=True, attention_bias=True, rope_theta=1234.0)
    )
    assert (cfg.head_dim, cfg.tie_word_embeddings, cfg.qkv_bias, cfg.o_bias) == (
        32,
        True,
        True,
        True,
    )
    assert cfg.rope_theta == 1234.0 and cfg.rms_norm_eps == 1e-5
    qwen = parse_config(_with(architectures=["Qwen2ForCausalLM"]))
    assert qwen.qkv_bias and not qwen.o_bias
    mha = parse_config({k: v for k, v in BASE.items() if k != "num_key_value_heads"})
    assert mha.num_kv_heads == mha.num_heads


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "rms_norm_eps"])
def test_missing_key_is_named(key: str) -> None:
    raw = _with()
    del raw[key]
    with pytest.raises(ModelConfigError, match=key):
        parse_config(raw)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 4,
          "layer_types": ["full_attention"] * 2}, None),
    ],
)
def test_unsupported_features_are_named(changes: dict[str, Any], match: str | None) -> None:
    if match is None:  # once refused, now run: Qwen2's layers that name their attention
        assert parse_config(_with(**changes)).sliding_window is None
        return
    with pytest.raises(UnsupportedModelError, match=match):
        parse_config(_with(**changes))


def test_qwen2_sliding_layers_and_bad_layer_types() -> None:
    cfg = parse_config(_with(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4,
                             max_window_layers=1, layer_types=None))
    layers = cfg.num_layers
    assert cfg.sliding_window == 4 and [cfg.is_sliding(i) for i in range(layers)] == [i >= 1 for i in range(layers)]
    with pytest.raises(ModelConfigError, match="layer_types"):
        parse_config(_with(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4,
                           layer_types=["sliding_attention"]))
    with pytest.raises(ModelConfigError, match="sliding_window"):
        parse_config(_with(architectures=["MistralForCausalLM"], sliding_window=0))
    with pytest.raises(ModelConfigError, match="text_config"):
        parse_config(_with(architectures=["Gemma3ForConditionalGeneration"]))


def test_malformed_values(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="hidden_size"):
        parse_config(_with(hidden_size="64"))
    with pytest.raises(ModelConfigError, match="multiple"):
        parse_config(_with(num_key_value_heads=3))
    with pytest.raises(ModelConfigError, match="does not exist"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_with(rope_scaling={"rope_type": "llama3"})))
    with pytest.raises(ModelConfigError, match="factor"):
        load_config(tmp_path)


def test_mistral_sliding_window_matches_transformers(tmp_path: Path) -> None:
    torch.manual_seed(2)
    hf_cfg = transformers.MistralConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=256,
        sliding_window=8,
    )
    model = transformers.MistralForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    cfg = load_config(tmp_path)
    assert cfg.sliding_window == 8 and cfg.head_dim == 24
    chain = load_chain(
        WeightSource.from_dir(tmp_path),
        cfg,
        [PartitionSpec.whole(cfg)],
        max_context=64,
        prefill_chunk=16,
    )
    ids = list(range(3, 40))
    _, logits = chain.prefill(chain.new_caches(1), ids, all_logits=True)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
