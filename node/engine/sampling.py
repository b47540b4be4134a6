"""Token sampling on the last partition: greedy, temperature, top-k, top-p, min-p,
repetition penalty, per-request seeds, stop tokens and log-probabilities.

The building blocks are small pure functions on logits. `sample_rows` (traceable, used
inside decode_steps' device loop) and `sample_batch` (one jitted, vmapped step on the host
side) sample a batch where every row has its own settings, so requests with different
parameters share one compilation; `greedy_rows` is the argmax-only fast path.

Log-probabilities are those of the model's distribution (log-softmax of the raw logits),
not of the temperature-scaled, filtered one, matching what OpenAI-style APIs report.
Randomness is reproducible: row i at step t uses fold_in(PRNGKey(seed), t).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from node.engine.errors import SamplingError


def log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def apply_repetition_penalty(
    logits: jax.Array, seen: jax.Array, penalty: jax.Array | float
) -> jax.Array:
    """transformers' rule: seen tokens' logits are divided by `penalty` if positive, else multiplied."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: jax.Array | int) -> jax.Array:
    """Keep the k largest logits (ties at the k-th value kept); k <= 0 disables."""
    vocab = logits.shape[-1]
    kth = jnp.sort(logits)[..., ::-1][..., jnp.clip(k - 1, 0, vocab - 1)]
    return jnp.where((k > 0) & (logits < kth), -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: jax.Array | float) -> jax.Array:
    """Keep the smallest set of top tokens whose probability reaches p (always >= 1 token)."""
    ordered = jnp.sort(logits)[::-1]
    probs = jax.nn.softmax(ordered)
    keep = (jnp.cumsum(probs) - probs) < p
    cutoff = ordered[jnp.maximum(jnp.sum(keep) - 1, 0)]
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def min_p_filter(logits: jax.Array, min_p: jax.Array | float) -> jax.Array:
    """Drop tokens whose probability is below min_p times the top token's."""
    probs = jax.nn.softmax(logits)
    return jnp.where(probs < min_p * jnp.max(probs), -jnp.inf, logits)


def filtered_logits(
    logits: jax.Array,
    temperature: jax.Array | float,
    top_k: jax.Array | int,
    top_p: jax.Array | float,
    min_p: jax.Array | float,
) -> jax.Array:
    """Temperature, then top-k, top-p, min-p (transformers' order), on one row [V]."""
    x = logits.astype(jnp.float32) / temperature
    x = top_k_filter(x, top_k)
    x = top_p_filter(x, top_p)
    return min_p_filter(x, min_p)


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


def greedy_rows(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Argmax token and its log-probability for every row of logits [B, V]."""
    tokens = jnp.argmax(logits, axis=-1)
    logprobs = jnp.take_along_axis(log_softmax(logits), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


_greedy_batch = jax.jit(greedy_rows)


def _sample_row(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    penalty: jax.Array,
    seen: jax.Array,
    seed: jax.Array,
    step: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    logprobs = log_softmax(logits)
    x = apply_repetition_penalty(logits, seen, penalty)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    greedy = temperature <= 0
    sampled = jax.random.categorical(
        rng, filtered_logits(x, jnp.where(greedy, 1.0, temperature), top_k, top_p, min_p)
    )
    token = jnp.where(greedy, jnp.argmax(x), sampled)
    return token, logprobs[token]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSettings:
    """Per-row sampling settings as arrays [B] (seen [B, V]), ready for a jitted step.

    Built on the host with `row_settings`; `step` is each row's step counter for the next
    token, so a multi-step decode adds its loop index to it.
    """

    temperature: jax.Array | np.ndarray
    top_k: jax.Array | np.ndarray
    top_p: jax.Array | np.ndarray
    min_p: jax.Array | np.ndarray
    penalty: jax.Array | np.ndarray
    seen: jax.Array | np.ndarray
    seed: jax.Array | np.ndarray
    step: jax.Array | np.ndarray


def is_plain_greedy(states: Sequence[SamplerState | None]) -> bool:
    """True when every row is greedy without repetition penalty: argmax alone will do."""
    return all(
        s is None or (s.params.temperature == 0 and s.params.repetition_penalty == 1.0)
        for s in states
    )


def row_settings(states: Sequence[SamplerState | None], vocab: int) -> RowSettings:
    """Numpy arrays of every row's settings; None rows (idle slots) sample greedily.

    Numpy, not jnp: jit moves numpy arguments to the device in its C++ dispatch path,
    far cheaper than one jnp.asarray call per array.
    """
    rows = [s if s is not None else _IDLE for s in states]
    seen = np.zeros((len(rows), vocab), dtype=bool)
    for i, s in enumerate(rows):
        if s.seen is not None:
            seen[i] = s.seen
    return RowSettings(
        temperature=np.asarray([s.params.temperature for s in rows], np.float32),
        top_k=np.asarray([s.params.top_k for s in rows], np.int32),
        top_p=np.asarray([s.params.top_p for s in rows], np.float32),
        min_p=np.asarray([s.params.min_p for s in rows], np.float32),
        penalty=np.asarray([s.params.repetition_penalty for s in rows], np.float32),
        seen=seen,
        seed=np.asarray([s.seed for s in rows], np.uint32),
        step=np.asarray([s.step for s in rows], np.uint32),
    )


def sample_rows(
    logits: jax.Array, rows: RowSettings, step_offset: jax.Array | int = 0
) -> tuple[jax.Array, jax.Array]:
    """Traceable: one token and its logprob per row of logits [B, V], row i at step
    rows.step[i] + step_offset (so fold_in(PRNGKey(seed), step) as in sample_batch)."""
    step = jnp.asarray(rows.step, jnp.uint32) + jnp.asarray(step_offset, jnp.uint32)
    return jax.vmap(_sample_row)(
        logits,
        jnp.asarray(rows.temperature),
        jnp.asarray(rows.top_k),
        jnp.asarray(rows.top_p),
        jnp.asarray(rows.min_p),
        jnp.asarray(rows.penalty),
        jnp.asarray(rows.seen),
        jnp.asarray(rows.seed),
        step,
    )


_sample_batch = jax.jit(sample_rows)


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
        tok, lp = _sample_batch(logits, row_settings(states, logits.shape[1]))
    tokens = np.asarray(tok).astype(np.int64)
    logprobs = np.asarray(lp).astype(np.float32)
    advance(states, tokens)
    return tokens, logprobs
