"""Qwen3-MoE: config keys, the sparse MLP against transformers' Qwen3MoeSparseMoeBlock,
only the chosen experts computed, loading (per-expert and stacked), counts and int8."""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from node.engine import (
    ModelConfig,
    ModelConfigError,
    SamplingParams,
    UnsupportedModelError,
    generate,
    load_config,
    parse_config,
    split_layers,
)
from node.engine.memory import partition_param_count, partition_weight_bytes
from node.engine.moe import (
    MoEParams,
    experts_blocks,
    experts_loop,
    load_moe,
    moe_mlp,
    quantize_experts,
    route,
)
from node.engine.weights import PartitionSpec

BASE: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
}


def _with(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


# -- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "sparse"),
    [
        ({}, (0, 1, 2, 3)),
        ({"num_experts": None, "num_local_experts": 8}, (0, 1, 2, 3)),
        ({"decoder_sparse_step": 2}, (1, 3)),
        ({"mlp_only_layers": [0, 2]}, (1, 3)),
        ({"decoder_sparse_step": 2, "mlp_only_layers": [1]}, (3,)),
    ],
)
def test_sparse_layers_as_transformers_decides(changes: dict[str, Any], sparse: tuple[int, ...]) -> None:
    raw = _with(**changes)
    cfg = parse_config(raw)
    assert cfg.sparse_layers == sparse
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    hf = transformers.Qwen3MoeConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    want = tuple(
        i for i in range(hf.num_hidden_layers)
        if i not in hf.mlp_only_layers and (i + 1) % hf.decoder_sparse_step == 0
    )
    assert sparse == want


def test_norm_topk_prob_defaults_to_false_as_transformers() -> None:
    assert parse_config(_with(norm_topk_prob=None)).norm_topk_prob is False
    assert transformers.Qwen3MoeConfig().norm_topk_prob is False


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"num_experts": None}, ModelConfigError, "num_experts"),
        ({"num_local_experts": 16}, ModelConfigError, "disagree"),
        ({"num_experts_per_tok": None}, ModelConfigError, "num_experts_per_tok"),
        ({"num_experts_per_tok": 9}, ModelConfigError, "between 1 and num_experts=8"),
        ({"moe_intermediate_size": None}, ModelConfigError, "moe_intermediate_size"),
        ({"moe_intermediate_size": 0}, ModelConfigError, ">= 1"),
        ({"decoder_sparse_step": 0}, ModelConfigError, "decoder_sparse_step"),
        ({"mlp_only_layers": "0"}, ModelConfigError, "mlp_only_layers"),
        ({"norm_topk_prob": "yes"}, ModelConfigError, "norm_topk_prob"),
        ({"use_sliding_window": True}, UnsupportedModelError, "sliding-window"),
        ({"shared_expert_intermediate_size": 64}, UnsupportedModelError, "shared experts"),
    ],
)
def test_bad_moe_config_is_refused(changes: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_config(_with(**changes))


# -- the sparse MLP against transformers ---------------------------------------------------


def _hf_block(experts: int, top_k: int, norm: bool, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, moe_intermediate_size=32, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=norm,
    )
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def _params(block: Any) -> MoEParams:
    ex = block.experts
    F = ex.intermediate_dim
    gate_up = ex.gate_up_proj.detach().numpy()
    return MoEParams(
        router=jnp.asarray(block.gate.weight.detach().numpy()),
        wg=jnp.asarray(gate_up[:, :F]),
        wu=jnp.asarray(gate_up[:, F:]),
        wd=jnp.asarray(ex.down_proj.detach().numpy()),
    )


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # 1 and 3: the loop form; 40: blocks
def test_sparse_mlp_matches_transformers(norm: bool, tokens: int) -> None:
    block = _hf_block(8, 2, norm)
    x = np.random.default_rng(tokens).normal(size=(tokens, 64)).astype(np.float32)
    with torch.no_grad():
        ref = block(torch.tensor(x)[None])[0].numpy()
    out = jax.jit(moe_mlp, static_argnums=(2, 3))(_params(block), jnp.asarray(x.T), 2, norm)
    np.testing.assert_allclose(np.asarray(out).T, ref, rtol=1e-5, atol=1e-5)


def test_both_forms_agree_at_every_width() -> None:
    block = _hf_block(16, 4, True, seed=3)
    params = _params(block)
    for tokens in (1, 4, 5, 33):
        x = jnp.asarray(np.random.default_rng(tokens).normal(size=(64, tokens)), jnp.float32)
        idx, w = route(params.router, x, 4, True)
        np.testing.assert_allclose(
            np.asarray(experts_loop(params, x, idx, w)),
            np.asarray(experts_blocks(params, x, idx, w)), rtol=1e-5, atol=1e-6,
        )


@pytest.mark.parametrize("tokens", [1, 4, 64])  # loop form for 1 and 4, blocks for 64
def test_only_the_chosen_experts_are_computed(tokens: int) -> None:
    """64 experts, top-2: every expert no token chose gets NaN weights. Computing it at
    all (even multiplied by a zero routing weight) would make the output NaN."""
    E, k = 64, 2
    block = _hf_block(E, k, False, seed=5)
    params = _params(block)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(64, tokens)), jnp.float32)
    idx, _ = route(params.router, x, k, False)
    chosen = np.zeros(E, bool)
    chosen[np.asarray(idx).reshape(-1)] = True
    assert not chosen.all()

    def poison(w: jax.Array) -> jax.Array:
        return jnp.where(jnp.asarray(chosen)[:, None, None], w, jnp.nan)

    bad = MoEParams(params.router, poison(params.wg), poison(params.wu), poison(params.wd))
    step = jax.jit(moe_mlp, static_argnums=(2, 3))
    out = np.asarray(step(bad, x, k, False))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.asarray(step(params, x, k, False)))


# -- counts -------------------------------------------------------------------------------


def test_counts_hold_every_expert_and_active_counts_k() -> None:
    cfg = parse_config(_with(mlp_only_layers=[0]))
    spec = PartitionSpec(0, 4, False, False)
    H, Q, KV = 64, 64, 32
    attn = 2 * H + H * (Q + 2 * KV) + Q * H + 2 * 16  # norms, projections, q/k norms
    dense = attn + 3 * H * 96
    sparse = attn + 8 * H + 8 * 3 * H * 32
    assert partition_param_count(cfg, spec) == dense + 3 * sparse
    active = attn + 8 * H + 2 * 3 * H * 32
    assert partition_param_count(cfg, spec, active=True) == dense + 3 * active
    assert partition_weight_bytes(cfg, spec, "float32") == 4 * (dense + 3 * sparse)
    # int8: one byte per matrix entry plus a float32 scale per row (per expert row);
    # norms and the routers stay float32.
    def q(rows: int, cols: int) -> int:
        return rows * cols + 4 * rows

    attn8 = q(Q, H) + 2 * q(KV, H) + q(H, Q) + 4 * (2 * H + 2 * 16)
    dense8 = attn8 + 2 * q(96, H) + q(H, 96)
    sparse8 = attn8 + 4 * 8 * H + 2 * q(8 * 32, H) + q(8 * H, 32)
    assert partition_weight_bytes(cfg, spec, "float32", "int8") == dense8 + 3 * sparse8


# -- loading and int8 --------------------------------------------------------------------


def _reader(tensors: dict[str, np.ndarray]) -> Any:
    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        assert tensors[name].shape == shape, name
        return tensors[name]

    return read


def test_stacked_and_per_expert_tensors_load_the_same() -> None:
    params = _params(_hf_block(8, 2, True))
    prefix = "model.layers.3.mlp."
    per_expert = {prefix + "gate.weight": np.asarray(params.router)}
    stacked = dict(per_expert)
    for proj, w in (("gate_proj", params.wg), ("up_proj", params.wu), ("down_proj", params.wd)):
        arr = np.asarray(w)
        stacked[prefix + f"experts.{proj}"] = arr
        for e in range(8):
            per_expert[prefix + f"experts.{e}.{proj}.weight"] = arr[e]
    for tensors in (per_expert, stacked):
        got = load_moe(_reader(tensors), tensors.__contains__, prefix, (8, 64, 32), jnp.asarray, None)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("tokens", [2, 40])
def test_int8_experts_stay_close(tokens: int) -> None:
    params = _params(_hf_block(8, 2, True))
    q = MoEParams(params.router, *(quantize_experts(np.asarray(w), "float32", "w8a8")
                                    for w in (params.wg, params.wu, params.wd)))
    assert q.wg.q.dtype == jnp.int8 and q.wg.scale.shape == (8, 32)  # type: ignore[union-attr]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(64, tokens)), jnp.float32)
    step = jax.jit(moe_mlp, static_argnums=(2, 3))
    ref, out = np.asarray(step(params, x, 2, True)), np.asarray(step(q, x, 2, True))
    cos = (ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out)
    assert cos > 0.9995


# -- the whole model against transformers -------------------------------------------------

QK_NORM = "qk_norm" in ModelConfig.__dataclass_fields__
needs_qk_norm = pytest.mark.skipif(
    not QK_NORM, reason="Qwen3 attention (q_norm/k_norm) is not in the engine yet"
)


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "raw_topk"])
def tiny_moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.node.engine.conftest import TinyModel

    torch.manual_seed(11)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=request.param, mlp_only_layers=[1],
        vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                # A decisive router (the 0.02 init is near-uniform: top-k near ties), and
                # experts large enough to matter next to the residual.
                layer.mlp.gate.weight.normal_(0, 1.0)
                layer.mlp.experts.gate_up_proj.normal_(0, 0.2)
                layer.mlp.experts.down_proj.normal_(0, 0.2)
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp(f"tiny_qwen3moe_{request.param}")
    model.save_pretrained(path, safe_serialization=True)
    return TinyModel(path, load_config(path), model)


def test_tiny_checkpoint_is_parsed(tiny_moe: Any) -> None:
    cfg = tiny_moe.config
    assert cfg.architecture == "Qwen3MoeForCausalLM" and cfg.sparse_layers == (0, 2)
    assert cfg.num_experts == 8 and cfg.norm_topk_prob == tiny_moe.hf.config.norm_topk_prob


@needs_qk_norm
def test_prefill_logits_match_transformers(tiny_moe: Any) -> None:
    chain = tiny_moe.chain()
    ids = [int(x) for x in np.random.default_rng(0).integers(0, 320, 70)]
    _, logits = chain.prefill(chain.new_caches(1), ids, all_logits=True)
    with torch.no_grad():
        ref = tiny_moe.hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)


@needs_qk_norm
@pytest.mark.parametrize("parts", [1, 3])
def test_greedy_tokens_match_transformers(tiny_moe: Any, parts: int) -> None:
    chain = tiny_moe.chain(split_layers(3, parts))
    ids = [3, 17, 250, 9, 100, 42]
    with torch.no_grad():
        out = tiny_moe.hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                   pad_token_id=0)
    want = [int(t) for t in out[0, len(ids):]]
    assert [t for t, _ in generate(chain, ids, SamplingParams(), 24)] == want
    assert len(set(want)) > 3  # the output varies: the test could fail
