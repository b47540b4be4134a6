"""int8 weights (node/engine/quant.py): quantization error, both products, whole models
loaded int8 against float32, split partitions, and the memory accounting."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from node.engine import (
    PartitionError,
    PartitionSpec,
    load_chain,
    load_partition,
    memory_estimate,
    memory_needed,
    parse_config,
    partition_weight_bytes,
    split_layers,
)
from node.engine.memory import resident_bytes
from node.engine.quant import (
    W8A8,
    WEIGHT_ONLY,
    QuantMatrix,
    default_kernel,
    dequantize,
    qmatmul,
    quantize,
    take_rows,
)
from node.engine.transformer import linear

# TinyModel: see conftest.py; the load settings are conftest's too.
TinyModel = Any
MAX_CONTEXT, PREFILL_CHUNK, ATTN_BLOCK = 128, 32, 32
KERNELS = (W8A8, WEIGHT_ONLY)

# The Qwen2.5-0.5B shape (bench_engine.py's), for accounting without loading anything.
QWEN05 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}


def _chain(tiny: TinyModel, specs: list[PartitionSpec] | None = None, **kw: Any) -> Any:
    return load_chain(
        tiny.source(),
        tiny.config,
        specs or [PartitionSpec.whole(tiny.config)],
        max_context=MAX_CONTEXT,
        prefill_chunk=PREFILL_CHUNK,
        attn_block=ATTN_BLOCK,
        **{"dtype": "float32", **kw},
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- the quantization itself ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_error_is_at_most_half_a_step(dtype: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 80)).astype(np.float32) * np.geomspace(1e-3, 10, 48)[:, None]
    w[5] = 0.0  # an all-zero row: no division by zero
    wd = jnp.asarray(w).astype(dtype)
    qm = quantize(wd, "float32")
    assert qm.q.dtype == jnp.int8 and qm.scale.dtype == jnp.float32
    assert qm.shape == (48, 80) and qm.nbytes == 48 * 80 + 4 * 48
    ref = np.asarray(wd.astype(jnp.float32))
    scale = np.asarray(qm.scale)
    err = np.abs(np.asarray(dequantize(qm)) - ref)
    assert (err <= scale[:, None] * (0.5 + 1e-5)).all()
    q = np.asarray(qm.q)
    assert np.abs(q).max() == 127 and (q[5] == 0).all() and scale[5] == 1.0
    # Every non-zero row uses the full range: its largest entry maps to +-127.
    assert (np.abs(np.delete(q, 5, axis=0)).max(axis=1) == 127).all()


def test_quantizing_in_blocks_of_rows_gives_the_same_matrix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = jax.random.normal(jax.random.PRNGKey(4), (48, 80)).astype(jnp.bfloat16)
    whole = quantize(w, "float32")
    monkeypatch.setattr("node.engine.quant.BLOCK_ENTRIES", 7 * 80)  # 7 blocks, the last overlaps
    blocks = quantize(w, "float32")
    np.testing.assert_array_equal(np.asarray(blocks.q), np.asarray(whole.q))
    np.testing.assert_array_equal(np.asarray(blocks.scale), np.asarray(whole.scale))


def test_embedding_rows_are_the_dequantized_rows() -> None:
    w = jax.random.normal(jax.random.PRNGKey(1), (50, 16))
    qm = quantize(w, "bfloat16")
    ids = jnp.asarray([3, 0, 49, 3])
    rows = take_rows(qm, ids)
    assert rows.dtype == jnp.bfloat16 and rows.shape == (4, 16)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(dequantize(qm))[np.asarray(ids)])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_linear_with_int8_is_close_to_float32(kernel: str, m: int) -> None:
    kw, kx, kb = jax.random.split(jax.random.PRNGKey(m), 3)
    w = 0.05 * jax.random.normal(kw, (96, 160))
    x = jax.random.normal(kx, (160, m))
    b = jax.random.normal(kb, (96,))
    qm = quantize(w, "float32", kernel)
    y = np.asarray(jax.jit(linear)(qm, x, b))
    ref = np.asarray(w @ x + b[:, None])
    assert y.shape == (96, m) and y.dtype == np.float32
    # The weights' rounding alone bounds the error by sum_i |x_i| * scale / 2 per output.
    bound = np.asarray(jnp.abs(x).sum(0)[None, :] * qm.scale[:, None] / 2)
    xs = np.abs(np.asarray(x)).max(0) / 127  # w8a8 also rounds x by at most xs / 2
    if kernel == W8A8:
        bound = bound + np.asarray(jnp.abs(dequantize(qm)).sum(1))[:, None] * xs[None, :] / 2
    assert (np.abs(y - ref) <= bound + 1e-5).all()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.02
    if kernel == W8A8:
        # Exactly the int8 product of the two activation terms (x ~= s1 q1 + s2 q2, q2
        # quantizing what q1 left): int32 accumulation is exact, the rescale float32.
        xf = np.asarray(x, np.float32)
        q1 = np.clip(np.round(xf / xs.astype(np.float32)), -127, 127)
        rest = xf - q1 * xs.astype(np.float32)
        rs = np.abs(rest).max(0) / 127
        q2 = np.clip(np.round(rest / rs), -127, 127)
        wq = np.asarray(qm.q, np.float64)
        exact = ((wq @ q1) * xs + (wq @ q2) * rs) * np.asarray(qm.scale)[:, None]
        np.testing.assert_allclose(y - np.asarray(b)[:, None], exact, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(
            y, np.asarray(dequantize(qm) @ x + b[:, None]), rtol=1e-5, atol=1e-5
        )


def test_w8a8_columns_are_independent() -> None:
    """One column (padded to two for the int8 kernel) gives what it gives among others."""
    w = quantize(jax.random.normal(jax.random.PRNGKey(2), (64, 128)), "float32", W8A8)
    x = jax.random.normal(jax.random.PRNGKey(3), (128, 4))
    f = jax.jit(qmatmul)
    many = np.asarray(f(w, x))
    for col in range(4):
        np.testing.assert_array_equal(np.asarray(f(w, x[:, col : col + 1]))[:, 0], many[:, col])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU lowering")
def test_single_column_takes_the_int8_kernel() -> None:
    """XLA CPU lowers an int8 matrix-vector product to a dot on int32 copies of the whole
    matrix (14x slower for 896x4864); the padded product must not."""
    w = quantize(jnp.ones((256, 512)), "float32", W8A8)
    text = jax.jit(qmatmul).lower(w, jnp.ones((512, 1))).compile().as_text()
    assert "s32[256,512]" not in text


def test_default_kernel_follows_the_backend() -> None:
    assert default_kernel("cpu") == W8A8
    assert default_kernel("gpu") == WEIGHT_ONLY
    assert default_kernel() == default_kernel(jax.default_backend())


# -- whole models ----------------------------------------------------------------------------

PROMPT = [3, 17, 250, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99, 100, 42]


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_model_logits_are_close_to_float32(
    tiny: TinyModel, whole_chain: Any, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("node.engine.weights.default_kernel", lambda: kernel)
    q8 = _chain(tiny, weights="int8")
    part = q8.partitions[0]
    assert part.weights == "int8" and whole_chain.partitions[0].weights == "native"
    assert isinstance(part.params.layers[0].wq, QuantMatrix)
    assert part.params.layers[0].wq.kernel == kernel
    assert part.params.dtype == jnp.float32
    _, ref = whole_chain.prefill(whole_chain.new_caches(1), PROMPT, all_logits=True)
    _, got = q8.prefill(q8.new_caches(1), PROMPT, all_logits=True)
    ref, got = np.asarray(ref), np.asarray(got)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    cos = _cosine(ref, got)
    # Measured: 0.9998-0.99996 on both tiny models, either kernel.
    assert cos.min() > 0.999


def test_int8_greedy_tokens_follow_float32(tiny: TinyModel, whole_chain: Any) -> None:
    """Teacher-forced on float32's greedy continuations, int8 picks float32's top token,
    except at near-ties (free-running, tiny_llama's first prompt parts at its 5th token)."""
    from node.engine import SamplingParams, generate

    q8 = _chain(tiny, weights="int8")
    same, gaps = [], []
    for ids in (PROMPT, PROMPT[:5], [42]):
        full = ids + [t for t, _ in generate(whole_chain, ids, SamplingParams(), 16)]
        _, ref = whole_chain.prefill(whole_chain.new_caches(1), full, all_logits=True)
        _, got = q8.prefill(q8.new_caches(1), full, all_logits=True)
        ref, got = np.asarray(ref)[len(ids) - 1 : -1], np.asarray(got)[len(ids) - 1 : -1]
        mine = got.argmax(-1)
        same += list(mine == ref.argmax(-1))
        spread = ref.max(-1) - ref.min(-1)
        gaps += list((ref.max(-1) - ref[np.arange(len(mine)), mine]) / spread)
    print(f"{tiny.config.architecture}: agreement {np.mean(same):.2f}, worst gap {max(gaps):.4f}")
    assert np.mean(same) >= 0.9
    assert max(gaps) < 0.02  # a different pick is within 2% of the logit range of the best


def test_int8_top_tokens_follow_float32_on_sensitive_models(varied: TinyModel) -> None:
    """The scaled tinymodel checkpoints (sharp attention, greedy output that varies) are
    sensitive to any rounding. Teacher-forced on float32's greedy continuations of three
    prompts (72 steps), int8's top token was float32's at 62-88% of a prompt's steps
    (bfloat16 weights: 83-100%), and at worst float32's 11th; logits cosine mean 0.98-0.99
    (bfloat16: 0.995-0.999). Per-row int8 has a step of max|row| / 127, coarser than
    bfloat16's 8-bit mantissa: that is the whole gap."""
    from node.engine import SamplingParams, generate

    f32, q8 = _chain(varied), _chain(varied, weights="int8")
    same, cosines = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        prompt = [int(x) for x in rng.integers(0, varied.config.vocab_size, 8)]
        ids = prompt + [t for t, _ in generate(f32, prompt, SamplingParams(), 24)]
        _, ref = f32.prefill(f32.new_caches(1), ids, all_logits=True)
        _, got = q8.prefill(q8.new_caches(1), ids, all_logits=True)
        ref, got = np.asarray(ref)[7:-1], np.asarray(got)[7:-1]
        same += list(got.argmax(-1) == ref.argmax(-1))
        cosines += list(_cosine(ref, got))
    print(f"top-1 agreement {np.mean(same):.2f}, cosine mean {np.mean(cosines):.4f}")
    assert np.mean(same) > 0.7
    assert np.mean(cosines) > 0.98


def test_int8_split_equals_whole_exactly(tiny: TinyModel) -> None:
    whole = _chain(tiny, weights="int8")
    split = _chain(tiny, split_layers(tiny.config.num_layers, 3), weights="int8")  # a middle and both ends
    _, a = whole.prefill(whole.new_caches(1), PROMPT, all_logits=True)
    _, b = split.prefill(split.new_caches(1), PROMPT, all_logits=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    caches_a, _ = whole.prefill(whole.new_caches(1), PROMPT)
    caches_b, _ = split.prefill(split.new_caches(1), PROMPT)
    tok, pos = 5, len(PROMPT)
    for _ in range(4):
        caches_a, la = whole.decode(caches_a, [tok], [0], [pos])
        caches_b, lb = split.decode(caches_b, [tok], [0], [pos])
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
        tok, pos = int(np.argmax(np.asarray(la)[0])), pos + 1


def test_int8_embedding_only_partition_and_bfloat16(tiny: TinyModel) -> None:
    """A partition holding only the int8 embedding still outputs the compute dtype, and
    int8 with bfloat16 compute runs and stays close to int8 with float32."""
    cfg = tiny.config
    n = cfg.num_layers
    specs = [PartitionSpec(0, 0, True, False), PartitionSpec(0, n, False, True)]
    chain = _chain(tiny, specs, dtype="bfloat16", weights="int8")
    first = chain.partitions[0]
    assert first.params.dtype == jnp.bfloat16
    _, hidden = first.prefill(first.new_cache(1), PROMPT)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (len(PROMPT), cfg.hidden_size)
    _, got = chain.prefill(chain.new_caches(1), PROMPT, all_logits=True)
    f32 = _chain(tiny, weights="int8")
    _, ref = f32.prefill(f32.new_caches(1), PROMPT, all_logits=True)
    assert np.asarray(got).dtype == np.float32
    assert _cosine(np.asarray(ref), np.asarray(got)).min() > 0.99


# -- memory accounting -----------------------------------------------------------------------


def _specs(n: int) -> list[PartitionSpec]:
    return [
        PartitionSpec(0, n, True, True),
        PartitionSpec(0, n // 2, True, False),
        PartitionSpec(n // 2, n, False, True),
        PartitionSpec(1, n - 1, False, False),
        PartitionSpec(0, 0, True, False),
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_weight_bytes_match_the_loaded_params(tiny: TinyModel, dtype: str) -> None:
    cfg = tiny.config
    for spec in _specs(cfg.num_layers):
        part = load_partition(
            tiny.source(), cfg, spec, dtype=dtype, max_context=MAX_CONTEXT, weights="int8"
        )
        real = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(part.params))
        assert part.params.nbytes == real
        assert partition_weight_bytes(cfg, spec, dtype, "int8") == real, spec
        native = partition_weight_bytes(cfg, spec, dtype)
        assert real < (0.35 if dtype == "float32" else 0.65) * native, spec


def test_int8_estimates_count_int8_weights(tiny: TinyModel) -> None:
    cfg = tiny.config
    n = cfg.num_layers
    args = (cfg, 0, n, True, True, "float32", MAX_CONTEXT, 2)
    kw: dict[str, Any] = {"prefill_chunk": PREFILL_CHUNK, "attn_block": ATTN_BLOCK}
    native = memory_estimate(*args, **kw)
    int8 = memory_estimate(*args, **kw, weights="int8")
    part = _chain(tiny, weights="int8").partitions[0]
    assert int8.weights == part.params.nbytes
    assert int8.kv_cache == native.kv_cache and int8.temporaries > 0
    assert memory_needed(*args, **kw, weights="int8") == int8.total < native.total
    assert int8.weights < 0.35 * native.weights
    spec = PartitionSpec.whole(cfg)
    floor = resident_bytes(cfg, spec, "float32", MAX_CONTEXT, 2, prefill_chunk=PREFILL_CHUNK)
    floor8 = resident_bytes(
        cfg, spec, "float32", MAX_CONTEXT, 2, prefill_chunk=PREFILL_CHUNK, weights="int8"
    )
    assert floor - floor8 == native.weights - int8.weights


def test_qwen05_int8_is_a_quarter_of_float32() -> None:
    cfg = parse_config(QWEN05)
    spec = PartitionSpec.whole(cfg)
    f32 = partition_weight_bytes(cfg, spec, "float32")
    int8 = partition_weight_bytes(cfg, spec, "float32", "int8")
    assert int8 / f32 < 0.3, int8 / f32
    for part in split_layers(cfg.num_layers, 4):
        ratio = partition_weight_bytes(cfg, part, "float32", "int8") / partition_weight_bytes(
            cfg, part, "float32"
        )
        assert ratio < 0.3, (part, ratio)


def test_unknown_weight_format_is_refused(tiny: TinyModel) -> None:
    cfg = tiny.config
    with pytest.raises(PartitionError, match="native, int8"):
        load_partition(tiny.source(), cfg, PartitionSpec.whole(cfg), weights="bogus")
    with pytest.raises(PartitionError, match="native, int8"):
        memory_needed(cfg, 0, 1, True, False, "float32", 64, 1, weights="int4")
    with pytest.raises(PartitionError, match="native, int8"):
        partition_weight_bytes(cfg, PartitionSpec.whole(cfg), "float32", "fp8")
