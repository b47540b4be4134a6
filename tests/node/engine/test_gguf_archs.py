"""Qwen3, Qwen3-MoE, Gemma 3 and Phi-3 written as GGUF (as llama.cpp's converter writes them) and
read back through the import's sidecar config: greedy tokens equal transformers' on the
original checkpoint, whole and split in three; F16 and Q8_0 files stay close to F32."""

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
    split_layers,
)
from node.engine.tokenizer import Tokenizer
from node.gguf.sidecar import write_sidecars
from node.testing.gguf_writer import write_gguf
from tests.helpers.tiny_archs import make_tiny_arch

PROMPT = [5, 77, 301, 12, 9, 140, 33, 260, 18, 4, 99, 120]


@pytest.fixture(scope="module", params=["qwen3", "qwen3moe", "gemma3", "phi3"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_arch(request.param, tmp_path_factory.mktemp(request.param) / "hf")


def _chain(gguf: Path, config_dir: Path, specs: list[PartitionSpec] | None = None):  # type: ignore[no-untyped-def]
    config = load_config(config_dir)
    return load_chain(
        WeightSource.from_gguf(gguf), config, specs or [PartitionSpec.whole(config)],
        dtype="float32", max_context=128, prefill_chunk=32, attn_block=32,
    )


def test_gguf_answers_like_transformers(checkpoint: Path, tmp_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None

    def hf_greedy(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        return [int(t) for t in out[0, len(ids):]]

    want = hf_greedy(PROMPT)
    gguf = write_gguf(checkpoint, tmp_path / "m-F32.gguf", qtype="F32")
    side = write_sidecars(gguf, tmp_path / "side")
    config = load_config(side)
    assert config.architecture == load_config(checkpoint).architecture
    whole = _chain(gguf, side)
    assert [t for t, _ in generate(whole, PROMPT, SamplingParams(), 24)] == want
    layers = config.num_layers
    three = split_layers(layers, 3) if layers >= 3 else [  # the head alone on the third
        PartitionSpec(0, 1, True, False), PartitionSpec(1, 2, False, False), PartitionSpec(2, 2, False, True)
    ]
    split = _chain(gguf, side, three)
    assert [t for t, _ in generate(split, PROMPT, SamplingParams(), 24)] == want

    # A chat, rendered by the template and tokenizer the import wrote from the GGUF.
    tok = Tokenizer.from_model_dir(side)
    assert bool(tok.chat_template) == (config.architecture != "Gemma3ForCausalLM")  # the tiny Gemma has none
    if tok.chat_template:
        chat = tok.encode_chat([{"role": "user", "content": "¿Qué hora es? 12:30 😀"}])
        assert [t for t, _ in generate(split, chat, SamplingParams(), 24)] == hf_greedy(chat)

    _, ref = whole.prefill(whole.new_caches(1), PROMPT, all_logits=True)
    ref = np.asarray(ref)
    for qtype, tol in (("F16", 2e-2), ("Q8_0", 1e-1)):
        path = write_gguf(checkpoint, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
        chain = _chain(path, side)
        _, got = chain.prefill(chain.new_caches(1), PROMPT, all_logits=True)
        err = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
        assert 0 < err < tol, (qtype, err)
