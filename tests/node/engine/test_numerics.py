"""Numerics: no NaN from idle slots, a float32 LM head, bf16 results that do not depend
on where partition boundaries fall, token ids range-checked with a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from node.engine import (
    PartitionSpec,
    SamplerState,
    SamplingParams,
    TokenRangeError,
    load_chain,
    load_partition,
    split_layers,
)
from node.engine.transformer import rms_norm

TinyModel = Any  # see conftest.py

ROOT = Path(__file__).resolve().parents[3]
IDS = [5, 77, 301, 12, 9, 140, 33, 2, 250, 61, 18, 7, 99, 4, 200, 150, 41, 3, 66, 10] * 2


def test_idle_and_padding_rows_are_finite(tiny: TinyModel) -> None:
    chain = tiny.chain()
    part = chain.partitions[0]
    # Every entry skipped: position -1 masks every key; the mask is finite, so no NaN.
    cache, out = part.decode(part.new_cache(4), [1, 2, 3], [0, 1, 2], [-1, -1, -1])
    assert np.isfinite(np.asarray(out)).all()
    cache, out = part.decode(cache, [1, 2, 3], [0, 1, 3], [-1, 4, -1])  # padded to width 4
    assert np.isfinite(np.asarray(out)).all()
    states: list[SamplerState | None] = [
        SamplerState(SamplingParams(temperature=1.0, seed=1), tiny.config.vocab_size),
        None,
    ]
    cache, toks, lps = part.decode_steps(cache, [1, 1], [1, 2], [5, -1], states, 4)
    assert np.isfinite(lps).all() and ((toks >= 0) & (toks < tiny.config.vocab_size)).all()
    # A middle partition ships idle rows downstream: they must be finite too.
    head = tiny.chain(split_layers(tiny.config.num_layers, 2)).partitions[0]
    _, hidden = head.decode(head.new_cache(2), [7, 8], [0, 1], [3, -1])
    assert np.isfinite(np.asarray(hidden)).all()


def _bf16_chain(model: TinyModel, parts: int) -> Any:
    return load_chain(
        model.source(),
        model.config,
        split_layers(model.config.num_layers, parts),
        dtype="bfloat16",
        max_context=128,
        prefill_chunk=32,
        attn_block=32,
    )


def test_head_accumulates_and_returns_float32(varied: TinyModel) -> None:
    cfg = varied.config
    n = cfg.num_layers
    body = load_partition(varied.source(), cfg, PartitionSpec(0, n, True, False), dtype="bfloat16")
    tail = load_partition(varied.source(), cfg, PartitionSpec(n, n, False, True), dtype="bfloat16")
    _, hidden = body.prefill(body.new_cache(), IDS[:12])
    assert hidden.dtype == jnp.bfloat16
    _, logits = tail.prefill(tail.new_cache(), hidden, all_logits=True)
    assert logits.dtype == jnp.float32
    # The reference: the same bf16 normed hidden state and bf16 table, multiplied in f32.
    assert tail.params.final_norm is not None and tail.params.head is not None
    h = rms_norm(hidden.T, tail.params.final_norm, cfg.rms_norm_eps)
    ref = np.asarray(h.astype(jnp.float32)).T @ np.asarray(tail.params.head.astype(jnp.float32)).T
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(logits) - ref).max() / scale
    assert err < 1e-5, err  # a bf16 output would be ~1e-3 off (8-bit mantissa)


def test_bf16_results_do_not_depend_on_partition_boundaries(varied: TinyModel) -> None:
    outs, tokens = [], []
    for parts in (1, 3):
        chain = _bf16_chain(varied, parts)
        caches, logits = chain.prefill(chain.new_caches(1), IDS[:20], all_logits=True)
        got, pos = [], 20
        last = np.asarray(logits[-1])
        for _ in range(3):
            got.append(int(np.argmax(last)))
            caches, out = chain.decode(caches, [got[-1]], [0], [pos])
            last, pos = np.asarray(out[0]), pos + 1
        outs.append((np.asarray(logits), last))
        tokens.append(got)
    np.testing.assert_array_equal(outs[1][0], outs[0][0])
    np.testing.assert_array_equal(outs[1][1], outs[0][1])
    assert tokens[0] == tokens[1]


def test_token_ids_out_of_range_are_refused(tiny: TinyModel) -> None:
    chain = tiny.chain()
    part = chain.partitions[0]
    vocab = tiny.config.vocab_size
    with pytest.raises(TokenRangeError, match=rf"token id {vocab} .*vocabulary of {vocab} tokens"):
        part.prefill(part.new_cache(), [1, 2, vocab])
    with pytest.raises(TokenRangeError, match="token id -1"):
        part.decode(part.new_cache(2), [3, -1], [0, 1], [0, 0])
    state = SamplerState(SamplingParams(), vocab)
    with pytest.raises(TokenRangeError, match="outside the vocabulary"):
        part.decode_steps(part.new_cache(1), [vocab + 5], [0], [0], [state], 2)
    with pytest.raises(TokenRangeError, match="session 1"):
        part.prefill_batch(part.new_cache(2), [[1], [2, 10**6]], [0, 1], [0, 0])


def test_importing_the_engine_sets_the_numerics_flags() -> None:
    code = (
        "import json, os\n"
        "os.environ['XLA_FLAGS'] = '--xla_cpu_use_thunk_runtime=true'\n"
        "import node.engine\n"
        "import jax\n"
        "print(json.dumps(os.environ['XLA_FLAGS']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    flags = json.loads(out.stdout).split()
    assert "--xla_allow_excess_precision=false" in flags
    assert "--xla_cpu_use_thunk_runtime=true" in flags  # the user's flags stay
    assert jax.devices()  # this process too (conftest imported node.engine first)
