"""Shared fixtures for the engine tests: tiny random checkpoints written by transformers
itself (the correctness oracle), loaded once per session so compiled functions are shared."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import node.engine.config  # noqa: E402
from node.engine import (  # noqa: E402
    Chain,
    ModelConfig,
    PartitionSpec,
    WeightSource,
    load_chain,
    load_config,
)

MAX_CONTEXT = 128
REAL_AUTO_KV_DTYPE = node.engine.config.AUTO_KV_DTYPE  # before _float32_cache_by_default
PREFILL_CHUNK = 32
# Small attention blocks so that the tests walk several key blocks and key buckets.
ATTN_BLOCK = 32


@dataclass
class TinyModel:
    path: Path
    config: ModelConfig
    hf: object  # the transformers model, float32, eval mode

    def source(self) -> WeightSource:
        return WeightSource.from_dir(self.path)

    def chain(self, specs: list[PartitionSpec] | None = None) -> Chain:
        return load_chain(
            self.source(),
            self.config,
            specs or [PartitionSpec.whole(self.config)],
            dtype="float32",
            max_context=MAX_CONTEXT,
            prefill_chunk=PREFILL_CHUNK,
            attn_block=ATTN_BLOCK,
        )


def _save(model: object, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyModel]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=320,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
        attention_bias=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp("tiny_llama")
    _save(model, path)
    yield TinyModel(path, load_config(path), model)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyModel]:
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=384,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    # Random init leaves biases at zero; make them matter so the test can fail.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny_qwen")
    _save(model, path)
    yield TinyModel(path, load_config(path), model)


@pytest.fixture(scope="session", params=["llama", "qwen"])
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    name = "tiny_llama" if request.param == "llama" else "tiny_qwen"
    model: TinyModel = request.getfixturevalue(name)
    return model


@pytest.fixture(scope="session")
def whole_chain(tiny: TinyModel) -> Chain:
    return tiny.chain()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def varied(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """node.testing.tinymodel checkpoints: scaled so that greedy output varies (the
    transformers-initialised ones above repeat a token after a few steps)."""
    from node.testing.tinymodel import make_tiny_model

    path = make_tiny_model(
        tmp_path_factory.mktemp(f"varied_{request.param}"),
        arch=request.param,
        layers=4,
        vocab_size=384,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return TinyModel(path, load_config(path), hf)


@pytest.fixture(autouse=True, scope="session")
def _float32_cache_by_default() -> Iterator[None]:
    """These tests hold the engine's float32 math to transformers' within 1e-4: with the
    default ("auto") float16 cache, keys and values rounded to 11 bits move logits by
    about 5e-3 of their range. Session-wide, since the chains are session fixtures. The
    cache's own dtype is test_kv_dtype.py's subject, which puts the default back."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(node.engine.config, "AUTO_KV_DTYPE", "float32")
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_steps() -> Iterator[None]:
    """Drop JAX's compiled executables after each test module: one process compiles
    hundreds of steps over this directory, and past a point XLA CPU crashed compiling
    the next (a segfault in backend_compile, at a different test each run)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
