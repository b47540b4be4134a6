"""The KV cache in its own dtype (engine.kv_dtype): allocated and counted in it, and greedy
output as with a float32 cache."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import node.engine.config
from node.config import ConfigError, load_config
from node.engine import PartitionSpec, SamplingParams, generate, load_chain, load_partition
from node.engine.cache import cache_nbytes
from node.engine.config import resolve_kv_dtype
from node.engine.errors import PartitionError
from node.engine.memory import memory_estimate, resident_bytes
from tests.node.engine.conftest import (
    ATTN_BLOCK,
    MAX_CONTEXT,
    PREFILL_CHUNK,
    REAL_AUTO_KV_DTYPE,
    TinyModel,
)

KV_DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(autouse=True)
def _real_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own "auto" here, not the other engine tests' float32 (conftest.py)."""
    monkeypatch.setattr(node.engine.config, "AUTO_KV_DTYPE", REAL_AUTO_KV_DTYPE)


def _chain(model: TinyModel, kv_dtype: str | None, specs: list[PartitionSpec] | None = None) -> object:
    return load_chain(model.source(), model.config, specs or [PartitionSpec.whole(model.config)],
                      dtype="float32", max_context=MAX_CONTEXT, prefill_chunk=PREFILL_CHUNK,
                      attn_block=ATTN_BLOCK, kv_dtype=kv_dtype)


def test_auto_is_float16_beside_float32_compute_and_the_compute_dtype_otherwise() -> None:
    assert resolve_kv_dtype("auto", "float32") == "float16"
    assert resolve_kv_dtype(None, "float32") == "float16"
    assert resolve_kv_dtype("auto", "bfloat16") == "bfloat16"
    assert resolve_kv_dtype("float32", "bfloat16") == "float32"


@pytest.mark.parametrize("kv_dtype", [*KV_DTYPES, "auto"])
def test_cache_arrays_have_the_dtype_and_the_bytes_every_figure_counts(tiny_llama: TinyModel, kv_dtype: str) -> None:
    cfg = tiny_llama.config
    part = load_partition(tiny_llama.source(), cfg, PartitionSpec(0, 2, True, False), dtype="float32",
                          max_context=MAX_CONTEXT, prefill_chunk=PREFILL_CHUNK, kv_dtype=kv_dtype)
    want = resolve_kv_dtype(kv_dtype, "float32")
    assert part.kv_dtype == want
    cache = part.new_cache(3)
    assert {a.dtype for a in (*cache.k, *cache.v)} == {jnp.dtype(want)}
    itemsize = jnp.dtype(want).itemsize
    assert cache.nbytes == cache_nbytes(cfg, part.lengths, 3, itemsize) == 2 * 2 * 3 * MAX_CONTEXT * cfg.kv_size * itemsize
    spec = part.spec
    est = memory_estimate(cfg, spec.start, spec.end, spec.has_embedding, spec.has_head, "float32", MAX_CONTEXT, 3,
                          prefill_chunk=PREFILL_CHUNK, kv_dtype=kv_dtype)
    assert est.kv_cache == cache.nbytes
    f32 = resident_bytes(cfg, spec, "float32", MAX_CONTEXT, 3, prefill_chunk=PREFILL_CHUNK, kv_dtype="float32")
    held = resident_bytes(cfg, spec, "float32", MAX_CONTEXT, 3, prefill_chunk=PREFILL_CHUNK, kv_dtype=kv_dtype)
    assert f32 - held == cache_nbytes(cfg, part.lengths, 3, 4) - cache.nbytes


def test_float16_greedy_tokens_equal_the_float32_caches(varied: TinyModel) -> None:
    """Whole (decode_steps) and split in two (a tail step per token), 48 new tokens after
    a prompt that crosses prefill chunks and key blocks. (A bfloat16 cache does not: on
    these models its logits differ by up to 0.26 and flip near-ties; see below.)"""
    prompt = np.random.default_rng(5).integers(0, varied.config.vocab_size, 40).tolist()
    sampling = SamplingParams()
    half = varied.config.num_layers // 2
    split = [PartitionSpec(0, half, True, False), PartitionSpec(half, varied.config.num_layers, False, True)]
    ref = [t for t, _ in generate(_chain(varied, "float32"), prompt, sampling, 48)]
    assert len(ref) == 48 and len(set(ref)) > 4
    assert [t for t, _ in generate(_chain(varied, "float16"), prompt, sampling, 48)] == ref
    assert [t for t, _ in generate(_chain(varied, "float16", split), prompt, sampling, 48, block=0)] == ref
    assert [t for t, _ in generate(_chain(varied, None), prompt, sampling, 48)] == ref  # auto


# The largest |logit difference| to the float32 cache over 48 teacher-forced decode steps
# on these models (scripts/bench_kv.py's measure; logits spanning about 6): float16 0.028
# (llama) and 0.030 (qwen2), bfloat16 0.26 and 0.20. The bounds leave 2x.
TOLERANCE = {"float16": 0.06, "bfloat16": 0.5}


def test_logits_stay_within_the_measured_tolerance(varied: TinyModel) -> None:
    prompt = np.random.default_rng(5).integers(0, varied.config.vocab_size, 40)
    steps = 24
    logits = {}
    for kv in KV_DTYPES:
        (part,) = _chain(varied, kv).partitions  # type: ignore[attr-defined]
        cache = part.new_cache(1)
        cache, out = part.prefill(cache, prompt)
        rows = [np.asarray(out)]
        for i in range(steps):  # fed the same tokens whatever the cache: teacher forcing
            cache, out = part.decode(cache, prompt[i : i + 1], [0], [len(prompt) + i])
            rows.append(np.asarray(out)[0])
        logits[kv] = np.stack(rows)
    for kv, bound in TOLERANCE.items():
        assert 0 < np.abs(logits[kv] - logits["float32"]).max() <= bound, kv


def test_an_unknown_kv_dtype_is_refused_before_loading(tiny_llama: TinyModel) -> None:
    with pytest.raises(PartitionError, match=r"kv_dtype 'int8' is not supported .*float16"):
        load_partition(tiny_llama.source(), tiny_llama.config, PartitionSpec.whole(tiny_llama.config),
                       kv_dtype="int8")


def test_a_bad_engine_kv_dtype_in_the_config_is_refused_naming_the_choices(tmp_path: Path) -> None:
    secret = tmp_path / "cluster.secret"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    path = tmp_path / "node.toml"
    path.write_text('[engine]\nkv_dtype = "fp8"\n\n[cluster]\nsecret_file = "cluster.secret"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "engine.kv_dtype" in str(info.value)
    assert "auto, float32, float16, bfloat16" in str(info.value)
    path.write_text('[engine]\nkv_dtype = "bfloat16"\n\n[cluster]\nsecret_file = "cluster.secret"\n')
    assert load_config(path).engine.kv_dtype == "bfloat16"
