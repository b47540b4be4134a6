"""Constrained sampling at the tail: a grammar's token mask for every step of a session.

The driver sends a grammar (llguidance's, built from a JSON schema or the tools a request
must call: node/api/formats.py) with the prompt's last chunk; the tail, where sampling
happens, keeps one llguidance matcher per constrained session. Before each sampled token
the matcher's mask ([ceil(V / 32)] int32 bits, the sampler's ``allowed``) leaves out every
token the grammar does not allow next; after it, the matcher takes the token. Once the
grammar is complete only the stop tokens remain, so the answer ends there. A rebuilt
session (after a node failed) replays the tokens already given into a fresh matcher.

llguidance needs the model's tokenizer (its tokenizer.json, a small file of the model every
stage holds); making it costs about a second, once per model and stop set. The matcher's
work per step is bounded by llguidance's parser limits (lexer fuel and Earley items per
step, lexer states), so a hostile schema costs a bounded time per token, not a stall.
Runs in the engine thread, beside the sampling it feeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from threading import Lock

import llguidance
import numpy as np

__all__ = ["Constraint", "GrammarError", "Grammars", "parser_limits"]

MAX_TOKENIZERS = 4  # llguidance tokenizers kept per model (one per stop set; a model has one)
# llguidance's defaults, with fewer lexer states (about 1-2 kB each: at most ~100 MB).
MAX_LEXER_STATES = 50_000


class GrammarError(ValueError):
    """A grammar the tail cannot follow; the text is safe to send back."""


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(max_lexer_states=MAX_LEXER_STATES)


class Constraint:
    """One session's grammar state."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stops: Sequence[int]) -> None:
        self._matcher = matcher
        self._words = (vocab_size + 31) // 32
        self._stops = np.asarray(sorted(stops), np.int64)

    def mask(self) -> np.ndarray:
        """The tokens allowed next, as the sampler's bitmask; only the stops when the grammar
        is done or broken (a matcher in error allows nothing, and a token must come)."""
        out = np.zeros(self._words, np.int32)
        if not self._matcher.is_error():
            self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        if self._matcher.is_error() or not out.any():
            out[:] = 0
            bits = out.view(np.uint32)
            bits[self._stops >> 5] |= np.left_shift(np.uint32(1), (self._stops & 31).astype(np.uint32))
        return out

    def consume(self, token: int) -> None:
        if not self._matcher.is_error() and not self._matcher.is_stopped():
            self._matcher.consume_token(int(token))

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())


class Grammars:
    """The grammars of one loaded model at its tail: ``tokenizer_json`` supplies the model's
    tokenizer.json text when the first constrained session comes."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int) -> None:
        self._source = tokenizer_json
        self._vocab = vocab_size
        self._tokenizers: dict[tuple[int, ...], llguidance.LLTokenizer] = {}
        self._lock = Lock()

    def _tokenizer(self, stops: tuple[int, ...]) -> llguidance.LLTokenizer:
        with self._lock:
            tok = self._tokenizers.get(stops)
            if tok is None:
                try:
                    tok = llguidance.LLTokenizer(self._source(), n_vocab=self._vocab, eos_token=list(stops))
                except Exception as exc:  # the tokenizer's own parse errors are plain exceptions
                    raise GrammarError(f"this model's tokenizer cannot drive a grammar: {exc}") from None
                if len(self._tokenizers) >= MAX_TOKENIZERS:
                    self._tokenizers.pop(next(iter(self._tokenizers)))
                self._tokenizers[stops] = tok
            return tok

    def start(self, grammar: str, stops: Sequence[int], emitted: Sequence[int] = ()) -> Constraint:
        """A session's constraint, past the tokens it already gave (``emitted``)."""
        key = tuple(sorted(set(int(t) for t in stops)))
        matcher = llguidance.LLMatcher(self._tokenizer(key), grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise GrammarError(f"the grammar is not valid: {matcher.get_error()[:300]}")
        c = Constraint(matcher, self._vocab, key)
        for t in emitted:
            c.consume(int(t))
        if matcher.is_error():
            raise GrammarError(f"the tokens given so far do not follow the grammar: {c.error[:300]}")
        return c
