"""The step API a pipeline stage uses: head-major cache and key buckets, decode over a
subset of slots, batched and interleaved prefill, the tail step, one compilation per
partition shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from node.engine import (
    CacheGeometry,
    PartitionSpec,
    SamplerState,
    SamplingParams,
    chunk_spans,
    decode_width,
    load_partition,
    sample_batch,
    steps,
)
from node.engine import model as model_mod

TinyModel = Any  # see conftest.py

PROMPTS = [
    [3, 17, 250, 9],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    list(range(20, 90)),  # 70 tokens: three 32-token chunks
]


def test_cache_is_head_major_and_holds_transformers_keys(tiny: TinyModel) -> None:
    chain = tiny.chain()
    cfg = tiny.config
    ids = PROMPTS[1]
    caches, _ = chain.prefill(chain.new_caches(3), ids, slot=2)
    k0 = caches[0].k[0]
    assert k0.shape == (3, cfg.num_kv_heads, chain.partitions[0].geom.length, cfg.head_dim)
    with torch.no_grad():
        past = tiny.hf(torch.tensor([ids]), use_cache=True).past_key_values
    for layer in range(cfg.num_layers):
        ref_k = past.layers[layer].keys[0].numpy()  # [kv_heads, n, head_dim], after RoPE
        ref_v = past.layers[layer].values[0].numpy()
        n = len(ids)
        np.testing.assert_allclose(
            np.asarray(caches[0].k[layer][2, :, :n]), ref_k, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(caches[0].v[layer][2, :, :n]), ref_v, rtol=1e-5, atol=1e-5
        )
        assert not np.asarray(caches[0].k[layer][:2]).any()  # other slots untouched


@pytest.mark.parametrize(
    ("length", "block", "ring", "need", "want"),
    [
        (128, 32, False, 1, 64),  # at least two blocks
        (128, 32, False, 64, 64),
        (128, 32, False, 65, 96),  # half octaves: 2^k and 1.5 * 2^k
        (128, 32, False, 97, 128),
        (128, 32, False, 128, 128),
        (8192, 256, False, 257, 512),
        (8192, 256, False, 513, 768),
        (8192, 256, False, 769, 1024),
        (8192, 256, False, 4097, 6144),
        (8192, 256, False, 6145, 8192),
        (4096, 64, False, 530, 768),  # SmolLM2 on CPU
        (4096, 64, False, 2100, 3072),
        (4608, 256, True, 4000, 4096),
        (4608, 256, True, 5000, 4608),  # wrapped ring: all of it
        (4608, 256, False, 4600, 4608),  # the cache's end, not the next power of two
    ],
)
def test_key_length_follows_the_longest_session(
    length: int, block: int, ring: bool, need: int, want: int
) -> None:
    geom = CacheGeometry(length, length, block, ring, None)
    assert geom.key_length(need) == want


def test_decode_attends_over_the_bucket_of_the_longest_active_slot(
    tiny: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = tiny.chain()
    part = chain.partitions[0]
    seen: list[int] = []
    real = model_mod.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["key_len"])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod, "forward", spy)
    cache = part.new_cache(4)
    cache, _ = part.decode(cache, [1, 2], [0, 1], [3, 10])
    cache, _ = part.decode(cache, [1, 2], [0, 2], [4, 70])  # slot 2 far along
    cache, _ = part.decode(cache, [1], [0], [5])  # back to a short session alone
    cache, _ = part.decode(cache, [1, 2], [0, 2], [6, -1])  # a skipped entry counts nothing
    assert seen == [64, 96, 64, 64]


def test_decode_over_a_subset_of_slots(tiny: TinyModel) -> None:
    chain = tiny.chain()

    def prefilled() -> tuple[list[Any], list[int], list[int]]:
        caches = chain.new_caches(4)
        toks, poss = [], []
        for slot, ids in enumerate(PROMPTS):
            caches, logits = chain.prefill(caches, ids, slot=slot)
            toks.append(int(np.argmax(logits)))
            poss.append(len(ids))
        return caches, toks, poss

    caches, toks, poss = prefilled()
    caches, every = chain.decode(caches, toks, [0, 1, 2], poss)
    caches, toks, poss = prefilled()
    before = [np.asarray(c.k[0][1]) for c in caches]
    # Only slots 2 and 0 are ready, in that order; slot 1 must not move.
    caches, some = chain.decode(caches, [toks[2], toks[0]], [2, 0], [poss[2], poss[0]])
    assert some.shape == (2, tiny.config.vocab_size)
    np.testing.assert_allclose(np.asarray(some), np.asarray(every)[[2, 0]], rtol=1e-5, atol=1e-5)
    for c, b in zip(caches, before, strict=True):
        np.testing.assert_array_equal(np.asarray(c.k[0][1]), b)
    # Slot 1 decodes later, alone, and gets what it would have got with the others.
    caches, late = chain.decode(caches, [toks[1]], [1], [poss[1]])
    np.testing.assert_allclose(np.asarray(late[0]), np.asarray(every)[1], rtol=1e-5, atol=1e-5)
    assert decode_width(1) == 1 and decode_width(3) == 4 and decode_width(5) == 8


def test_batched_prefill_equals_one_session_at_a_time(tiny: TinyModel) -> None:
    chain = tiny.chain()
    caches, outs = chain.prefill_batch(chain.new_caches(3), PROMPTS, [2, 0, 1], [0, 0, 0])
    assert [o.shape for o in outs] == [(tiny.config.vocab_size,)] * 3
    batched_next = []
    for i, slot in enumerate([2, 0, 1]):
        _, alone = chain.prefill(chain.new_caches(1), PROMPTS[i])
        np.testing.assert_allclose(np.asarray(outs[i]), np.asarray(alone), rtol=1e-5, atol=1e-5)
        caches, out = chain.decode(caches, [int(np.argmax(outs[i]))], [slot], [len(PROMPTS[i])])
        batched_next.append(int(np.argmax(out[0])))
    # A middle partition's batched prefill returns each session's hidden states.
    split = tiny.chain(
        [PartitionSpec(0, 1, True, False), PartitionSpec(1, tiny.config.num_layers, False, True)]
    )
    head = split.partitions[0]
    _, hidden = head.prefill_batch(head.new_cache(2), PROMPTS[1:], [0, 1], [0, 5])
    assert [h.shape for h in hidden] == [(13, 64), (70, 64)]


def test_interleaved_prefill_runs_the_same_chunks(tiny: TinyModel) -> None:
    chain = tiny.chain()
    part = chain.partitions[0]
    prompt = PROMPTS[2]
    caches, whole = chain.prefill(chain.new_caches(2), prompt, slot=0)
    # The same prompt one chunk span per call, a decode step for slot 1 between calls.
    caches = chain.new_caches(2)
    caches, first = chain.prefill(caches, PROMPTS[0], slot=1)
    tok, pos = int(np.argmax(first)), len(PROMPTS[0])
    decoded = []
    spans = chunk_spans(0, len(prompt), part.prefill_chunk)
    assert spans == [(0, 32), (32, 64), (64, 70)]
    for a, b in spans:
        caches, last = chain.prefill(caches, prompt[a:b], start_pos=a, slot=0)
        caches, out = chain.decode(caches, [tok], [1], [pos])
        decoded.append(np.asarray(out[0]))
        tok, pos = int(np.argmax(out[0])), pos + 1
    np.testing.assert_array_equal(np.asarray(last), np.asarray(whole))
    # The decoding session got what it gets with no prompt being prefilled next to it.
    caches, out0 = chain.prefill(chain.new_caches(2), PROMPTS[0], slot=1)
    tok, pos = int(np.argmax(out0)), len(PROMPTS[0])
    for want in decoded:
        caches, out = chain.decode(caches, [tok], [1], [pos])
        np.testing.assert_array_equal(np.asarray(out[0]), want)
        tok, pos = int(np.argmax(out[0])), pos + 1
    assert chunk_spans(40, 60, 32) == [(40, 64), (64, 96), (96, 100)]


def test_tail_step_returns_tokens_like_decode_and_sample(tiny: TinyModel) -> None:
    chain = tiny.chain(
        [PartitionSpec(0, 2, True, False), PartitionSpec(2, tiny.config.num_layers, False, True)]
    )
    vocab = tiny.config.vocab_size
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=4)]

    def run(tail: bool) -> tuple[list[list[int]], list[list[float]]]:
        states = [SamplerState(p, vocab) for p in params]
        caches = chain.new_caches(2)
        toks, poss = [], []
        for slot, ids in enumerate(PROMPTS[:2]):
            states[slot].observe(ids)
            caches, logits = chain.prefill(caches, ids, slot=slot)
            toks.append(int(sample_batch(logits[None], [states[slot]])[0][0]))
            poss.append(len(ids))
        got: list[list[int]] = [[], []]
        lps: list[list[float]] = [[], []]
        for _ in range(6):
            if tail:
                caches, out = chain.tail_step(caches, toks, [0, 1], poss, states)
                t, lp = out.tokens, out.logprobs
            else:
                caches, logits = chain.decode(caches, toks, [0, 1], poss)
                t, lp = sample_batch(logits, states)
            for i in range(2):
                got[i].append(int(t[i]))
                lps[i].append(float(lp[i]))
            toks, poss = [int(x) for x in t], [p + 1 for p in poss]
        return got, lps

    want, want_lp = run(tail=False)
    got, got_lp = run(tail=True)
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5)


def test_tail_step_top_logprobs(tiny: TinyModel) -> None:
    chain = tiny.chain()
    part = chain.partitions[0]
    caches, logits = chain.prefill(chain.new_caches(2), PROMPTS[1], slot=1)
    tok = int(np.argmax(logits))
    _ref_caches, ref = chain.decode(
        chain.prefill(chain.new_caches(2), PROMPTS[1], slot=1)[0], [tok], [1], [13]
    )
    state = SamplerState(SamplingParams(), tiny.config.vocab_size)
    _cache, out = part.tail_step(caches[0], [tok], [1], [13], [state], top_logprobs=5)
    row = np.asarray(ref[0], np.float64)
    logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
    order = np.argsort(-logp)[:5]
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (1, 5) and out.top_ids[0].tolist() == order.tolist()
    np.testing.assert_allclose(out.top_logprobs[0], logp[order], rtol=1e-5, atol=1e-5)
    assert out.tokens[0] == order[0] and state.step == 1


def test_partitions_of_one_shape_compile_once(tiny: TinyModel) -> None:
    # Two middle partitions with the same layer count but other (start, end): the second
    # reuses every compilation of the first (a re-planned owner does not compile).
    cfg = tiny.config
    fn = steps.forward
    if not hasattr(fn, "_cache_size"):
        pytest.skip("this jax version does not expose the jit cache size")

    def load(start: int) -> Any:
        return load_partition(
            tiny.source(),
            cfg,
            PartitionSpec(start, start + 1, False, False),
            dtype="float32",
            max_context=128,
            prefill_chunk=32,
            attn_block=32,
        )

    def exercise(part: Any) -> None:
        cache = part.new_cache(2)
        cache, _ = part.prefill(cache, np.ones((20, cfg.hidden_size), np.float32), slot=1)
        cache, _ = part.decode(cache, np.ones((2, cfg.hidden_size), np.float32), [0, 1], [0, 20])

    exercise(load(0))
    before = fn._cache_size()
    exercise(load(1))
    assert fn._cache_size() == before
