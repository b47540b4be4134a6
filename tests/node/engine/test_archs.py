"""Qwen3, Gemma 3 and Phi-3 against transformers (CPU, float32): prefill logits, greedy
tokens past the sliding window and past longrope's original context, whole and split
in three partitions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from node.engine import (
    Chain,
    ModelConfig,
    PartitionSpec,
    SamplingParams,
    WeightSource,
    generate,
    load_chain,
    load_config,
    split_layers,
)

VOCAB = 384


@dataclass
class TinyModel:
    path: Path
    config: ModelConfig
    hf: Any  # the transformers model, float32, eval mode

    def chain(self, specs: list[PartitionSpec] | None = None, max_context: int = 128) -> Chain:
        return load_chain(
            WeightSource.from_dir(self.path), self.config,
            specs or [PartitionSpec.whole(self.config)], dtype="float32",
            max_context=max_context, prefill_chunk=32, attn_block=32,
        )


def _qwen3() -> Any:
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32,  # not hidden / heads
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=512,
            rope_theta=1_000_000.0, tie_word_embeddings=False,
        )
    )


def _qwen3_sliding() -> Any:
    # Layers from max_window_layers on slide: a model that mixes both kinds.
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=512,
            use_sliding_window=True, sliding_window=8, max_window_layers=1,
            tie_word_embeddings=True,
        )
    )


def _gemma3() -> Any:
    return transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=512,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            },
            query_pre_attn_scalar=24, final_logit_softcapping=30.0,
            # Untied: with random weights a tied head mostly predicts the last token again.
            tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    )


def _phi3() -> Any:
    half = 6  # head_dim 16, partial_rotary_factor 0.75: 12 rotary features
    return transformers.Phi3ForCausalLM(
        transformers.Phi3Config(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256,
            original_max_position_embeddings=48, partial_rotary_factor=0.75,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.3 * i for i in range(half)],
                "long_factor": [2.0 + 1.5 * i for i in range(half)],
            },
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    )


MODELS: dict[str, Callable[[], Any]] = {
    "qwen3": _qwen3, "qwen3_sliding": _qwen3_sliding, "gemma3": _gemma3, "phi3": _phi3,
}


def _sharpen(model: Any, seed: int) -> None:
    """transformers' 0.02 init gives flat attention and a greedy run that repeats one
    token; weights of unit gain (and norms off 1) make every part of a layer matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                base = 0.0 if "Gemma" in type(model).__name__ else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]) * 1.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=list(MODELS))
def arch_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    _sharpen(model, 7)
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return TinyModel(path, load_config(path), model)


def _hf_greedy(tiny: TinyModel, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = tiny.hf.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in out[0, len(ids):]]


def test_config_reads_each_architecture(arch_model: TinyModel) -> None:
    cfg = arch_model.config
    name = type(arch_model.hf).__name__
    assert cfg.architecture == name
    if name == "Gemma3ForCausalLM":
        assert cfg.layer_sliding == (True, False, True) and cfg.sliding_window == 8
        assert cfg.norm_plus_one and cfg.sandwich_norms and cfg.activation == "gelu_tanh"
        assert cfg.local_rope_theta == 10_000.0 and cfg.rope_theta == 1_000_000.0
        assert cfg.final_softcap == 30.0 and cfg.query_scale == pytest.approx(24**-0.5)
    elif name == "Phi3ForCausalLM":
        assert cfg.rotary_dim == 12 and cfg.fused
        assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "longrope"
    else:
        assert cfg.qk_norm and not cfg.qkv_bias


def test_prefill_logits_match_transformers(arch_model: TinyModel) -> None:
    # 60 tokens: past the 8-token window and the 64-row ring's first lap, in two prefill
    # chunks; past Phi-3's original context (48), where transformers rotates every
    # position with the long factors, as the engine does at a context beyond it.
    ids = [int(x) for x in np.random.default_rng(1).integers(0, VOCAB, 60)]
    chain = arch_model.chain()
    _, logits = chain.prefill(chain.new_caches(1), ids, all_logits=True)
    with torch.no_grad():
        ref = arch_model.hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_greedy_matches_transformers_whole_and_split(arch_model: TinyModel) -> None:
    # Phi-3 at a context within its original one (48): short factors throughout, as
    # transformers until a sequence outgrows 48 (when it recomputes its cache with the
    # long ones; see transformer.rope_tables). The others: 40 new tokens from a 20-token
    # prompt cross the window and the ring (64 rows).
    scaling = arch_model.config.rope_scaling
    phi = scaling is not None and scaling.rope_type == "longrope"
    context, new = (48, 28) if phi else (128, 40)
    whole = arch_model.chain(max_context=context)
    split = arch_model.chain(split_layers(arch_model.config.num_layers, 3), max_context=context)
    rng = np.random.default_rng(2)
    for n in (20, 3):
        ids = [int(x) for x in rng.integers(0, VOCAB, n)]
        want = _hf_greedy(arch_model, ids, new)
        assert len(set(want)) > 5, "the reference should not be one repeated token"
        assert [t for t, _ in generate(whole, ids, SamplingParams(), new)] == want
        assert [t for t, _ in generate(split, ids, SamplingParams(), new)] == want


def test_sliding_layers_hold_only_their_window(arch_model: TinyModel) -> None:
    cfg = arch_model.config
    part = arch_model.chain().partitions[0]
    cache = part.new_cache(1)
    for i in range(cfg.num_layers):
        rows = int(cache.k[i].shape[2])
        if cfg.is_sliding(i) and cfg.sliding_window == 8:
            assert rows == 64  # two 32-key blocks: window + one 32-token chunk, rounded
        else:
            assert rows == part.max_context


def test_multimodal_gemma3_runs_its_language_model(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration (the form of most Gemma 3 checkpoints): its text
    model under `language_model.model.*` answers as transformers' does on text alone; the
    vision tower's tensors are never read."""
    torch.manual_seed(0)
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=VOCAB, sliding_window=8, tie_word_embeddings=False,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                                       eoi_token_index=VOCAB - 2, tie_word_embeddings=False)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _sharpen(model, 11)
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = load_config(tmp_path)
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.layer_sliding == (True, False)
    tiny = TinyModel(tmp_path, cfg, model)
    ids = [int(x) for x in np.random.default_rng(4).integers(0, VOCAB - 4, 12)]
    want = _hf_greedy(tiny, ids, 24)
    assert len(set(want)) > 5
    source = WeightSource.from_dir(tmp_path)
    chain = load_chain(source, cfg, split_layers(2, 2), dtype="float32", max_context=128, prefill_chunk=32,
                       attn_block=32)
    assert [t for t, _ in generate(chain, ids, SamplingParams(), 24)] == want
    assert source.tensors_read and not any("vision" in n or "projector" in n for n in source.tensors_read)


def test_int8_weights_stay_close(arch_model: TinyModel) -> None:
    """engine.weights = "int8" on each architecture (Phi-3's fused matrices split before
    they are quantized): the same logits within int8's rounding."""
    ids = [int(x) for x in np.random.default_rng(3).integers(0, VOCAB, 24)]
    outs = []
    for weights in ("native", "int8"):
        chain = load_chain(WeightSource.from_dir(arch_model.path), arch_model.config,
                           [PartitionSpec.whole(arch_model.config)], dtype="float32", max_context=128,
                           prefill_chunk=32, attn_block=32, weights=weights)
        _, logits = chain.prefill(chain.new_caches(1), ids, all_logits=True)
        outs.append(np.asarray(logits).ravel())
    f32, int8 = outs
    assert not np.array_equal(f32, int8)
    cosine = float(f32 @ int8 / (np.linalg.norm(f32) * np.linalg.norm(int8)))
    assert cosine > 0.995, cosine
