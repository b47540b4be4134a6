"""Token sampling settings and the host-side sampling API.

Owns SamplingParams (one request's settings, validated), SamplerState (per session: seed,
step counter, tokens seen for the repetition penalty, stop tokens), row_settings (a batch
of states as arrays for a compiled step), advance (record sampled tokens) and
sample_batch (sample logits already on the host side of a step). The traceable samplers
are samplers.py's; the compiled tail step and decode_steps call them on the device.

Randomness is reproducible: row i at step t uses fold_in(PRNGKey(seed), t), whichever
path (tail step, decode_steps, sample_batch) draws the token.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import jax
import numpy as np

from node.engine.errors import SamplingError
from node.engine.samplers import RowSettings, candidate_count, greedy_rows, mask_words, sample_rows


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class SamplerState:
    """Per-session sampling state: settings, seed, step counter, tokens seen so far."""

    params: SamplingParams
    vocab_size: int
    seed: int = -1
    step: int = 0
    seen: np.ndarray | None = field(default=None, repr=False)
    # The next token's allowed set as a bitmask [ceil(V / 32)] int32, set before each step
    # by whoever constrains the session (a grammar); None: every token.
    allowed: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.seed < 0:
            self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(31)
        if self.params.repetition_penalty != 1.0 and self.seen is None:
            self.seen = np.zeros(self.vocab_size, dtype=bool)

    def observe(self, tokens: Iterable[int]) -> None:
        """Record tokens (prompt or generated) for the repetition penalty."""
        if self.seen is not None:
            self.seen[np.asarray(list(tokens), dtype=np.int64)] = True

    def is_stop(self, token: int) -> bool:
        return token in self.params.stop_token_ids


# Settings for an idle decode slot (None in a states list): greedy, never advanced.
_IDLE = SamplerState(SamplingParams(), 1, seed=0)


def is_plain_greedy(states: Sequence[SamplerState | None]) -> bool:
    """True when every row is greedy without repetition penalty: argmax alone will do."""
    return all(
        s is None
        or (s.params.temperature == 0 and s.params.repetition_penalty == 1.0 and s.allowed is None)
        for s in states
    )


def row_settings(states: Sequence[SamplerState | None], vocab: int) -> RowSettings:
    """Numpy arrays of every row's settings; None rows (idle slots) sample greedily.

    Numpy, not jnp: jit moves numpy arguments to the device in its C++ dispatch path,
    far cheaper than one jnp.asarray call per array.
    """
    rows = [s if s is not None else _IDLE for s in states]
    seen = np.zeros((len(rows), vocab), dtype=bool)
    allowed = np.full((len(rows), mask_words(vocab)), -1, dtype=np.int32)
    for i, s in enumerate(rows):
        if s.seen is not None:
            seen[i] = s.seen
        if s.allowed is not None:
            allowed[i] = s.allowed
    return RowSettings(
        temperature=np.asarray([s.params.temperature for s in rows], np.float32),
        top_k=np.asarray([s.params.top_k for s in rows], np.int32),
        top_p=np.asarray([s.params.top_p for s in rows], np.float32),
        min_p=np.asarray([s.params.min_p for s in rows], np.float32),
        penalty=np.asarray([s.params.repetition_penalty for s in rows], np.float32),
        seen=seen,
        seed=np.asarray([s.seed for s in rows], np.uint32),
        step=np.asarray([s.step for s in rows], np.uint32),
        allowed=allowed,
    )


_greedy_batch = jax.jit(greedy_rows)
_sample_batch = jax.jit(sample_rows, static_argnames=("candidates",))


def batch_candidates(states: Sequence[SamplerState | None], vocab: int) -> int:
    """The static candidate count sample_rows needs for these rows."""
    return candidate_count([s.params.top_k for s in states if s is not None], vocab)


def advance(states: Sequence[SamplerState | None], tokens: np.ndarray) -> None:
    """Record sampled tokens [B, steps] (or [B]): step counters and repetition state."""
    tokens = np.asarray(tokens).reshape(len(states), -1)
    for s, row in zip(states, tokens, strict=True):
        if s is not None:
            s.step += row.shape[0]
            s.observe(int(t) for t in row)


def sample_batch(
    logits: jax.Array, states: Sequence[SamplerState]
) -> tuple[np.ndarray, np.ndarray]:
    """Pick one token per row of logits [B, V] with each row's own settings.

    Advances every state's step counter and records the tokens for repetition penalties.
    Returns (tokens int64 [B], logprobs float32 [B]) as numpy arrays.
    """
    if logits.ndim != 2 or logits.shape[0] != len(states):
        raise SamplingError(
            f"need one sampler state per logits row, got {logits.shape} and {len(states)}"
        )
    if is_plain_greedy(states):
        tok, lp = _greedy_batch(logits)
    else:
        vocab = int(logits.shape[1])
        rows = row_settings(states, vocab)
        tok, lp = _sample_batch(logits, rows, candidates=batch_candidates(states, vocab))
    tokens = np.asarray(tok).astype(np.int64)
    logprobs = np.asarray(lp).astype(np.float32)
    advance(states, tokens)
    return tokens, logprobs
