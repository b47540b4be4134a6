"""Exact replay for recovery (f32, CPU): a session rebuilt from its prompt and the tokens
it already emitted continues exactly like the undisturbed run.

(a) replay on a fresh slot of another cache, 1, 2 and 3 partitions;
(b) the split points move (3 partitions -> 2 with other boundaries);
(c) which other slots are active never changes a session's tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from node.engine import Chain, split_layers

TinyModel = Any  # see conftest.py

PROMPT = [5, 77, 301, 12, 9, 140, 33, 2, 250, 61, 18, 7, 99, 4, 200, 150, 41, 3, 66, 10]
OTHERS = [[1, 2, 3], [300, 299, 298, 297, 296, 295, 294, 293] * 6, [42, 43]]
STEPS = 10
SPLIT_AT = 4  # tokens emitted before the failure


def _undisturbed(chain: Chain, steps: int = STEPS) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and every step's logits, one session decoded alone (width 1)."""
    caches, logits = chain.prefill(chain.new_caches(1), PROMPT)
    tokens, seen = [], [np.asarray(logits)]
    pos = len(PROMPT)
    for _ in range(steps):
        tokens.append(int(np.argmax(seen[-1])))
        caches, out = chain.decode(caches, [tokens[-1]], [0], [pos])
        seen.append(np.asarray(out[0]))
        pos += 1
    return tokens, seen


def _busy_caches(chain: Chain, slots: int) -> list[Any]:
    """A cache whose other slots already hold other sessions."""
    caches = chain.new_caches(slots)
    for slot, ids in enumerate(OTHERS[: slots - 1]):
        caches, _ = chain.prefill(caches, ids, slot=slot)
    return caches


def _continue(
    chain: Chain, caches: list[Any], slot: int, logits: Any, emitted: list[int]
) -> tuple[list[int], list[np.ndarray]]:
    tokens, seen = list(emitted), [np.asarray(logits)]
    pos = len(PROMPT) + len(emitted)
    while len(tokens) < STEPS:
        tokens.append(int(np.argmax(seen[-1])))
        caches, out = chain.decode(caches, [tokens[-1]], [slot], [pos])
        seen.append(np.asarray(out[0]))
        pos += 1
    return tokens, seen


@pytest.mark.parametrize("parts", [1, 3])  # 2 adds nothing 3 does not cover
def test_replay_on_another_cache_continues_exactly(varied: TinyModel, parts: int) -> None:
    chain = varied.chain(split_layers(varied.config.num_layers, parts))
    want, want_logits = _undisturbed(chain)
    assert len(set(want)) > 2  # a model that repeats one token would prove nothing
    emitted = want[:SPLIT_AT]
    # A fresh slot (3) of a 4-slot cache whose other slots are busy with other sessions.
    other = varied.chain(split_layers(varied.config.num_layers, parts))
    caches, logits = other.replay(_busy_caches(other, 4), 3, PROMPT, emitted)
    np.testing.assert_array_equal(np.asarray(logits), want_logits[SPLIT_AT])
    got, got_logits = _continue(other, caches, 3, logits, emitted)
    assert got == want
    for a, b in zip(got_logits, want_logits[SPLIT_AT:], strict=False):
        np.testing.assert_array_equal(a, b)


def test_replay_after_the_split_points_move(varied: TinyModel) -> None:
    n = varied.config.num_layers
    three = varied.chain(split_layers(n, 3))
    want, want_logits = _undisturbed(three)
    # Re-planned on two nodes with boundaries the first plan did not have.
    moved = [s for s in split_layers(n, 2)]
    assert {s.end for s in moved[:-1]} != {s.end for s in split_layers(n, 3)[:-1]}
    two = varied.chain(moved)
    emitted = want[:SPLIT_AT]
    caches, logits = two.replay(_busy_caches(two, 2), 1, PROMPT, emitted)
    got, got_logits = _continue(two, caches, 1, logits, emitted)
    assert got == want
    # f32 with excess precision off: where a jit boundary falls changes no bit.
    for a, b in zip(got_logits, want_logits[SPLIT_AT:], strict=False):
        np.testing.assert_array_equal(a, b)


def _in_company(
    chain: Chain, company: list[list[int]], fixed_width: int | None
) -> tuple[list[int], list[np.ndarray]]:
    """Decode PROMPT's session in slot 0 next to `company` (one session per slot, each
    decoding greedily too); fixed_width: pass every slot, idle ones at -1."""
    slots = 1 + len(company)
    caches = chain.new_caches(max(slots, fixed_width or 1))
    caches, logits = chain.prefill(caches, PROMPT, slot=0)
    toks, poss = [int(np.argmax(logits))], [len(PROMPT)]
    for slot, ids in enumerate(company, start=1):
        caches, out = chain.prefill(caches, ids, slot=slot)
        toks.append(int(np.argmax(out)))
        poss.append(len(ids))
    mine, seen = [toks[0]], []
    for step in range(STEPS - 1):
        # A companion stops after a few steps, another joins late: composition changes.
        live = [i for i in range(slots) if i == 0 or (i + step) % 3 != 0]
        if fixed_width:
            ids = list(range(fixed_width))
            pos = [poss[i] if i in live else -1 for i in range(slots)] + [-1] * (
                fixed_width - slots
            )
            tok = [toks[i] if i in live else 0 for i in range(slots)] + [0] * (fixed_width - slots)
            caches, out = chain.decode(caches, tok, ids, pos, width=fixed_width)
            rows = {i: out[i] for i in live}
        else:
            caches, out = chain.decode(
                caches, [toks[i] for i in live], live, [poss[i] for i in live]
            )
            rows = {i: out[j] for j, i in enumerate(live)}
        assert np.isfinite(np.asarray(out)).all()
        for i, row in rows.items():
            toks[i] = int(np.argmax(row))
            poss[i] += 1
        seen.append(np.asarray(rows[0]))
        mine.append(toks[0])
    return mine, seen


def test_batch_composition_never_changes_a_sessions_tokens(varied: TinyModel) -> None:
    chain = varied.chain()
    alone, _ = _in_company(chain, [], None)
    assert len(set(alone)) > 2
    # Other sessions, shorter and much longer (larger key buckets), joining and leaving.
    for company in ([OTHERS[0]], OTHERS, OTHERS[1:]):
        assert _in_company(chain, company, None)[0] == alone
    # At one fixed width the other rows' contents and lengths never change a bit.
    _, quiet = _in_company(chain, [OTHERS[0]], 4)
    _, busy = _in_company(chain, OTHERS, 4)
    assert _in_company(chain, OTHERS, 4)[0] == alone
    for a, b in zip(quiet, busy, strict=True):
        np.testing.assert_array_equal(a, b)
