"""One loaded partition on this node and the sessions whose KV caches it holds.

The stage owns the partition's cache (one slot per session, ``engine.max_sessions``
slots), the session table, and a queue of steps waiting to run. One task drains the
queue: all waiting decode steps run as one batch (the engine's decode over a subset
of slots), then one waiting prefill chunk, then the decodes again, so a long prompt
delays the decoding sessions by at most one chunk. Engine calls run in the node's
single engine thread (JAX work never runs on the event loop, and a donated cache must
be used by one call at a time).

The last stage samples: a decode step gives a token (tail_step: decode and sampling in
one compiled call), the final prefill chunk gives the first token (sampled on the host
from the prompt's last logits), a "forced" step (replay after a failure) gives none,
and the final chunk of an "embed" step (queued as a prefill) gives the input's
embedding: the last token's final-norm hidden state, L2-normalized.
A session sent with a grammar samples only what the grammar allows (grammar.py).
A step number is processed once: a repeated step gets the stored answer again.

Each session belongs to the driver whose prefill opened it (its ``owner``, the node id
the worker vouches for): a step or a close naming another driver's session is refused,
a driver holds at most ``owner_cap(driver)`` sessions at once (the others wait as ``busy``),
and a slot is zeroed when a new session takes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.engine import Partition, SamplerState, SamplingParams, sample_batch
from node.pipeline.grammar import Constraint, GrammarError, Grammars
from node.pipeline.stage_errors import StageBusy, StageError
from protocol.pipeline import PROMPT_KINDS, SamplingSpec, Step

__all__ = ["StageBusy", "StageError", "StageResult", "StageRunner"]


@dataclass
class StageResult:
    """hidden [n, H] for the next stage, or (token, logprob) at the tail (None: no token),
    or an embed step's embedding float32 [H] at the tail."""

    hidden: np.ndarray | None = None
    token: int | None = None
    logprob: float | None = None
    embedding: np.ndarray | None = None


@dataclass
class _Session:
    slot: int
    owner: str = ""
    pos: int = 0
    state: SamplerState | None = None
    constraint: Constraint | None = None  # a grammar the tail's tokens follow
    last_step: int = -1
    last_result: StageResult | None = None
    used_at: float = field(default_factory=time.monotonic)


@dataclass
class _Pending:
    step: Step
    owner: str
    future: asyncio.Future[StageResult]


class StageRunner:
    def __init__(self, partition: Partition, *, slots: int, executor: ThreadPoolExecutor,
                 session_idle: float, clock: Callable[[], float] = time.monotonic,
                 owner_cap: Callable[[str], int] | None = None, grammars: Grammars | None = None) -> None:
        self.partition = partition
        self.grammars = grammars
        self.slots = slots
        self.cache = partition.new_cache(slots)
        self.sessions: dict[str, _Session] = {}
        self._free = list(range(slots))
        self._executor = executor
        self._idle = session_idle
        self._clock = clock
        self.owner_cap = owner_cap or (lambda _owner: slots)
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps_run = 0
        self.used_at = clock()

    @property
    def is_first(self) -> bool:
        return self.partition.spec.has_embedding

    @property
    def is_last(self) -> bool:
        return self.partition.spec.has_head

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(StageError("unloaded", "the model was unloaded on this node"))
        self._pending.clear()

    def free(self, session: str, owner: str | None = None) -> bool:
        """Free a session (only its owner's, when ``owner`` is given)."""
        s = self.sessions.get(session)
        if s is None or (owner is not None and s.owner != owner):
            return False
        del self.sessions[session]
        self._free.append(s.slot)
        self._wake.set()  # steps of it still waiting fail now, not at the next submit
        return True

    def sweep(self) -> list[str]:
        """Free sessions without a step for session_idle seconds (a driver that died)."""
        now = self._clock()
        gone = [sid for sid, s in self.sessions.items() if now - s.used_at > self._idle]
        for sid in gone:
            self.free(sid)
        return gone

    def owned_by(self, owner: str) -> int:
        return sum(1 for s in self.sessions.values() if s.owner == owner)

    async def submit(self, step: Step, owner: str = "") -> StageResult:
        self.used_at = self._clock()
        s = self.sessions.get(step.session)
        if s is not None and s.owner != owner:
            raise StageError("not_your_session", "that session belongs to another driver")
        if s is not None and step.step == s.last_step and s.last_result is not None:
            return s.last_result  # a repeat (the sender retried): processed once
        if s is not None and step.step <= s.last_step:
            raise StageError("stale_step", f"step {step.step} of this session already ran")
        if len(self._pending) >= 4 * self.slots:
            raise StageBusy("busy", "too many steps waiting at this stage")
        fut: asyncio.Future[StageResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(step, owner, fut))
        self._wake.set()
        return await fut

    # ------------------------------------------------------------------ the queue

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            decodes = [p for p in self._pending if p.step.kind not in PROMPT_KINDS]
            batch: list[_Pending] = []
            seen: set[str] = set()
            for p in decodes:  # one step per session per batch, at most the pool
                if p.step.session not in seen and len(batch) < self.slots and not self._ahead(p.step):
                    batch.append(p)
                    seen.add(p.step.session)
            for p in list(batch):  # a bad step fails alone, not its whole batch
                problem = self._decode_problem(p)
                if problem is not None:
                    batch.remove(p)
                    self._pending.remove(p)
                    if not p.future.done():
                        p.future.set_exception(problem)
            if batch:
                await self._settle(batch, self._decode)
            prefill = next((p for p in self._pending if p.step.kind in PROMPT_KINDS), None)
            if prefill is not None:
                await self._settle([prefill], self._prefill)
            elif not batch:  # only replayed steps ahead of their session: wait for the one before
                self._wake.clear()
                await self._wake.wait()

    def _ahead(self, step: Step) -> bool:
        """A replayed (forced) step that arrived before the one its session needs next: the
        driver sends a rebuilt session's replay several steps at a time, and a stage runs
        them in order as they come (one per batch, as the undisturbed run's steps ran)."""
        s = self.sessions.get(step.session)
        return step.kind == "forced" and s is not None and step.start > s.pos

    async def _settle(self, items: list[_Pending], fn: Callable[[list[_Pending]], list[StageResult]]) -> None:
        for p in items:
            self._pending.remove(p)
        live = [p for p in items if not p.future.done()]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, fn, live)
        except asyncio.CancelledError:  # the stage was replaced or unloaded mid-call: answer, never hang
            for p in live:
                if not p.future.done():
                    p.future.set_exception(StageError("unloaded", "the stage was replaced while it ran this step"))
            raise
        except StageError as exc:
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        except Exception as exc:  # an engine failure: fail these steps, keep serving
            err = StageError("engine_error", f"the engine failed: {type(exc).__name__}: {exc}")
            for p in live:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        for p, r in zip(live, results, strict=True):
            s = self.sessions.get(p.step.session)
            if s is not None:
                s.last_step, s.last_result, s.used_at = p.step.step, r, self._clock()
            if not p.future.done():
                p.future.set_result(r)
        self.steps_run += 1

    def _decode_problem(self, p: _Pending) -> StageError | None:
        step = p.step
        s = self.sessions.get(step.session)
        if s is None:
            return StageError("unknown_session", "this stage holds no such session (start it with a prefill)")
        if s.owner != p.owner:
            return StageError("not_your_session", "that session belongs to another driver")
        if step.start != s.pos:
            return StageError("bad_position", f"the session holds {s.pos} tokens, the step starts at {step.start}")
        if self.is_last and s.state is None:
            return StageError("not_prefilled", "a decode step arrived before the prompt's last chunk")
        return None

    # ------------------------------------------------------------------ engine calls (engine thread)

    def _session_for(self, p: _Pending) -> _Session:
        step = p.step
        s = self.sessions.get(step.session)
        if s is not None and s.owner != p.owner:
            raise StageError("not_your_session", "that session belongs to another driver")
        if step.kind in PROMPT_KINDS and step.start == 0:
            if s is None:
                if not self._free:
                    raise StageBusy("busy", f"all {self.slots} sessions of this stage are in use")
                cap = self.owner_cap(p.owner)
                if self.owned_by(p.owner) >= cap:
                    raise StageBusy("busy", f"this driver already holds {cap} sessions of this stage "
                                            "(its share while other drivers use it too)")
                slot = self._free.pop(0)
                try:
                    self.cache = self.partition.clear_slot(self.cache, slot)
                except BaseException:
                    self._free.insert(0, slot)
                    raise
                s = _Session(slot, p.owner)
                self.sessions[step.session] = s
            s.pos, s.state, s.constraint, s.last_step = 0, None, None, -1
        if s is None:
            raise StageError("unknown_session", "this stage holds no such session (start it with a prefill)")
        if step.start != s.pos:
            raise StageError("bad_position", f"the session holds {s.pos} tokens, the step starts at {step.start}")
        return s

    def _prefill(self, items: list[_Pending]) -> list[StageResult]:
        (p,) = items
        step = p.step
        s = self._session_for(p)
        embed = step.kind == "embed" and step.last and self.is_last
        self.cache, out = self.partition.prefill(self.cache, step.inputs, start_pos=step.start, slot=s.slot,
                                                 embed=embed)
        s.pos += int(step.inputs.shape[0])
        if not self.is_last:
            return [StageResult(hidden=np.asarray(out))]
        if embed:
            return [StageResult(embedding=np.asarray(out, np.float32))]
        if not step.last or step.kind == "embed":
            return [StageResult()]
        s.state = self._state(step)
        s.constraint = self._constraint(step)
        if step.resume_step:
            return [StageResult()]  # rebuilt after a failure: the driver knows the next token
        if s.constraint is not None:
            s.state.allowed = s.constraint.mask()
        tokens, logprobs = sample_batch(out[None], [s.state])
        if s.constraint is not None:
            s.constraint.consume(int(tokens[0]))
        return [StageResult(token=int(tokens[0]), logprob=float(logprobs[0]))]

    def _constraint(self, step: Step) -> Constraint | None:
        if step.grammar is None:
            return None
        if self.grammars is None:
            raise StageError("bad_grammar", "this stage cannot follow a grammar (it has no tokenizer)")
        try:
            return self.grammars.start(step.grammar, step.stops, () if step.emitted is None else step.emitted.tolist())
        except GrammarError as exc:
            raise StageError("bad_grammar", str(exc)) from None

    def _state(self, step: Step) -> SamplerState:
        spec = step.sampling or SamplingSpec()
        params = SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                                min_p=spec.min_p, repetition_penalty=spec.repetition_penalty, seed=spec.seed)
        state = SamplerState(params, self.partition.config.vocab_size, seed=spec.seed, step=step.resume_step)
        if step.seen is not None:
            state.observe(step.seen.tolist())
        return state

    def _decode(self, items: list[_Pending]) -> list[StageResult]:
        steps = [p.step for p in items]
        sessions = [self._session_for(p) for p in items]
        slots = [s.slot for s in sessions]
        positions = [st.start for st in steps]
        if self.is_first:
            inputs: Any = np.concatenate([st.inputs for st in steps])
        else:
            inputs = np.concatenate([st.inputs for st in steps], axis=0)
        results: list[StageResult]
        if not self.is_last:
            self.cache, out = self.partition.decode(self.cache, inputs, slots, positions)
            hidden = np.asarray(out)
            results = [StageResult(hidden=hidden[i : i + 1]) for i in range(len(steps))]
        else:
            results = self._tail(steps, sessions, inputs, slots, positions)
        for s in sessions:
            s.pos += 1
        return results

    def _tail(self, steps: list[Step], sessions: list[_Session], inputs: Any, slots: list[int],
              positions: list[int]) -> list[StageResult]:
        forced = [st.kind == "forced" for st in steps]
        results = [StageResult() for _ in steps]
        if all(forced):
            self.cache, _ = self.partition.decode(self.cache, inputs, slots, positions)
            return results
        # Forced rows ride along with their position set to -1 would skip their cache
        # write; run them in their own call instead.
        if any(forced):
            keep = [i for i, f in enumerate(forced) if f]
            self.cache, _ = self.partition.decode(
                self.cache, inputs[keep], [slots[i] for i in keep], [positions[i] for i in keep])
        idx = [i for i, f in enumerate(forced) if not f]
        for i in idx:  # a grammar's mask for this token (the constraint takes the token below)
            c, state = sessions[i].constraint, sessions[i].state
            if c is not None and state is not None:
                state.allowed = c.mask()
        self.cache, out = self.partition.tail_step(
            self.cache, inputs[idx], [slots[i] for i in idx], [positions[i] for i in idx],
            [sessions[i].state for i in idx])
        for j, i in enumerate(idx):
            results[i] = StageResult(token=int(out.tokens[j]), logprob=float(out.logprobs[j]))
            c = sessions[i].constraint
            if c is not None:
                c.consume(int(out.tokens[j]))
        return results
