"""The in-process chain runner: partitions chained in one process, and `generate`.

Owns `Chain` (partitions [0, a), [a, b), ... feeding each other's hidden states, as a
cluster pipeline would across nodes), `load_chain` and `generate` (prompt in, tokens out).
Used by scripts/generate.py and the tests; the math is model.py's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from node.engine.cache import KVCache
from node.engine.config import ModelConfig
from node.engine.errors import ContextOverflowError, PartitionError
from node.engine.model import Partition, load_partition, pow2_bucket
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
    ) -> tuple[list[KVCache], jax.Array]:
        x: Any = np.asarray(tokens, dtype=np.int32)
        out_caches = []
        for part, cache in zip(self.partitions, caches, strict=True):
            cache, x = part.prefill(cache, x, start_pos=start_pos, slot=slot, all_logits=all_logits)
            out_caches.append(cache)
        return out_caches, x

    def decode(
        self,
        caches: list[KVCache],
        tokens: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
    ) -> tuple[list[KVCache], jax.Array]:
        x: Any = np.asarray(tokens, dtype=np.int32)
        out_caches = []
        for part, cache in zip(self.partitions, caches, strict=True):
            cache, x = part.decode(cache, x, positions)
            out_caches.append(cache)
        return out_caches, x

    def decode_steps(
        self,
        caches: list[KVCache],
        tokens: Sequence[int] | np.ndarray,
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
            caches[0], tokens, positions, states, steps
        )
        return [cache], toks, lps


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
    tokens are the same as step-by-step decoding gives. block=0 forces one host round
    trip per token, the path split chains (and pipelines) always take.
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
            cache, toks, lps = part.decode_steps(cache, [token], [pos], [state], steps)
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
        caches, logits = chain.decode(caches, [token], [pos])
        pos += 1
        tokens, logprobs = sample_batch(logits, [state])
        token = int(tokens[0])
        if state.is_stop(token):
            return
        yield token, float(logprobs[0])
        produced += 1
