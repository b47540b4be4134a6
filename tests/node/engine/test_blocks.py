"""GGUF blocks kept as the file holds them (node/engine/blocks.py) and ggml's kernels
called from compiled steps (node/engine/ggml.py, kernels/ggml_ffi.cc).

References: the gguf package's numpy dequantizers (llama.cpp's reference code) for the
decoders, and for the products the same arithmetic ggml does: the weights dequantized
times the activations quantized to Q8_0 (gguf's bit-exact Q8_0 quantizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize as np_dequantize
from gguf.quants import quantize as np_quantize

from node.engine import PartitionSpec, WeightSource, load_chain, load_partition
from node.engine import ggml as ggml_lib
from node.engine.blocks import (
    BLOCK_TYPES,
    GGML,
    JAX,
    BlockMatrix,
    bmatmul,
    decode_blocks,
    dequantize,
)
from node.testing.gguf_writer import write_gguf
from node.testing.tinymodel import make_tiny_model

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
PLAIN = ("F16", "BF16")


def _blocks(name: str, w: np.ndarray) -> np.ndarray:
    """w [rows, cols] in block type `name`, as uint8 [rows, row_bytes]."""
    qt = gguf.GGMLQuantizationType[name]
    if name in K_TYPES:
        return ggml_lib.quantize(w, int(qt))
    return np.ascontiguousarray(np_quantize(w, qt)).view(np.uint8).reshape(w.shape[0], -1)


def _reference(name: str, data: np.ndarray, cols: int) -> np.ndarray:
    return np.asarray(np_dequantize(data, gguf.GGMLQuantizationType[name]), np.float32).reshape(-1, cols)


def test_the_kernels_load_here() -> None:
    """CI builds them (a C++ compiler is installed): a missing build must fail loudly, not
    quietly fall back and leave the other tests checking nothing of ggml's."""
    assert ggml_lib.unavailable() is None


@pytest.mark.parametrize("name", LEGACY + K_TYPES + PLAIN)
def test_decoders_equal_the_gguf_package(name: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 512)).astype(np.float32)
    data = _blocks(name, w)
    assert data.shape == (40, BLOCK_TYPES[name].row_bytes(512))
    want = _reference(name, data, 512)
    np.testing.assert_array_equal(np.asarray(decode_blocks(jnp.asarray(data), name, 512)), want)
    np.testing.assert_array_equal(np.asarray(dequantize(BlockMatrix(jnp.asarray(data), name, 512, "float32", GGML))),
                                  want)
    # Close to what was quantized, so the blocks mean what the names say.
    assert np.abs(want - w).max() < (0.05 if name not in ("Q4_0", "Q4_1", "Q4_K") else 0.5) * np.abs(w).max()


@pytest.mark.parametrize("name", LEGACY + K_TYPES + PLAIN)
@pytest.mark.parametrize("m", [1, 5])
def test_ggml_product_is_the_dequantized_weights_times_quantized_activations(name: str, m: int) -> None:
    """1000 rows: split over threads in uneven chunks. Legacy types use Q8_0/Q8_1
    activations (the same values as gguf's Q8_0 quantizer), K types Q8_K (f32 scales),
    F16/BF16 their own type."""
    rng = np.random.default_rng(1)
    rows, cols = 1000, 512
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((cols, m)).astype(np.float32)
    data = _blocks(name, w)
    wd = _reference(name, data, cols)
    got = np.asarray(jax.jit(bmatmul)(BlockMatrix(jnp.asarray(data), name, cols, "float32", GGML), jnp.asarray(x)))
    exact = wd.astype(np.float64) @ x
    scale = np.abs(exact).max()
    if name in LEGACY:
        xq = np_dequantize(np_quantize(np.ascontiguousarray(x.T), gguf.GGMLQuantizationType.Q8_0),
                           gguf.GGMLQuantizationType.Q8_0).reshape(m, cols)
        want = wd.astype(np.float64) @ xq.T.astype(np.float64)
        # Q8_1's block sums are stored as f16: a little more rounding for Q4_1/Q5_1.
        assert np.abs(got - want).max() < 2e-3 * scale
        assert np.abs(got - exact).max() > np.abs(got - want).max()  # activations were quantized
    else:  # Q8_K activations; F16/BF16 weights take f16/bf16 activations
        assert np.abs(got - exact).max() < 1e-2 * scale


@pytest.mark.parametrize("types", [("Q4_K", "Q6_K", "Q6_K"), ("Q5_0", "Q8_0"), ("Q4_1", "Q8_0", "F16")])
def test_one_call_for_several_matrices_equals_one_call_each(types: tuple[str, ...]) -> None:
    """q/k/v (or gate/up) in one call: the activations quantized once per dot type (Q4_1's
    Q8_1 beside Q8_0, F16's own), the rows of all matrices shared out; the same numbers."""
    from node.engine.blocks import bmatmul_many

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((512, 3)).astype(np.float32))
    ws = [BlockMatrix(jnp.asarray(_blocks(t, rng.standard_normal((rows, 512)).astype(np.float32))), t, 512,
                      "float32", GGML) for t, rows in zip(types, (700, 96, 130), strict=False)]
    together = jax.jit(bmatmul_many)(ws, x)
    assert [y.shape for y in together] == [(w.shape[0], 3) for w in ws]
    for w, y in zip(ws, together, strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(bmatmul)(w, x)))


def test_wide_products_take_the_dequantized_gemm() -> None:
    """Past 16 columns (prefill chunks) ggml dequantizes and XLA multiplies: exact."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    data = _blocks("Q4_K", w)
    want = _reference("Q4_K", data, 256) @ x
    for kernel in (GGML, JAX):
        got = np.asarray(jax.jit(bmatmul)(BlockMatrix(jnp.asarray(data), "Q4_K", 256, "float32", kernel), jnp.asarray(x)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_bad_operands_are_an_error_not_a_crash() -> None:
    data = jnp.zeros((8, 18 * 2), jnp.uint8)  # two Q4_0 blocks a row: 64 values
    x = jnp.ones((96, 1), jnp.float32)
    with pytest.raises(Exception, match="row bytes do not match"):
        bmatmul(BlockMatrix(data, "Q4_0", 96, "float32", GGML), x).block_until_ready()
    with pytest.raises(Exception, match="not whole blocks"):
        bmatmul(BlockMatrix(data, "Q4_0", 48, "float32", GGML), jnp.ones((48, 1), jnp.float32)).block_until_ready()


def test_without_kernels_blocks_decode_in_jax_and_say_why_once(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from node.engine import blocks

    monkeypatch.setattr(ggml_lib, "_load", lambda: (None, "no compiler was found"))
    monkeypatch.setattr(ggml_lib, "_logged", False)
    with caplog.at_level(logging.WARNING, logger="enjambre.engine"):
        assert blocks.default_kernel("cpu") == JAX
        assert blocks.default_kernel("cpu") == JAX
    assert [r.getMessage() for r in caplog.records if "ggml_kernels_unavailable" in r.getMessage()] == [
        "ggml_kernels_unavailable: no compiler was found; GGUF blocks decode through the pure-JAX path "
        "(same results, slower)"]
    assert blocks.default_kernel("gpu") == JAX
    with pytest.raises(RuntimeError, match="no compiler was found"):
        bmatmul(BlockMatrix(jnp.zeros((4, 18), jnp.uint8), "Q4_0", 32, "float32", GGML), jnp.ones((32, 1)))


# Whole models: tiny random GGUFs of every block type. K types need 256-value rows.
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blocks")
    return {
        "narrow": make_tiny_model(root / "narrow", arch="qwen2", layers=3, seed=3),
        "wide": make_tiny_model(root / "wide", arch="llama", layers=3, hidden=256, heads=4, kv_heads=2,
                                intermediate=512, seed=4),
    }


EMULATED_CONTEXT = 56
IDS = [3, 17, 42, 99, 7, 250, 11, 5, 60, 200, 31, 8, 77, 140, 2, 19]
SPLIT = [PartitionSpec(0, 1, True, False), PartitionSpec(1, 2, False, False), PartitionSpec(2, 3, False, True)]


def _all_logits(path: Path, config: object, kernel: str, specs: list[PartitionSpec] | None = None,
                context: int = 64) -> np.ndarray:
    from tests.node.engine.test_gguf import _gguf_config  # noqa: F401  (same config reader)

    chain = load_chain(WeightSource.from_gguf(path), config, specs or [PartitionSpec.whole(config)],  # type: ignore[arg-type]
                       dtype="float32", max_context=context, prefill_chunk=16, block_kernel=kernel)
    _, out = chain.prefill(chain.new_caches(1), IDS, all_logits=True)
    return np.asarray(out)


def _quantized_activations(x: jax.Array, block_type: str) -> jax.Array:
    """x [K, M] as ggml's dot type for `block_type` holds it, dequantized: Q8_0/Q8_1 (f16
    scale amax/127), Q8_K (f32 scale max/-127 over 256 values), or f16/bf16."""
    if block_type == "F16":
        return x.astype(jnp.float16).astype(jnp.float32)
    if block_type == "BF16":
        return x.astype(jnp.bfloat16).astype(jnp.float32)
    size = 256 if block_type in K_TYPES else 32
    b = x.T.reshape(x.shape[1], -1, size)
    if block_type in K_TYPES:
        at = jnp.argmax(jnp.abs(b), axis=-1, keepdims=True)
        peak = jnp.take_along_axis(b, at, axis=-1)
        iscale = jnp.where(peak == 0, 0.0, -127.0 / peak)
        q = jnp.minimum(jnp.round(b * iscale), 127.0)
        xq = q * jnp.where(iscale == 0, 0.0, 1.0 / iscale)
    else:
        d = jnp.max(jnp.abs(b), axis=-1, keepdims=True) / 127.0
        q = jnp.round(b * jnp.where(d == 0, 0.0, 1.0 / d))
        xq = q * d.astype(jnp.float16).astype(jnp.float32)
    return xq.reshape(x.shape[1], -1).T


def _emulated_bmatmul(w: BlockMatrix, x: jax.Array, out_dtype: object = None) -> jax.Array:
    wf = decode_blocks(w.data, w.block_type, w.cols)
    y = wf @ _quantized_activations(x.astype(jnp.float32), w.block_type)
    return y.astype(out_dtype or x.dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("qtype", [*LEGACY, *K_TYPES, "F16"])
def test_a_model_in_blocks_answers_as_ggml_arithmetic_says(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                           qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole tiny models through ggml's products against the same model computed in JAX
    with the activations quantized as ggml quantizes them: the same logits and top tokens,
    up to what these random models make of rounding differences (Q4_0/Q5_0/K types/F16
    agree within 0.2% of the logits' range; Q8_0, Q4_1/Q5_1 within 4%: SIMD rounding
    ties, Q8_1's f16 block sums). Against the dequantized float32 model they drift by up
    to 10%: random tiny models amplify the activations' 8-bit rounding; SmolLM2 keeps its
    greedy tokens (test_smollm2.py). Split in three, exactly the whole model's; the blocks held at the
    file's size."""
    import node.engine.blocks as blocks
    import node.engine.transformer as transformer
    from tests.node.engine.test_gguf import _gguf_config

    src = tiny_dirs["wide" if qtype in K_TYPES else "narrow"]
    path = write_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    config = _gguf_config(path)
    got = _all_logits(path, config, GGML)
    np.testing.assert_allclose(_all_logits(path, config, GGML, SPLIT), got, rtol=0, atol=1e-5)
    # Traced with the emulation patched in, under a cache length no other test compiles
    # (so the compiled step is neither an earlier one nor reused later).
    monkeypatch.setattr(transformer, "bmatmul", _emulated_bmatmul)
    monkeypatch.setattr(blocks, "bmatmul", _emulated_bmatmul)  # bmatmul_many's products too
    want = _all_logits(path, config, JAX, context=EMULATED_CONTEXT)
    monkeypatch.undo()
    # Rounding ties and Q8_1's f16 block sums still differ, and these models amplify them.
    assert np.abs(got - want).max() < 0.05 * np.ptp(want)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85
    part = load_partition(WeightSource.from_gguf(path), config, PartitionSpec.whole(config), max_context=64,
                          prefill_chunk=16, block_kernel=GGML)
    kept = [leaf for leaf in jax.tree_util.tree_leaves(part.params, is_leaf=lambda x: isinstance(x, BlockMatrix))
            if isinstance(leaf, BlockMatrix)]
    assert kept and all(w.block_type == qtype for w in kept)
    matrices = sum(int(np.prod(w.shape)) for w in kept)
    assert sum(w.nbytes for w in kept) == matrices // BLOCK_TYPES[qtype].block_size * BLOCK_TYPES[qtype].type_bytes


def test_a_mixture_of_experts_keeps_its_experts_as_blocks(tmp_path: Path) -> None:
    """Qwen3-MoE's stacked experts [E, F, H] stay blocks; decoded in JAX they give the
    dequantized model's logits, through ggml's products close to them."""
    from node.engine import load_config
    from node.gguf.sidecar import write_sidecars
    from tests.helpers.tiny_archs import make_tiny_arch

    path = write_gguf(make_tiny_arch("qwen3moe", tmp_path / "hf"), tmp_path / "m.gguf", qtype="Q8_0")
    config = load_config(write_sidecars(path, tmp_path / "side"))
    assert any(name.endswith("mlp.experts.gate_proj") for name, _ in config.matrix_types)
    want = _all_logits(path, config, "dequantize")
    np.testing.assert_allclose(_all_logits(path, config, JAX), want, rtol=0, atol=1e-4)
    got = _all_logits(path, config, GGML)
    assert 0 < np.abs(got - want).max() < 0.1 * np.ptp(want)
    part = load_partition(WeightSource.from_gguf(path), config, PartitionSpec.whole(config), max_context=64,
                          prefill_chunk=16, block_kernel=GGML)
    moe = next(layer.moe for layer in part.params.layers if layer.moe is not None)
    assert isinstance(moe.wg, BlockMatrix) and moe.wg.shape == (config.num_experts, config.moe_intermediate_size,
                                                                 config.hidden_size)
    from node.engine.memory import partition_weight_bytes

    assert partition_weight_bytes(config, PartitionSpec.whole(config), "float32") == part.params.nbytes


def test_a_config_that_lies_about_the_files_types_is_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The memory figures are planned from config.json's gguf_matrix_types: a member's
    sidecar claiming Q4_0 for matrices the file holds at Q8_0 is refused at load."""
    import dataclasses

    from node.engine import load_config
    from node.engine.errors import WeightsError
    from node.gguf.sidecar import write_sidecars

    path = write_gguf(tiny_dirs["narrow"], tmp_path / "m.gguf", qtype="Q8_0")
    config = load_config(write_sidecars(path, tmp_path / "side"))
    assert config.matrix_types and all(t == "Q8_0" for _, t in config.matrix_types)
    lying = dataclasses.replace(config, matrix_types=tuple((n, "Q4_0") for n, _ in config.matrix_types))
    with pytest.raises(WeightsError, match=r"gguf_matrix_types says .* is 'Q4_0'; the file holds Q8_0"):
        load_partition(WeightSource.from_gguf(path), lying, PartitionSpec.whole(lying), max_context=64,
                       prefill_chunk=16)
