"""Pipeline messages between nodes: what a stage accepts, checked before any work.

A session's driver sends ``pipe.step`` to the first stage of a plan; each stage runs
its layers and forwards the step, with its hidden states in place of the token ids,
to the next; the last stage samples and its answer (``StepReply``: the token, or for an
``embed`` step the input's vector, float32 [hidden], finite and of unit length) travels
back along the chain, as the reply to each hop's request: one way back, no second
connection from the tail to the driver. ``pipe.close``, ``pipe.release``,
``pipe.unload`` and ``pipe.lease`` name a model (and a session, an epoch, a lease
time): ``ModelRef``. Every body is a msgpack map; the checks here turn a body into a typed
step or raise ``PipelineMessageError`` with a message the sender can act on, and
bound everything a peer controls (token counts, tensor shapes, ids, sampling
values) before a stage allocates anything for it. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "MAX_GRAMMAR_CHARS",
    "MAX_STEP_TOKENS",
    "PROMPT_KINDS",
    "ModelRef",
    "PipelineMessageError",
    "SamplingSpec",
    "Step",
    "StepReply",
    "parse_model_ref",
    "parse_sampling",
    "parse_step",
    "parse_step_reply",
    "session_id_ok",
]

# A prefill chunk is at most 8192 tokens (engine.prefill_chunk's bound).
MAX_STEP_TOKENS = 8192
MAX_STOP_TOKENS = 64
MAX_SEEN_TOKENS = 1 << 20
MAX_GRAMMAR_CHARS = 1 << 20  # a JSON schema or the tools' (256 KiB of them) in a grammar
_SESSION = re.compile(r"^[0-9a-f]{8,64}$")
_MODEL_ID = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("prefill", "decode", "forced", "embed")
PROMPT_KINDS = ("prefill", "embed")  # steps that carry a chunk of a prompt
HIDDEN_DTYPES = ("float32", "float16", "bfloat16")


class PipelineMessageError(ValueError):
    """A pipeline body that breaks the rules; the text is safe to send back."""


def session_id_ok(value: Any) -> bool:
    return isinstance(value, str) and _SESSION.match(value) is not None


@dataclass(frozen=True)
class SamplingSpec:
    """The sampler settings of a session, as the driver sends them to the tail."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
        }


@dataclass(frozen=True)
class Step:
    """One step of one session at one stage.

    kind: "prefill" (tokens or hidden rows at positions start.., a chunk of the prompt),
    "decode" (one token, sampled at the tail), "forced" (one token replayed after a
    failure: the tail computes it but samples nothing) or "embed" (a chunk of an input
    to embed: a prefill whose last chunk makes the tail answer the input's embedding
    instead of a token). ``inputs`` are token ids [n]
    (int64) at the first stage, hidden states [n, hidden] elsewhere. ``last`` marks the
    prompt's final chunk, after which the tail samples the first token. ``resume``
    (prefill at position 0 only): the sampler's step count and the tokens already
    emitted, so a rebuilt session draws the same random numbers as the original;
    after a resumed prefill the tail samples nothing (the driver knows the next token).
    ``seen``: the token ids the repetition penalty counts (the prompt, plus the emitted
    tokens on resume), sent with the last prefill chunk when the penalty is on.
    ``grammar`` (last prefill chunk only): a constraint the tail applies to every token it
    samples for the session (an llguidance grammar, node/pipeline/grammar.py), with the
    ``stops`` that end the answer once the grammar is complete; on resume, ``emitted``
    holds the tokens already given so the grammar's state is rebuilt from them.
    """

    model_id: str
    epoch: int
    session: str
    step: int
    kind: str
    start: int
    inputs: np.ndarray
    last: bool
    sampling: SamplingSpec | None
    resume_step: int
    seen: np.ndarray | None
    timeout: float
    grammar: str | None = None
    stops: tuple[int, ...] = ()
    emitted: np.ndarray | None = None


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PipelineMessageError(f"{key} must be an integer from {low} to {high}")
    return value


def _float(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PipelineMessageError(f"{key} must be a number")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise PipelineMessageError(f"{key} must be from {low} to {high}")
    return value


def parse_sampling(body: Any) -> SamplingSpec:
    if not isinstance(body, dict):
        raise PipelineMessageError("sampling must be a map")
    top_k = body.get("top_k", 0)
    seed = body.get("seed", 0)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= 1 << 20:
        raise PipelineMessageError("top_k must be an integer from 0 to 1048576")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 31:
        raise PipelineMessageError("seed must be an integer from 0 to 2^31 - 1")
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise PipelineMessageError("top_p must be above 0")
    penalty = _float(body, "repetition_penalty", 1.0, 0.0, 100.0)
    if penalty <= 0:
        raise PipelineMessageError("repetition_penalty must be above 0")
    return SamplingSpec(
        temperature=_float(body, "temperature", 0.0, 0.0, 100.0),
        top_k=top_k,
        top_p=top_p,
        min_p=_float(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=penalty,
        seed=seed,
    )


def parse_step(body: Any, *, first: bool, hidden_size: int, vocab_size: int, max_context: int) -> Step:
    """Check a ``pipe.step`` body against the stage that received it."""
    if not isinstance(body, dict):
        raise PipelineMessageError("a step must be a map")
    model_id = body.get("model")
    if not isinstance(model_id, str) or _MODEL_ID.match(model_id) is None:
        raise PipelineMessageError("model must be a model id (64 hex digits)")
    session = body.get("session")
    if not session_id_ok(session):
        raise PipelineMessageError("session must be 8 to 64 lowercase hex digits")
    assert isinstance(session, str)
    kind = body.get("kind")
    if kind not in KINDS:
        raise PipelineMessageError(f"kind must be one of {', '.join(KINDS)}")
    epoch = _int(body, "epoch", 0, 1 << 62)
    step = _int(body, "step", 0, 1 << 40)
    start = _int(body, "start", 0, max_context - 1)
    inputs = body.get("inputs")
    if first:
        if not isinstance(inputs, np.ndarray) or inputs.ndim != 1 or inputs.dtype.kind not in "iu":
            raise PipelineMessageError("the first stage takes token ids: a 1-d integer tensor")
        inputs = inputs.astype(np.int64)
        if inputs.size and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab_size):
            raise PipelineMessageError(f"token ids must be in [0, {vocab_size})")
    else:
        if (
            not isinstance(inputs, np.ndarray)
            or inputs.ndim != 2
            or inputs.shape[1] != hidden_size
            or inputs.dtype.name not in HIDDEN_DTYPES
        ):
            raise PipelineMessageError(f"hidden states must be a float tensor [n, {hidden_size}]")
        if not np.isfinite(inputs).all():  # one NaN row would spread through every later step
            raise PipelineMessageError("hidden states must be finite (no NaN or infinity)")
    n = int(inputs.shape[0])
    if not 1 <= n <= MAX_STEP_TOKENS:
        raise PipelineMessageError(f"a step carries 1 to {MAX_STEP_TOKENS} tokens, got {n}")
    if kind not in PROMPT_KINDS and n != 1:
        raise PipelineMessageError(f"a {kind} step carries exactly one token")
    if start + n > max_context:
        raise PipelineMessageError(
            f"positions {start}..{start + n - 1} exceed the context of {max_context} tokens"
        )
    last = body.get("last", kind not in PROMPT_KINDS)
    if not isinstance(last, bool):
        raise PipelineMessageError("last must be true or false")
    sampling = None
    if "sampling" in body:
        sampling = parse_sampling(body["sampling"])
    resume_step = _int(body, "resume_step", 0, 1 << 40) if "resume_step" in body else 0
    seen = body.get("seen")
    if seen is not None:
        if not isinstance(seen, np.ndarray) or seen.ndim != 1 or seen.dtype.kind not in "iu":
            raise PipelineMessageError("seen must be a 1-d integer tensor")
        if seen.size > MAX_SEEN_TOKENS:
            raise PipelineMessageError(f"seen holds at most {MAX_SEEN_TOKENS} tokens")
        seen = seen.astype(np.int64)
        if seen.size and (int(seen.min()) < 0 or int(seen.max()) >= vocab_size):
            raise PipelineMessageError(f"seen token ids must be in [0, {vocab_size})")
    timeout = _float(body, "timeout", 60.0, 0.5, 3600.0)
    grammar, stops, emitted = _grammar(body, sampling is not None, vocab_size, max_context)
    return Step(
        model_id, epoch, session, step, kind, start, inputs, last, sampling, resume_step, seen, timeout,
        grammar, stops, emitted,
    )


def _token_ids(value: Any, what: str, most: int, vocab_size: int) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        raise PipelineMessageError(f"{what} must be a 1-d integer tensor")
    if value.size > most:
        raise PipelineMessageError(f"{what} holds at most {most} tokens")
    value = value.astype(np.int64)
    if value.size and (int(value.min()) < 0 or int(value.max()) >= vocab_size):
        raise PipelineMessageError(f"{what} token ids must be in [0, {vocab_size})")
    return value


def _grammar(body: dict[str, Any], sampling: bool, vocab_size: int,
             max_context: int) -> tuple[str | None, tuple[int, ...], np.ndarray | None]:
    grammar = body.get("grammar")
    if grammar is None:
        return None, (), None
    if not sampling:
        raise PipelineMessageError("a grammar comes with the sampling settings (the prompt's last chunk)")
    if not isinstance(grammar, str) or not 0 < len(grammar) <= MAX_GRAMMAR_CHARS:
        raise PipelineMessageError(f"grammar must be a text of 1 to {MAX_GRAMMAR_CHARS} characters")
    stops = _token_ids(body.get("stops", np.zeros(0, np.int64)), "stops", MAX_STOP_TOKENS, vocab_size)
    if not stops.size:
        raise PipelineMessageError("a grammar needs the stop tokens that end the answer")
    emitted = body.get("emitted")
    if emitted is not None:
        emitted = _token_ids(emitted, "emitted", max_context, vocab_size)
    return grammar, tuple(int(t) for t in stops), emitted


@dataclass(frozen=True)
class StepReply:
    """The answer to a step: the tail's token and its log-probability (None: no token, as
    after a forced step or a resumed prefill), or after an embed step's last chunk the
    input's embedding (float32 [hidden], finite, unit length)."""

    token: int | None
    logprob: float | None
    embedding: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.embedding is not None:
            return {"token": None, "logprob": None, "embedding": self.embedding}
        return {"token": self.token, "logprob": self.logprob}


def _embedding(value: Any, hidden_size: int) -> np.ndarray:
    if (not isinstance(value, np.ndarray) or value.ndim != 1 or value.shape[0] != hidden_size
            or value.dtype != np.float32):
        raise PipelineMessageError(f"the answer's embedding must be a float32 tensor [{hidden_size}]")
    if not np.isfinite(value).all():
        raise PipelineMessageError("the answer's embedding must be finite (no NaN or infinity)")
    norm = float(np.linalg.norm(value.astype(np.float64)))
    if abs(norm - 1.0) > 1e-3:
        raise PipelineMessageError(f"the answer's embedding must have unit length, got {norm:.4g}")
    return value


def parse_step_reply(body: Any, *, vocab_size: int, hidden_size: int | None = None) -> StepReply:
    """Check a step's answer as the driver (or a stage forwarding it) receives it; an
    embedding is accepted only when ``hidden_size`` says how long it must be."""
    if not isinstance(body, dict):
        raise PipelineMessageError("a step's answer must be a map")
    if body.get("embedding") is not None:
        if hidden_size is None:
            raise PipelineMessageError("this step's answer cannot carry an embedding")
        return StepReply(None, None, _embedding(body["embedding"], hidden_size))
    token, logprob = body.get("token"), body.get("logprob")
    if token is None and logprob is None:
        return StepReply(None, None)
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
        raise PipelineMessageError(f"the answer's token must be an id in [0, {vocab_size})")
    if isinstance(logprob, bool) or not isinstance(logprob, int | float):
        raise PipelineMessageError("the answer's logprob must be a number")
    logprob = float(logprob)
    if not (math.isfinite(logprob) or logprob == -math.inf) or logprob > 1e-3:
        raise PipelineMessageError("the answer's logprob must be a log-probability (<= 0)")
    return StepReply(token, logprob)


@dataclass(frozen=True)
class ModelRef:
    """``pipe.close`` {model, session}, ``pipe.release`` / ``pipe.unload`` {model},
    ``pipe.lease`` {model, epoch, ttl, until}."""

    model_id: str
    session: str | None = None
    epoch: int | None = None
    ttl: float | None = None
    until: float | None = None  # unix time the sender's keep_alive of the model runs out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model_id}
        if self.session is not None:
            out["session"] = self.session
        if self.epoch is not None:
            out["epoch"] = self.epoch
        if self.ttl is not None:
            out["ttl"] = self.ttl
        if self.until is not None:
            out["until"] = self.until
        return out


def parse_model_ref(body: Any, *, session: bool = False, lease: bool = False) -> ModelRef:
    if not isinstance(body, dict):
        raise PipelineMessageError("the body must be a map naming a model")
    model_id = body.get("model")
    if not isinstance(model_id, str) or _MODEL_ID.match(model_id) is None:
        raise PipelineMessageError("model must be a model id (64 hex digits)")
    sid = body.get("session")
    if session and not session_id_ok(sid):
        raise PipelineMessageError("session must be 8 to 64 lowercase hex digits")
    if not lease:
        return ModelRef(model_id, sid if session else None)
    epoch = _int(body, "epoch", 0, (1 << 62) - 1) if body.get("epoch") is not None else None
    until = _float(body, "until", 0.0, 0.0, 1e11) if body.get("until") is not None else None
    return ModelRef(model_id, None, epoch, _float(body, "ttl", 30.0, 1.0, 3600.0), until)
