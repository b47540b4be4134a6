"""node.gguf.tokenizer.merges_from_scores: a SentencePiece vocabulary's merges in time linear
in its tokens' lengths (a file may hold a token of megabytes), the same merges as cutting every
token every way, and a bound on how many."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import pytest

from node.gguf.tokenizer import BYTE, CONTROL, GGUFTokenizerError, merges_from_scores


def _every_way(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int] | None
) -> list[tuple[str, str]]:
    """The definition: every cut of every token whose halves are both pieces, by score."""
    usable = [(i, t) for i, t in enumerate(tokens) if types is None or types[i] not in (2, 3, 6)]
    vocab = {t: i for i, t in usable}
    ranked = [
        (-float(scores[i]), i, c, t[:c], t[c:])
        for i, t in usable if vocab[t] == i
        for c in range(1, len(t)) if t[:c] in vocab and t[c:] in vocab
    ]
    return [(left, right) for *_, left, right in sorted(ranked)]


def test_a_100k_character_token_is_cut_in_linear_time() -> None:
    # Cutting it every way took 6 s (100k slices of up to 100k characters each).
    n = 100_000
    a = "a"
    tokens = ["<unk>", a, "b", a * (n // 2), a * n, "ab" * (n // 2), "b" + a * (n - 1), "ab", a * (n - 1)]
    scores = [0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]
    start = time.perf_counter()
    merges = merges_from_scores(tokens, scores, [2, 1, 1, 1, 1, 1, 1, 1, 1])
    assert time.perf_counter() - start < 2.0
    assert merges == [
        (a, a * (n - 1)), (a * (n // 2), a * (n // 2)), (a * (n - 1), a),  # a * n, cut 3 ways
        ("b", a * (n - 1)),
        (a, "b"),
    ]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("short", [0, 1, 3, 64])
def test_the_same_merges_as_cutting_every_way(seed: int, short: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab▁c"
    tokens = list(alphabet) + ["".join(rng.choice(alphabet[: rng.randint(1, 4)])
                                       for _ in range(rng.randint(1, 14))) for _ in range(300)]
    tokens += [tokens[rng.randrange(len(tokens))] for _ in range(10)]  # texts listed twice
    scores = [rng.choice([-1.0, -2.0, rng.uniform(-20, 0)]) for _ in tokens]  # with ties
    types = [rng.choice([1, 1, 1, 1, 4, CONTROL, BYTE, 2]) for _ in tokens]
    for t in (types, None):
        assert merges_from_scores(tokens, scores, t, short=short) == _every_way(tokens, scores, t)


def test_too_many_merges_are_refused() -> None:
    # "a" * k for k up to 100: 4,950 ways to cut them, where a real vocabulary has ~2 per token.
    tokens = ["a" * k for k in range(1, 101)]
    scores = [-float(k) for k in range(100)]
    assert len(merges_from_scores(tokens, scores, None, max_merges=4950)) == 4950
    for short in (0, 64):
        with pytest.raises(GGUFTokenizerError, match="more than 4949 merges"):
            merges_from_scores(tokens, scores, None, short=short, max_merges=4949)
