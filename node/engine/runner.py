"""The in-process chain runner: partitions chained in one process, `generate` and `replay`.

Owns `Chain` (partitions [0, a), [a, b), ... feeding each other's hidden states, as a
cluster pipeline would across nodes), `load_chain`, `generate` (prompt in, tokens out)
and `Chain.replay`, the reference for rebuilding a session after a failure: the pipeline
runs the same calls, one stage per node. Used by scripts/generate.py and the tests; the
math is model.py's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from node.engine.buckets import pow2_bucket
from node.engine.cache import KVCache
from node.engine.config import ModelConfig
from node.engine.errors import ContextOverflowError, PartitionError
from node.engine.model import Partition, TailTokens, load_partition
from node.engine.sampling import SamplerState, SamplingParams, sample_batch
from node.engine.weights import PartitionSpec, WeightSource

# Tokens per device call in generate()'s one-partition fast path (see decode_steps).
DEFAULT_DECODE_BLOCK = 16


@dataclass
class Chain:
    """Partitions chained in one process: the whole model, possibly split (tests, CLI)."""

    partitions: list[Partition]

    def __post_init__(self) -> None:
        specs = [p.spec for p in self.partitions]
        if not specs or not specs[0].has_embedding or not specs[-1].has_head:
            raise PartitionError("a chain must start with the embedding and end with the head")
        for a, b in itertools.pairwise(specs):
            if a.end != b.start or a.has_head or b.has_embedding:
                raise PartitionError(f"partitions {a} and {b} do not chain")

    @property
    def config(self) -> ModelConfig:
        return self.partitions[0].config

    @property
    def max_context(self) -> int:
        return min(p.max_context for p in self.partitions)

    def new_caches(self, slots: int = 1) -> list[KVCache]:
        return [p.new_cache(slots) for p in self.partitions]

    def prefill(
        self,
        caches: list[KVCache],
        tokens: Sequence[int],
        *,
        start_pos: int = 0,
        slot: int = 0,
        all_logits: bool = False,
        embed: bool = False,
    ) -> tuple[list[KVCache], jax.Array]:
        caches, outs = self.prefill_batch(
            caches, [tokens], [slot], [start_pos], all_logits=all_logits, embed=embed
        )
        return caches, outs[0]

    def prefill_batch(
        self,
        caches: list[KVCache],
        prompts: Sequence[Sequence[int]],
        slots: Sequence[int],
        start_positions: Sequence[int],
        *,
        all_logits: bool = False,
        embed: bool = False,
    ) -> tuple[list[KVCache], list[jax.Array]]:
        xs: list[Any] = [np.asarray(p, dtype=np.int64) for p in prompts]
        out_caches = []
        for part, cache in zip(self.partitions, caches, strict=True):
            cache, xs = part.prefill_batch(
                cache, xs, slots, start_positions, all_logits=all_logits, embed=embed
            )
            out_caches.append(cache)
        return out_caches, xs

    def _through_body(
        self,
        caches: list[KVCache],
        tokens: Any,
        slots: Sequence[int],
        positions: Sequence[int] | np.ndarray,
        width: int | None,
    ) -> tuple[list[KVCache], Any]:
        """Decode through every partition but the last: its input."""
        x: Any = np.asarray(tokens, dtype=np.int64)
        out = []
        for part, cache in zip(self.partitions[:-1], caches[:-1], strict=True):
            cache, x = part.decode(cache, x, slots, positions, width=width)
            out.append(cache)
        return out, x

    def decode(
        self,
        caches: list[KVCache],
        tokens: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        *,
        width: int | None = None,
    ) -> tuple[list[KVCache], jax.Array]:
        """One decode step: float32 logits [k, vocab] for the k sessions in `slots`."""
        body, x = self._through_body(
            caches, tokens, list(np.asarray(slots).reshape(-1)), positions, width
        )
        last, logits = self.partitions[-1].decode(caches[-1], x, slots, positions, width=width)
        return [*body, last], logits

    def tail_step(
        self,
        caches: list[KVCache],
        tokens: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        states: Sequence[SamplerState | None],
        *,
        top_logprobs: int = 0,
        width: int | None = None,
    ) -> tuple[list[KVCache], TailTokens]:
        """One decode step ending in the last partition's tail step: token ids back."""
        body, x = self._through_body(
            caches, tokens, list(np.asarray(slots).reshape(-1)), positions, width
        )
        last, out = self.partitions[-1].tail_step(
            caches[-1], x, slots, positions, states, top_logprobs=top_logprobs, width=width
        )
        return [*body, last], out

    def decode_steps(
        self,
        caches: list[KVCache],
        tokens: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        states: Sequence[SamplerState | None],
        steps: int,
    ) -> tuple[list[KVCache], np.ndarray, np.ndarray]:
        """Partition.decode_steps for a chain of one partition (the whole model)."""
        if len(self.partitions) != 1:
            raise PartitionError(
                f"decode_steps needs a chain of one partition, this one has {len(self.partitions)}"
            )
        cache, toks, lps = self.partitions[0].decode_steps(
            caches[0], tokens, slots, positions, states, steps
        )
        return [cache], toks, lps

    def replay(
        self,
        caches: list[KVCache],
        slot: int,
        prompt: Sequence[int],
        emitted: Sequence[int],
        *,
        width: int = 1,
    ) -> tuple[list[KVCache], jax.Array]:
        """Rebuild a session in `slot` from its prompt and the tokens already emitted,
        teacher-forced, and return the logits [vocab] for the token after them.

        The prompt is prefilled (chunks at multiples of prefill_chunk, as the first run
        did) and every emitted token goes through one decode step of `width` rows, as it
        did when it was generated, so the returned logits equal the undisturbed run's bit
        for bit under the conditions in node/engine/__init__.py. Nothing is sampled: the
        caller samples the next token from these logits and decodes it at position
        len(prompt) + len(emitted).
        """
        if len(prompt) + len(emitted) > self.max_context:
            raise ContextOverflowError(
                f"a session of {len(prompt) + len(emitted)} tokens does not fit the context "
                f"of {self.max_context} tokens"
            )
        caches, logits = self.prefill(caches, prompt, slot=slot)
        pos = len(prompt)
        for token in emitted:
            caches, out = self.decode(caches, [token], [slot], [pos], width=width)
            logits = out[0]
            pos += 1
        return caches, logits


def load_chain(
    source: WeightSource,
    config: ModelConfig,
    specs: Sequence[PartitionSpec],
    **kwargs: Any,
) -> Chain:
    """Load several partitions from one source (keyword arguments as load_partition)."""
    return Chain([load_partition(source, config, spec, **kwargs) for spec in specs])


def generate(
    chain: Chain,
    prompt: Sequence[int],
    sampling: SamplingParams,
    max_tokens: int,
    *,
    block: int = DEFAULT_DECODE_BLOCK,
) -> Iterator[tuple[int, float]]:
    """Generate up to max_tokens after `prompt`, yielding (token, logprob).

    Stops before yielding a stop token, or when the context is full.

    A chain of one partition decodes `block` tokens per device call (decode_steps:
    sampling on the device, one host sync per block), so tokens arrive in bursts of
    `block`; tokens sampled after a stop token or past max_tokens are discarded. The
    tokens are the same as step-by-step decoding gives. block=0 forces one tail step
    (decode + sampling on the device, token ids back) per token, the path split chains
    (and pipelines) always take.
    """
    if len(prompt) + 1 > chain.max_context:
        raise ContextOverflowError(
            f"prompt of {len(prompt)} tokens leaves no room in the context of {chain.max_context} tokens"
        )
    if block < 0:
        raise PartitionError(f"block must be >= 0, got {block}")
    state = SamplerState(sampling, chain.config.vocab_size)
    state.observe(prompt)
    caches = chain.new_caches(1)
    caches, logits = chain.prefill(caches, prompt)
    pos = len(prompt)
    tokens, logprobs = sample_batch(logits[None], [state])
    token = int(tokens[0])
    if max_tokens < 1 or state.is_stop(token):
        return
    yield token, float(logprobs[0])
    produced = 1
    if block > 0 and len(chain.partitions) == 1:
        part, cache = chain.partitions[0], caches[0]
        while produced < max_tokens and pos < chain.max_context:
            # Power-of-two block sizes for the last tokens: few compilations, little waste.
            steps = min(pow2_bucket(max_tokens - produced, cap=block), chain.max_context - pos)
            cache, toks, lps = part.decode_steps(cache, [token], [0], [pos], [state], steps)
            for t, lp in zip(toks[0].tolist(), lps[0].tolist(), strict=True):
                if state.is_stop(t):
                    return
                yield t, lp
                produced += 1
                if produced == max_tokens:
                    return
            token = int(toks[0, -1])
            pos += steps
        return
    while produced < max_tokens and pos < chain.max_context:
        caches, out = chain.tail_step(caches, [token], [0], [pos], [state])
        pos += 1
        token = int(out.tokens[0])
        if state.is_stop(token):
            return
        yield token, float(out.logprobs[0])
        produced += 1


def perplexity(chain: Chain, ids: Sequence[int], *, stepwise: bool = False) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given the tokens before each: how well
    the model predicts a fixed text. One all-logits prefill, or with ``stepwise`` one decode
    step a token (teacher-forced): the path generation takes, whose products differ (int8
    weights: W8A8 for decode widths, weight-only for prefill chunks; quant.py)."""
    if len(ids) < 2:
        raise PartitionError("perplexity needs at least two tokens")
    caches = chain.new_caches(1)
    if stepwise:
        caches, first = chain.prefill(caches, list(ids[:1]))
        rows = [np.asarray(first, dtype=np.float64).reshape(-1)]
        for i in range(1, len(ids) - 1):
            caches, step = chain.decode(caches, [ids[i]], [0], [i])
            rows.append(np.asarray(step, dtype=np.float64).reshape(-1))
        x = np.stack(rows)
    else:
        _, logits = chain.prefill(caches, list(ids), all_logits=True)
        x = np.asarray(logits, dtype=np.float64)[:-1]
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))
