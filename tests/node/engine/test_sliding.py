"""A sliding-window model keeps only window + prefill_chunk positions (a ring) and still
matches transformers, prompt and generation both past the ring's length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from node.engine import (
    PartitionSpec,
    SamplingParams,
    WeightSource,
    generate,
    load_chain,
    load_config,
)

WINDOW = 16


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    torch.manual_seed(3)
    cfg = transformers.MistralConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=320,
        max_position_embeddings=512,
        sliding_window=WINDOW,
        head_dim=16,
    )
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than the 0.02 init, so the window matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(path)
    return path, model


def test_ring_cache_matches_transformers(mistral: tuple[Path, object]) -> None:
    path, hf = mistral
    config = load_config(path)
    assert config.sliding_window == WINDOW
    chain = load_chain(
        WeightSource.from_dir(path),
        config,
        [PartitionSpec.whole(config)],
        dtype="float32",
        max_context=256,
        prefill_chunk=32,
        attn_block=16,
    )
    geom = chain.partitions[0].shape.local
    assert geom is not None and geom.ring and geom.length == 48  # window + chunk, not the 256-token context
    ids = [int(x) for x in np.random.default_rng(5).integers(0, 320, 100)]
    caches, logits = chain.prefill(chain.new_caches(2), ids, slot=1, all_logits=True)
    assert caches[0].k[0].shape[2] == 48
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()  # type: ignore[operator]
        full = hf(torch.tensor([ids]), attn_implementation="eager")  # type: ignore[operator]
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(full.logits[0].numpy(), ref, rtol=1e-4, atol=1e-5)
    # Greedy continuation past the ring, against transformers' full forward pass each
    # step (its generate() with a cache disagrees with its own forward on this model).
    prompt = ids[:40]
    want: list[int] = []
    with torch.no_grad():
        for _ in range(60):
            out = hf(torch.tensor([prompt + want])).logits[0, -1]  # type: ignore[operator]
            want.append(int(out.argmax()))
    for block in (0, 8):
        got = [t for t, _ in generate(chain, prompt, SamplingParams(), 60, block=block)]
        assert got == want, block
