"""Engine outputs against transformers (CPU, float32), partition chaining and batching."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from node.engine import (
    Chain,
    ContextOverflowError,
    PartitionError,
    SamplingParams,
    generate,
    split_layers,
)
from node.engine.buckets import pow2_bucket

# TinyModel: see conftest.py (path, config, hf, chain(specs), max_context).
TinyModel = Any

PROMPTS = [[3, 17, 250, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [42]]


def _hf_logits(tiny: TinyModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return tiny.hf(torch.tensor([ids])).logits[0].numpy()


def _hf_greedy(tiny: TinyModel, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = tiny.hf.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in out[0, len(ids) :]]


def _engine_greedy(chain: Chain, ids: list[int], n: int) -> list[int]:
    return [t for t, _ in generate(chain, ids, SamplingParams(), n)]


def test_prefill_logits_match_transformers(tiny: TinyModel, whole_chain: Chain) -> None:
    # 70 tokens with 32-token chunks: three chunks, the last one padded to a bucket.
    ids = [int(x) for x in np.random.default_rng(0).integers(0, tiny.config.vocab_size, 70)]
    caches, logits = whole_chain.prefill(whole_chain.new_caches(1), ids, all_logits=True)
    ref = _hf_logits(tiny, ids)
    assert logits.shape == ref.shape
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # Without all_logits the last position's logits come back alone.
    _, last = whole_chain.prefill(caches, ids)
    np.testing.assert_allclose(np.asarray(last), ref[-1], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_greedy_generation_matches_transformers(tiny: TinyModel, whole_chain: Chain) -> None:
    for ids in PROMPTS:
        assert _engine_greedy(whole_chain, ids, 32) == _hf_greedy(tiny, ids, 32)


def test_decode_logits_match_transformers(tiny: TinyModel, whole_chain: Chain) -> None:
    ids = PROMPTS[1]
    caches, _ = whole_chain.prefill(whole_chain.new_caches(1), ids[:5])
    ref = _hf_logits(tiny, ids)
    for pos in range(5, len(ids)):
        caches, logits = whole_chain.decode(caches, [ids[pos]], [0], [pos])
        np.testing.assert_allclose(np.asarray(logits[0]), ref[pos], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parts", [2, 3])
def test_split_partitions_equal_whole(tiny: TinyModel, whole_chain: Chain, parts: int) -> None:
    split = tiny.chain(split_layers(tiny.config.num_layers, parts))
    assert len(split.partitions) == parts
    ids = PROMPTS[1]
    _, whole_logits = whole_chain.prefill(whole_chain.new_caches(1), ids, all_logits=True)
    _, split_logits = split.prefill(split.new_caches(1), ids, all_logits=True)
    np.testing.assert_allclose(
        np.asarray(split_logits), np.asarray(whole_logits), rtol=1e-5, atol=1e-6
    )
    assert _engine_greedy(split, ids, 16) == _engine_greedy(whole_chain, ids, 16)


def test_batched_decode_equals_one_at_a_time(tiny: TinyModel, whole_chain: Chain) -> None:
    prompts = PROMPTS
    steps = 6
    # One at a time.
    expected: list[list[np.ndarray]] = []
    for ids in prompts:
        caches, logits = whole_chain.prefill(whole_chain.new_caches(1), ids)
        rows = []
        tok, pos = int(np.argmax(logits)), len(ids)
        for _ in range(steps):
            caches, out = whole_chain.decode(caches, [tok], [0], [pos])
            rows.append(np.asarray(out[0]))
            tok, pos = int(np.argmax(out[0])), pos + 1
        expected.append(rows)
    # All sessions in one 4-slot cache (slot 3 idle), each at its own position.
    caches = whole_chain.new_caches(4)
    toks, poss = [0] * 4, [-1] * 4
    for slot, ids in enumerate(prompts):
        caches, logits = whole_chain.prefill(caches, ids, slot=slot)
        toks[slot], poss[slot] = int(np.argmax(logits)), len(ids)
    for step in range(steps):
        caches, out = whole_chain.decode(caches, toks, [0, 1, 2, 3], poss)
        for slot in range(len(prompts)):
            np.testing.assert_allclose(
                np.asarray(out[slot]), expected[slot][step], rtol=1e-5, atol=1e-5
            )
            toks[slot] = int(np.argmax(out[slot]))
            poss[slot] += 1


def test_prompt_longer_than_context_is_refused(whole_chain: Chain) -> None:
    with pytest.raises(ContextOverflowError, match="does not fit the context"):
        whole_chain.prefill(whole_chain.new_caches(1), [1] * (whole_chain.max_context + 1))
    with pytest.raises(ContextOverflowError, match="leaves no room"):
        list(generate(whole_chain, [1] * whole_chain.max_context, SamplingParams(), 4))
    with pytest.raises(ContextOverflowError, match="past the context"):
        whole_chain.decode(whole_chain.new_caches(1), [1], [0], [whole_chain.max_context])


def test_generation_stops_at_context_end(whole_chain: Chain) -> None:
    out = list(generate(whole_chain, [5] * (whole_chain.max_context - 3), SamplingParams(), 50))
    assert (
        len(out) == 4
    )  # positions whole_chain.max_context-3 .. whole_chain.max_context, the last never decoded


def test_wrong_inputs_are_refused(tiny: TinyModel) -> None:
    split = tiny.chain(split_layers(tiny.config.num_layers, 2))
    head, tail = split.partitions
    with pytest.raises(PartitionError, match="hidden states"):
        tail.prefill(tail.new_cache(), np.array([1, 2, 3]))
    with pytest.raises(PartitionError, match="token ids"):
        head.prefill(head.new_cache(), np.zeros((3, tiny.config.hidden_size), np.float32))
    with pytest.raises(PartitionError, match="one input and one position per slot"):
        head.decode(head.new_cache(2), [1], [0, 1], [0, 0])
    with pytest.raises(PartitionError, match="slot 2 is outside"):
        head.decode(head.new_cache(2), [1], [2], [0])
    with pytest.raises(PartitionError, match="distinct"):
        head.decode(head.new_cache(2), [1, 1], [1, 1], [0, 0])
    with pytest.raises(PartitionError, match="slot 5"):
        head.prefill(head.new_cache(2), [1, 2], slot=5)
    with pytest.raises(PartitionError, match="do not chain"):
        Chain([split.partitions[0], split.partitions[0], split.partitions[1]])


def test_stop_tokens_end_generation(whole_chain: Chain) -> None:
    ids = PROMPTS[0]
    free = _engine_greedy(whole_chain, ids, 10)
    stop = free[4]
    first = free.index(stop)
    out = [
        t
        for t, _ in generate(whole_chain, ids, SamplingParams(stop_token_ids=frozenset({stop})), 10)
    ]
    assert out == free[:first]


def test_prompt_lengths_share_bucket_compilations(whole_chain: Chain) -> None:
    from node.engine import steps

    fn = steps.forward
    if not hasattr(fn, "_cache_size"):
        pytest.skip("this jax version does not expose the jit cache size")
    for n in (17, 20, 29):  # warm the 32 bucket
        whole_chain.prefill(whole_chain.new_caches(1), list(range(1, n + 1)))
    before = fn._cache_size()
    for n in range(17, 33):
        whole_chain.prefill(whole_chain.new_caches(1), list(range(1, n + 1)))
    assert fn._cache_size() == before


@pytest.mark.parametrize(
    ("n", "floor", "cap", "want"),
    [
        # generate()'s decode blocks: floor 1, capped at the block size.
        (1, 1, None, 1),
        (5, 1, None, 8),
        (8, 1, None, 8),
        (9, 1, 16, 16),
        (40, 1, 16, 16),
        (3, 1, 12, 4),
        # prefill buckets: floor MIN_BUCKET, capped at the chunk.
        (1, 16, 512, 16),
        (16, 16, 512, 16),
        (17, 16, 512, 32),
        (300, 16, 512, 512),
        (70, 16, 32, 32),
    ],
)
def test_pow2_bucket(n: int, floor: int, cap: int | None, want: int) -> None:
    assert pow2_bucket(n, floor=floor, cap=cap) == want
