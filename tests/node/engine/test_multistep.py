"""The one-partition fast path (decode_steps: several steps and sampling on the device)
against the step-by-step path the pipeline uses (decode + sample_batch per token)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from node.engine import (
    Chain,
    ContextOverflowError,
    PartitionError,
    SamplerState,
    SamplingParams,
    generate,
    sample_batch,
    split_layers,
)

TinyModel = Any

PROMPTS = [[3, 17, 250, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [42]]
SLOTS = [0, 1, 2, 3]
SAMPLED = SamplingParams(
    temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.3, seed=11
)
# Per-row settings for the batched test: greedy, sampled, sampled with other filters.
BATCH_PARAMS = [
    SamplingParams(),
    SAMPLED,
    SamplingParams(temperature=1.3, top_p=0.8, seed=3),
]


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_generate_blocks_equal_single_steps(whole_chain: Chain, sampling: SamplingParams) -> None:
    for ids in PROMPTS:
        single = list(generate(whole_chain, ids, sampling, 17, block=0))
        # 17 tokens: 1 from the prefill's logits, then two device blocks of 8 (every
        # test uses 8-step blocks: each new block size is one more compilation).
        multi = list(generate(whole_chain, ids, sampling, 17, block=8))
        assert len(single) == len(multi) == 17
        assert [t for t, _ in multi] == [t for t, _ in single]
        # Same compiled arithmetic per step: the logprobs agree to float32 rounding.
        np.testing.assert_allclose(
            [lp for _, lp in multi], [lp for _, lp in single], rtol=1e-6, atol=1e-6
        )
    if sampling.temperature > 0:  # the test can fail: the sampled path is not greedy
        greedy = [t for t, _ in generate(whole_chain, PROMPTS[1], SamplingParams(), 17, block=8)]
        assert [t for t, _ in generate(whole_chain, PROMPTS[1], sampling, 17, block=8)] != greedy


def _prefilled(chain: Chain, states: list[SamplerState | None]) -> tuple[Any, list[int], list[int]]:
    """A 4-slot cache with PROMPTS in slots 0-2 (different positions) and slot 3 idle."""
    caches = chain.new_caches(4)
    toks, poss = [0] * 4, [-1] * 4
    for slot, ids in enumerate(PROMPTS):
        state = states[slot]
        assert state is not None
        state.observe(ids)
        caches, logits = chain.prefill(caches, ids, slot=slot)
        tok, _ = sample_batch(logits[None], [state])
        toks[slot], poss[slot] = int(tok[0]), len(ids)
    return caches, toks, poss


def test_batched_decode_steps_equal_single_steps(whole_chain: Chain) -> None:
    vocab = whole_chain.config.vocab_size
    steps = 8

    def fresh() -> list[SamplerState | None]:
        return [SamplerState(p, vocab) for p in BATCH_PARAMS] + [None]

    # Step by step: decode, then sample_batch on the active rows (the pipeline's loop).
    states = fresh()
    caches, toks, poss = _prefilled(whole_chain, states)
    active = [s for s in states if s is not None]
    want_t, want_lp = [], []
    for _ in range(steps):
        caches, logits = whole_chain.decode(caches, toks, SLOTS, poss)
        t, lp = sample_batch(logits[: len(active)], active)
        want_t.append(t)
        want_lp.append(lp)
        toks = [*t.tolist(), 0]
        poss = [p + 1 for p in poss[:3]] + [-1]
    expect_t, expect_lp = np.stack(want_t, axis=1), np.stack(want_lp, axis=1)

    # The same in two device blocks of 4 steps, from a fresh cache and fresh states.
    states = fresh()
    caches, toks, poss = _prefilled(whole_chain, states)
    got_t, got_lp = [], []
    for k in (4, 4):
        caches, t, lp = whole_chain.decode_steps(caches, toks, SLOTS, poss, states, k)
        assert t.shape == lp.shape == (4, k)
        got_t.append(t[:3])
        got_lp.append(lp[:3])
        toks = t[:, -1].tolist()
        poss = [p + k for p in poss[:3]] + [-1]
    np.testing.assert_array_equal(np.concatenate(got_t, axis=1), expect_t)
    np.testing.assert_allclose(np.concatenate(got_lp, axis=1), expect_lp, rtol=1e-6, atol=1e-6)
    # States advanced as sample_batch advances them; the idle slot's has none to advance.
    assert [s.step for s in states if s is not None] == [1 + steps] * 3
    assert len({tuple(r) for r in expect_t.tolist()}) == 3  # rows really differ


def test_stop_token_inside_a_block(whole_chain: Chain) -> None:
    ids = PROMPTS[1]
    free = [t for t, _ in generate(whole_chain, ids, SAMPLED, 17, block=8)]
    stop = free[5]  # sampled inside the first 8-token device block
    first = free.index(stop)
    assert first >= 1  # after the prefill's token: inside a device block
    sampling = SamplingParams(
        temperature=SAMPLED.temperature,
        top_k=SAMPLED.top_k,
        top_p=SAMPLED.top_p,
        min_p=SAMPLED.min_p,
        repetition_penalty=SAMPLED.repetition_penalty,
        seed=SAMPLED.seed,
        stop_token_ids=frozenset({stop}),
    )
    out = [t for t, _ in generate(whole_chain, ids, sampling, 17, block=8)]
    assert out == free[:first]
    assert out == [t for t, _ in generate(whole_chain, ids, sampling, 17, block=0)]


def test_blocks_stop_at_context_end_and_overflow_is_refused(whole_chain: Chain) -> None:
    n = whole_chain.max_context
    prompt = [5] * (n - 8)
    # Same nine tokens as the single-step path (last position n - 1 decoded, never past).
    blocks = list(generate(whole_chain, prompt, SamplingParams(), 50, block=8))
    assert len(blocks) == 9
    assert blocks == list(generate(whole_chain, prompt, SamplingParams(), 50, block=0))

    state = SamplerState(SamplingParams(), whole_chain.config.vocab_size)
    with pytest.raises(ContextOverflowError, match="run past the context"):
        whole_chain.decode_steps(whole_chain.new_caches(1), [1], [0], [n - 7], [state], 8)
    with pytest.raises(ContextOverflowError, match="run past the context"):
        whole_chain.decode_steps(whole_chain.new_caches(1), [1], [0], [n], [state], 1)
    assert state.step == 0  # a refused call samples nothing
    # Exactly reaching the end is allowed.
    _, toks, _ = whole_chain.decode_steps(whole_chain.new_caches(1), [1], [0], [n - 8], [state], 8)
    assert toks.shape == (1, 8)


def test_decode_steps_needs_the_whole_model(tiny: TinyModel, whole_chain: Chain) -> None:
    split = tiny.chain(split_layers(tiny.config.num_layers, 2))
    state = SamplerState(SamplingParams(), tiny.config.vocab_size)
    with pytest.raises(PartitionError, match="one partition"):
        split.decode_steps(split.new_caches(1), [1], [0], [0], [state], 2)
    head = split.partitions[0]
    with pytest.raises(PartitionError, match="embedding and the head"):
        head.decode_steps(head.new_cache(1), [1], [0], [0], [state], 2)
    with pytest.raises(PartitionError, match="one sampler state per slot"):
        whole_chain.decode_steps(whole_chain.new_caches(2), [1, 1], [0, 1], [0, 0], [state], 2)
    with pytest.raises(PartitionError, match="steps >= 1"):
        whole_chain.decode_steps(whole_chain.new_caches(1), [1], [0], [0], [state], 0)
