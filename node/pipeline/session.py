"""One generation, driven from this node: prefill, steps, stop strings, recovery.

``Request`` is what both API faces (Ollama's and OpenAI's) ask for, and ``Generation`` the
one stream they adapt: ``start()`` waits for the first token (so an error before any
output is still an HTTP error), then ``pieces()`` yields the decoded text as tokens
arrive, holding back what could be the start of a stop string, with the tokens so far
and why it ended.

A step travels to the head of the plan; each stage forwards it and the tail's token
returns as the reply (protocol/pipeline.py). When a step fails, the session is closed on
every stage and the model's plan is checked (models.py ``recover``): the same plan when
nothing is gone (a busy machine, a timeout), a repaired one when a node died. Then the
session is rebuilt teacher-forced: the prompt is prefilled again, the tokens already
emitted are replayed as ``forced`` steps (nothing is re-sampled), the sampler resumes at
the same step with the same seed, and generation goes on; with greedy sampling or a
fixed seed the text equals the undisturbed run's. A stage whose slots are all taken
(``busy``: several entry nodes share its cache) is asked again after a pause.

``Sessions.embed`` drives one input to embed the same way: its chunks as ``embed``
steps (one step for an encoder, which needs the whole input at once), the tail's
vector as the last answer, the session freed on every stage after it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from node.cluster.peers import Peers, PeerUnknown
from node.engine.buckets import chunk_spans
from node.net.errors import RemoteError, RequestRefused, TransportError
from node.pipeline.models import DriverError, GenerationError, LoadedModels, Model, QueueFull
from protocol.pipeline import PipelineMessageError, SamplingSpec, parse_step_reply

__all__ = ["Generation", "Piece", "Request", "Sessions", "Token"]

log = structlog.get_logger("node.pipeline")

MAX_FAILURES = 6  # failed attempts in a row without a new token before the request gives up
BUSY_DEADLINE = 300.0  # how long a session waits for a free slot at a busy stage
# Replayed steps in flight at once: each stage runs them in order as they arrive, so the
# replay costs about one step per token at the slowest stage rather than a round trip of
# the whole chain per token (at most 4 x slots steps may wait at a stage).
REPLAY_WINDOW = 4


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float


@dataclass(frozen=True)
class Request:
    """A generation as both APIs ask for it: the prompt's token ids, how to sample, at most
    ``max_tokens`` new tokens, and the strings that end it early."""

    prompt: tuple[int, ...]
    sampling: SamplingSpec
    max_tokens: int
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # what the answer must follow (node/api/formats.py), applied at the tail


@dataclass(frozen=True)
class Piece:
    text: str
    count: int  # tokens generated so far
    reason: str  # "stop" | "length" (meaningful on the last piece)


class _StageGone(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)


class _Busy(Exception):
    pass


class Sessions:
    """Generations on the models ``models`` holds; ``queue``: requests that may wait for a
    session slot of one model before the answer is "busy"."""

    def __init__(self, models: LoadedModels, peers: Peers, *, step_timeout: float, queue: int) -> None:
        self.models = models
        self.peers = peers
        self.step_timeout = step_timeout
        self.queue = queue

    def open(self, m: Model, request: Request) -> Generation:
        return Generation(self, m, request)

    async def tokens(self, m: Model, prompt: list[int], sampling: SamplingSpec, max_tokens: int,
                     stop_ids: frozenset[int], grammar: str | None = None) -> AsyncIterator[Token]:
        """Stream the tokens after ``prompt`` (stop tokens are not yielded)."""
        if len(prompt) + 1 > m.max_context:
            raise DriverError(f"the prompt has {len(prompt)} tokens; the context holds {m.max_context}")
        if m.waiting >= self.queue and m.gate.locked():
            raise QueueFull(f"{m.slots} sessions are running and {m.waiting} requests are waiting; try again later")
        m.waiting += 1
        try:
            await m.gate.acquire()
        finally:
            m.waiting -= 1
        session = ""
        emitted: list[int] = []
        failures, busy_since = 0, 0.0
        try:
            max_tokens = min(max_tokens, m.max_context - len(prompt))
            while len(emitted) < max_tokens:
                session = secrets.token_hex(8)
                m.sessions.add(session)
                epoch, before = m.epoch, len(emitted)
                try:
                    async for tok in self._run(m, session, prompt, sampling, max_tokens, stop_ids, emitted, grammar):
                        yield tok
                    return
                except _Busy as exc:
                    self._end(m, session)
                    busy_since = busy_since or time.monotonic()
                    if time.monotonic() - busy_since > BUSY_DEADLINE:
                        raise GenerationError(f"the model's nodes stayed busy: {exc}") from None
                    await asyncio.sleep(0.25 + 0.5 * np.random.random())
                except _StageGone as gone:
                    self._end(m, session)
                    busy_since = 0.0
                    failures = 1 if len(emitted) > before else failures + 1
                    if failures > MAX_FAILURES:
                        raise GenerationError(f"the model's nodes keep failing ({gone}); giving up") from None
                    await self.models.recover(m, epoch, str(gone))
                    if failures > 1:
                        await asyncio.sleep(min(4.0, 0.25 * 2 ** failures))
        finally:
            if session:
                self._end(m, session)
            m.used_at = time.monotonic()
            m.gate.release()

    async def embed(self, m: Model, ids: list[int]) -> np.ndarray:
        """The embedding of one input (token ids): its chunks travel as ``embed`` steps, the
        tail answers the last one with the vector (float32 [hidden], unit length, checked by
        protocol/pipeline.py), and the session is freed on every stage. A failed step is
        retried from the start after ``recover``, as a generation is."""
        if not 1 <= len(ids) <= m.max_context:
            raise DriverError(f"the input has {len(ids)} tokens; the context holds {m.max_context}")
        if m.waiting >= self.queue and m.gate.locked():
            raise QueueFull(f"{m.slots} sessions are running and {m.waiting} requests are waiting; try again later")
        m.waiting += 1
        try:
            await m.gate.acquire()
        finally:
            m.waiting -= 1
        session, failures, busy_since = "", 0, 0.0
        try:
            while True:
                session = secrets.token_hex(8)
                m.sessions.add(session)
                epoch = m.epoch
                try:
                    return await self._embed_once(m, session, ids)
                except _Busy as exc:
                    self._end(m, session)
                    busy_since = busy_since or time.monotonic()
                    if time.monotonic() - busy_since > BUSY_DEADLINE:
                        raise GenerationError(f"the model's nodes stayed busy: {exc}") from None
                    await asyncio.sleep(0.25 + 0.5 * np.random.random())
                except _StageGone as gone:
                    self._end(m, session)
                    failures += 1
                    if failures > MAX_FAILURES:
                        raise GenerationError(f"the model's nodes keep failing ({gone}); giving up") from None
                    await self.models.recover(m, epoch, str(gone))
        finally:
            if session:
                self._end(m, session)
            m.used_at = time.monotonic()
            m.gate.release()

    async def _embed_once(self, m: Model, session: str, ids: list[int]) -> np.ndarray:
        head = m.plan.stages[0].node_id
        base = {"model": m.model_id, "epoch": m.epoch, "session": session, "timeout": self.step_timeout}
        reply: dict[str, Any] = {}
        # An encoder attends both ways: it takes the whole input in one step.
        chunk = len(ids) if getattr(m.config, "is_encoder", False) else m.prefill_chunk
        for step, (a, b) in enumerate(chunk_spans(0, len(ids), chunk)):
            reply = await self._step(m, head, {**base, "step": step, "kind": "embed", "start": a,
                                               "inputs": np.asarray(ids[a:b], np.int64), "last": b == len(ids)})
        vector = reply.get("embedding")
        if not isinstance(vector, np.ndarray):
            raise _StageGone(f"node {head[:12]} answered an embed step without an embedding")
        return vector

    def _end(self, m: Model, session: str) -> None:
        if session in m.sessions:
            m.sessions.discard(session)
            self.models.close_session(m, session)

    async def _run(self, m: Model, session: str, prompt: list[int], sampling: SamplingSpec, max_tokens: int,
                   stop_ids: frozenset[int], emitted: list[int], grammar: str | None) -> AsyncIterator[Token]:
        """One attempt on the current plan; ``emitted`` holds what the client already has
        (replayed, not re-sampled) and grows as tokens are yielded."""
        step = 0
        resume = len(emitted)
        started = time.monotonic()
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = np.asarray(prompt + emitted, np.int64)
        head = m.plan.stages[0].node_id
        base = {"model": m.model_id, "epoch": m.epoch, "session": session, "timeout": self.step_timeout}
        reply: dict[str, Any] = {}
        for a, b in chunk_spans(0, len(prompt), m.prefill_chunk):
            body = {**base, "step": step, "kind": "prefill", "start": a,
                    "inputs": np.asarray(prompt[a:b], np.int64), "last": b == len(prompt)}
            if b == len(prompt):
                body["sampling"] = sampling.to_dict()
                if resume:
                    body["resume_step"] = resume
                if seen is not None:
                    body["seen"] = seen
                if grammar is not None:
                    body.update(grammar=grammar, stops=np.asarray(sorted(stop_ids), np.int64))
                    if resume:
                        body["emitted"] = np.asarray(emitted, np.int64)
            reply = await self._step(m, head, body)
            step += 1
        pos = len(prompt)
        if len(emitted) > 1:  # replay: teacher-forced, nothing sampled, a few steps in flight at once
            window = asyncio.Semaphore(REPLAY_WINDOW)

            async def forced(i: int, token: int) -> None:
                async with window:
                    await self._step(m, head, {**base, "step": step + i, "kind": "forced", "start": pos + i,
                                               "inputs": np.asarray([token], np.int64)})

            tasks = [asyncio.ensure_future(forced(i, t)) for i, t in enumerate(emitted[:-1])]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            step, pos = step + len(emitted) - 1, pos + len(emitted) - 1
        if resume:
            log.info("session_rebuilt", model=m.model_id[:12], epoch=m.epoch, prompt=len(prompt), replayed=resume,
                     seconds=round(time.monotonic() - started, 2))
            next_input = emitted[-1]
        else:
            tok = self._token(reply, head)
            if tok.id in stop_ids:
                return
            emitted.append(tok.id)
            yield tok
            next_input = tok.id
        while len(emitted) < max_tokens:
            reply = await self._step(m, head, {**base, "step": step, "kind": "decode", "start": pos,
                                               "inputs": np.asarray([next_input], np.int64)})
            step, pos = step + 1, pos + 1
            tok = self._token(reply, head)
            if tok.id in stop_ids:
                return
            emitted.append(tok.id)
            yield tok
            next_input = tok.id

    @staticmethod
    def _token(reply: dict[str, Any], head: str) -> Token:
        if reply.get("token") is None:
            raise _StageGone(f"node {head[:12]} answered a step without a token")
        return Token(int(reply["token"]), float(reply["logprob"]))

    async def _step(self, m: Model, head: str, body: dict[str, Any]) -> dict[str, Any]:
        m.used_at = time.monotonic()
        try:
            reply = await self.peers.request(head, "pipe.step", body, timeout=self.step_timeout + 5.0)
        except (RemoteError, RequestRefused) as exc:
            if exc.code == "busy":
                raise _Busy(exc.message) from None
            if exc.code == "stage_failed":
                raise _StageGone(f"node {exc.message[:12]} failed") from None
            if exc.code in ("stale_epoch", "not_loaded", "unknown_session", "bad_position", "unloaded",
                            "engine_error", "not_prefilled", "stale_step", "not_a_driver", "not_your_session"):
                raise _StageGone(f"the plan changed under the session ({exc.code}: {exc.message[:120]})") from None
            log.warning("step_refused", model=m.model_id[:12], code=exc.code, error=exc.message[:300])
            raise GenerationError(f"the pipeline refused a step: [{exc.code}] {exc.message}") from None
        except (TransportError, PeerUnknown, OSError, TimeoutError) as exc:
            raise _StageGone(f"node {head[:12]} failed: {type(exc).__name__}") from None
        try:
            return parse_step_reply(reply, vocab_size=m.config.vocab_size,
                                    hidden_size=m.config.hidden_size).to_dict()
        except PipelineMessageError as exc:
            log.warning("bad_step_answer", model=m.model_id[:12], node=head[:12], error=str(exc))
            raise _StageGone(f"node {head[:12]} answered a step wrongly: {exc}") from None


@dataclass
class Generation:
    """One request's stream: ``await start()``, then ``async for piece in pieces()``;
    ``tokens`` collects every token (id, logprob) as it arrives."""

    sessions: Sessions
    model: Model
    request: Request
    tokens: list[Token] = field(default_factory=list)
    _stream: AsyncIterator[Token] | None = None
    _first: Token | None = None

    async def start(self) -> None:
        m, r = self.model, self.request
        self._stream = self.sessions.tokens(m, list(r.prompt), r.sampling, r.max_tokens, m.tokenizer.stop_token_ids,
                                            r.grammar)
        self._first = await anext(self._stream, None)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()  # type: ignore[attr-defined]

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        """The text as tokens arrive; a stop string ends it early (text is held back until it
        cannot be the start of one)."""
        from node.engine.tokenizer import TokenizerError

        assert self._stream is not None, "start() first"
        m, stop = self.model, self.request.stop
        decoder = m.tokenizer.incremental_decoder()
        held, count = "", 0
        hold = max((len(s) for s in stop), default=1) - 1
        try:
            tok = self._first
            while tok is not None:
                count += 1
                self.tokens.append(tok)
                try:
                    held += decoder.push(tok.id)
                except TokenizerError:
                    # A model's vocabulary may be padded past its tokenizer's (Qwen2.5: 151936
                    # rows, 151665 tokens): such an id has no text.
                    decoder = m.tokenizer.incremental_decoder()
                for s in stop:
                    at = held.find(s)
                    if at >= 0:
                        yield Piece(held[:at], count, "stop")
                        return
                cut = max(0, len(held) - hold)
                yield Piece(held[:cut], count, "stop")  # one piece per token, as Ollama streams (text may be "")
                held = held[cut:]
                tok = await anext(self._stream, None)
            held += decoder.flush()
            yield Piece(held, count, "length" if count >= self.request.max_tokens else "stop")
        finally:
            await self.aclose()
