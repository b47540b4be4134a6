"""Sessions driven from this node: plan and load a model, run a generation, recover.

The node that receives a request drives it. ``load`` plans the model over the ready
members (planner.py), publishes the plan under ``plan/<model id>`` (signed, with an
epoch: a newer one replaces an older one), and asks every stage to load its range
(worker.py). ``generate`` tokenizes nothing (the API does): it prefills the prompt in
chunks through the chain, then sends one decode step per token; the tail's answer is
the next token, streamed to the caller as it arrives.

Recovery: when a step fails because a node is gone (connection refused or closed, a
step timeout, or a stage answering ``stage_failed`` with the next node's id), the
driver re-plans without that node (a new epoch), the new owners fetch what they lack
and load, and the session is rebuilt teacher-forced: the prompt is prefilled again,
the tokens already emitted are replayed as ``forced`` steps (nothing is re-sampled),
the sampler resumes at the same step with the same seed, and generation continues.
The client's stream pauses and goes on; with greedy sampling or a fixed seed the
output equals the undisturbed run's (the engine's replay conditions).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from node.cluster.peers import Peers, PeerUnknown
from node.engine.buckets import chunk_spans
from node.net.errors import RemoteError, RequestRefused, TransportError
from node.pipeline.cost import model_cost
from node.pipeline.planner import ModelCost, NodeOffer, Plan, PlanError, make_plan
from node.pipeline.worker import StageWorker, config_of
from node.store.pieces import StoreError
from node.swarm.layers import pieces_for_layers
from node.swarm.service import ModelService, PullError
from protocol.pipeline import SamplingSpec

if TYPE_CHECKING:
    from node.engine.tokenizer import Tokenizer

__all__ = ["Driver", "DriverError", "GenerationError", "ModelNotFound", "QueueFull", "Token"]

log = structlog.get_logger("node.pipeline")

PLAN_PREFIX = "plan/"
MAX_RECOVERIES = 3
LOAD_TIMEOUT = 1800.0


class DriverError(Exception):
    """A request the driver cannot serve; the text is for the user."""


class ModelNotFound(DriverError):
    pass


class QueueFull(DriverError):
    pass


class GenerationError(DriverError):
    pass


class _StageGone(Exception):
    def __init__(self, node_id: str | None, why: str) -> None:
        super().__init__(why)
        self.node_id = node_id


@dataclass
class Token:
    id: int
    logprob: float


@dataclass
class Model:
    model_id: str
    name: str
    plan: Plan
    epoch: int
    config: Any
    tokenizer: Tokenizer
    max_context: int
    slots: int
    dtype: str
    load_s: float
    weights: str = "native"
    failed: set[str] = field(default_factory=set)
    used_at: float = field(default_factory=time.monotonic)
    expires_at: float = 0.0
    keep_alive: float | None = None  # seconds idle before unloading (inf: never); None: engine.keep_alive
    sessions: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gate: asyncio.Semaphore = field(init=False)  # one permit per session slot
    waiting: int = 0
    recoveries: int = 0
    cost: ModelCost | None = None

    def __post_init__(self) -> None:
        self.gate = asyncio.Semaphore(self.slots)


class Driver:
    def __init__(self, node_id: str, service: ModelService, peers: Peers, worker: StageWorker, *,
                 members: Callable[[], Any], engine: Any, data_dir: Path, record_ttl: float) -> None:
        self.node_id = node_id
        self.service = service
        self.peers = peers
        self.worker = worker
        self.members = members
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.record_ttl = record_ttl
        self.models: dict[str, Model] = {}
        self._loading: dict[str, asyncio.Task[Model]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ load

    async def resolve(self, name: str) -> str:
        model_id = self.service.store.resolve(name)
        if model_id is None:
            with contextlib.suppress(Exception):
                model_id = await self.service.resolve_in_cluster(name)
        if model_id is None:
            raise ModelNotFound(f"model {name!r} not found; pull it first (nodectl pull)")
        return model_id

    async def model(self, name: str, *, progress: Callable[[dict[str, Any]], None] | None = None,
                    weights: str | None = None, keep_alive: float | None = None) -> Model:
        """The loaded model, loading it (plan, fetch, compile on every stage) if needed.
        ``weights`` ("native" | "int8", default engine.weights): a model loaded otherwise is
        unloaded and loaded again that way. ``keep_alive`` (seconds, inf: forever) replaces
        the model's idle time before it unloads, as Ollama's per-request keep_alive does."""
        model_id = await self.resolve(name)
        m = self.models.get(model_id)
        if m is not None and weights is not None and m.weights != weights and not m.sessions:
            await self.unload(model_id)
            m = None
        if m is not None:
            if keep_alive is not None:
                m.keep_alive = keep_alive
            return m
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.ensure_future(self._load(model_id, name, progress or (lambda _: None),
                                                    weights or self.engine.weights, keep_alive))
            self._loading[model_id] = task
            task.add_done_callback(lambda _t: self._loading.pop(model_id, None))
        return await asyncio.shield(task)

    async def _offers(self, exclude: set[str], model_id: str = "") -> list[NodeOffer]:
        """The ready members, each offering what it lends less what its other models' layers
        hold (a second model is planned around the first, not onto a full node)."""
        records = await self.members()

        def held(r: dict[str, Any]) -> int:
            return sum(int(e.get("memory", 0)) for e in r.get("serving") or [] if e.get("model") != model_id)

        return [NodeOffer(pid, str(r.get("name", pid[:12])), max(0, int(r.get("memory_allowed", 0)) - held(r)),
                          float(r.get("tflops", 0.0)), dict(r.get("rtt_ms") or {}))
                for pid, r in records.items() if r.get("state") == "ready" and pid not in exclude]

    async def _load(self, model_id: str, name: str, progress: Callable[[dict[str, Any]], None],
                    weights: str = "native", keep_alive: float | None = None) -> Model:
        t0 = time.monotonic()
        try:
            manifest = await self.service.manifest(model_id)
            small = pieces_for_layers(manifest, 0, 0, has_embedding=False, has_head=False)
            await self.service.ensure(manifest, small)
        except (PullError, StoreError) as exc:
            raise DriverError(f"cannot read model {name!r}: {exc}") from None
        config = config_of(self.service.store, manifest)
        tok_dir = self.data_dir / "tokenizers" / model_id
        tok_dir.mkdir(parents=True, exist_ok=True)
        for f in manifest.files:
            if f.data_start is None and f.size <= 64 * 2**20:
                (tok_dir / Path(f.path).name).write_bytes(self.service.store.read_range(manifest, f.path, 0, f.size))
        from node.engine.tokenizer import Tokenizer

        tokenizer = await asyncio.to_thread(Tokenizer.from_model_dir, tok_dir)
        eng = self.engine
        context = min(eng.max_context, config.max_position_embeddings or eng.max_context)
        dtype = "float32" if eng.compute_dtype in ("auto", "float32") else eng.compute_dtype
        m = Model(model_id, name, Plan(()), 0, config, tokenizer, context, eng.max_sessions, dtype, 0.0,
                  weights=weights, keep_alive=keep_alive)
        if not await self._adopt(m, progress):
            await self._place(m, progress)
        m.load_s = time.monotonic() - t0
        self.models[model_id] = m
        m.used_at = time.monotonic()
        return m

    async def _place(self, m: Model, progress: Callable[[dict[str, Any]], None]) -> None:
        """Plan over the ready members without the failed ones, publish, load every stage."""
        eng = self.engine
        if m.cost is None:  # each exact figure compiles: once per model, not per re-plan
            m.cost = await model_cost(self.worker.executor, m.config, m.dtype, m.max_context, m.slots,
                                      eng.prefill_chunk, weights=m.weights)
        cost = m.cost
        offers = await self._offers(m.failed, m.model_id)
        try:
            plan = make_plan(cost, offers, max_rtt_ms=eng.max_rtt_ms)
        except PlanError as exc:
            raise DriverError(str(exc)) from None
        epoch = max(m.epoch + 1, time.time_ns() // 1_000_000)
        names = {o.node_id: o.name for o in offers}
        progress({"status": "planned", "epoch": epoch,
                  "stages": [{"node": names.get(s.node_id, s.node_id[:12]), "node_id": s.node_id,
                              "layers": [s.start, s.end]} for s in plan.stages]})
        body = {"model": m.model_id, "name": m.name, "epoch": epoch, "plan": plan.to_dict(), "max_context": m.max_context,
                "slots": m.slots, "dtype": m.dtype, "weights": m.weights, "prefill_chunk": eng.prefill_chunk,
                "keep_alive": self._stage_keep_alive(m), "step_timeout": eng.step_timeout}

        async def load_stage(i: int) -> dict[str, Any]:
            node = plan.stages[i].node_id
            try:
                reply = await self.peers.request(node, "pipe.load", {**body, "index": i}, timeout=LOAD_TIMEOUT)
            except (RemoteError, RequestRefused) as exc:
                raise DriverError(f"node {names.get(node, node[:12])} could not load layers "
                                  f"{plan.stages[i].start}-{plan.stages[i].end}: {exc.message}") from None
            except (TransportError, PeerUnknown, OSError) as exc:
                m.failed.add(node)
                raise DriverError(f"node {names.get(node, node[:12])} is unreachable: {exc}") from None
            progress({"status": "ready", "node": names.get(node, node[:12]), "node_id": node,
                      "layers": [plan.stages[i].start, plan.stages[i].end],
                      "load_s": reply.get("load_s"), "compile_s": reply.get("compile_s")})
            return dict(reply)

        await asyncio.gather(*(load_stage(i) for i in range(len(plan.stages))))
        m.plan, m.epoch = plan, epoch
        with contextlib.suppress(Exception):
            await self.service.dht.put(PLAN_PREFIX + m.model_id, {
                "name": m.name, "epoch": epoch, "plan": plan.to_dict(), "driver": self.node_id,
                "weights": m.weights,
            }, ttl=self.record_ttl)

    async def _adopt(self, m: Model, progress: Callable[[dict[str, Any]], None]) -> bool:
        """Use the newest published plan of the model if every stage of it is ready (another
        node loaded it): one plan for every driver, not one each."""
        try:
            records = await self.service.dht.get(PLAN_PREFIX + m.model_id)
        except Exception:
            return False
        best: tuple[int, Plan] | None = None
        for record in records.values():
            value = record.value
            if not isinstance(value, dict) or not isinstance(value.get("epoch"), int):
                continue
            try:
                plan = Plan.from_dict(value.get("plan"))
            except PlanError:
                continue
            if value.get("weights", "native") != m.weights:
                continue
            if plan.stages[-1].end == m.config.num_layers and value["epoch"] > m.epoch and (
                    best is None or value["epoch"] > best[0]):
                best = (value["epoch"], plan)
        if best is None:
            return False
        epoch, plan = best

        async def ready(node: str) -> bool:
            try:
                state = await self.peers.request(node, "pipe.state", {}, timeout=10.0)
            except Exception:
                return False
            return any(isinstance(x, dict) and x.get("model") == m.model_id and x.get("epoch") == epoch
                       and x.get("state") == "ready" for x in (state or {}).get("models", []))

        if not all(await asyncio.gather(*(ready(s.node_id) for s in plan.stages))):
            return False
        m.plan, m.epoch = plan, epoch
        progress({"status": "adopted", "epoch": epoch,
                  "stages": [{"node_id": s.node_id, "layers": [s.start, s.end]} for s in plan.stages]})
        return True

    async def unload(self, name: str) -> bool:
        model_id = await self.resolve(name)
        m = self.models.pop(model_id, None)
        if m is None:
            return False
        await asyncio.gather(*(self._quiet(s.node_id, "pipe.unload", {"model": model_id}) for s in m.plan.stages))
        with contextlib.suppress(Exception):
            await self.service.dht.delete(PLAN_PREFIX + model_id)
        return True

    async def _quiet(self, node: str, method: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self.peers.request(node, method, body, timeout=10.0)

    def keep_alive_of(self, m: Model) -> float:
        return self.engine.keep_alive if m.keep_alive is None else m.keep_alive

    def _stage_keep_alive(self, m: Model) -> float:
        """A stage outlives the driver's own idle timer (the driver unloads it first, when it
        can); a model kept forever keeps its stages ~30 years."""
        return min(1e9, max(self.engine.keep_alive, self.keep_alive_of(m)))

    async def expire_idle(self) -> None:
        now = time.monotonic()
        for m in list(self.models.values()):
            if not m.sessions and now - m.used_at > self.keep_alive_of(m):
                log.info("model_unloaded_idle", model=m.name)
                await self.unload(m.model_id)

    # ------------------------------------------------------------------ generation

    async def generate(self, m: Model, prompt: list[int], sampling: SamplingSpec, max_tokens: int,
                       stop_ids: frozenset[int]) -> AsyncIterator[Token]:
        """Stream the tokens after `prompt` (stop tokens are not yielded)."""
        if len(prompt) + 1 > m.max_context:
            raise DriverError(f"the prompt has {len(prompt)} tokens; the context holds {m.max_context}")
        if m.waiting >= self.engine.queue and m.gate.locked():
            raise QueueFull(f"{m.slots} sessions are running and {m.waiting} requests are waiting; try again later")
        m.waiting += 1
        try:
            await m.gate.acquire()
        finally:
            m.waiting -= 1
        session = ""
        emitted: list[int] = []
        try:
            max_tokens = min(max_tokens, m.max_context - len(prompt))
            while len(emitted) < max_tokens:
                session = secrets.token_hex(8)
                m.sessions.add(session)
                epoch = m.epoch
                try:
                    async for tok in self._run(m, session, prompt, sampling, max_tokens, stop_ids, emitted):
                        yield tok
                    return
                except _StageGone as gone:
                    m.sessions.discard(session)
                    self._close(m, session)
                    await self._recover(m, epoch, gone)
        finally:
            m.sessions.discard(session)
            if session:
                self._close(m, session)
            m.used_at = time.monotonic()
            m.gate.release()

    async def _recover(self, m: Model, epoch: int, gone: _StageGone) -> None:
        async with m.lock:
            if m.epoch != epoch:
                return  # another session already re-planned
            m.recoveries += 1
            if m.recoveries > MAX_RECOVERIES * max(1, len(m.plan.stages)):
                raise GenerationError(f"the model's nodes keep failing ({gone}); giving up")
            if gone.node_id is None and await self._adopt(m, lambda _e: None):
                log.info("adopted_newer_plan", model=m.name, epoch=m.epoch)
                return  # another driver re-planned already
            if gone.node_id is not None:
                m.failed.add(gone.node_id)
            log.warning("stage_failed_replanning", model=m.name, node=(gone.node_id or "?")[:12], why=str(gone))
            t0 = time.monotonic()
            for attempt in range(3):  # the directory and the holders' records lag a death
                try:
                    await self._place(m, lambda _e: None)
                    break
                except DriverError as exc:
                    log.warning("replan_failed", model=m.name, attempt=attempt + 1, error=str(exc))
                    if attempt == 2:
                        raise GenerationError(
                            f"a node failed ({gone}) and the model cannot be re-planned: {exc}") from None
                    await asyncio.sleep(1.0 + attempt)
            log.info("replanned", model=m.name, epoch=m.epoch, nodes=len(m.plan.stages),
                     seconds=round(time.monotonic() - t0, 2))

    def _close(self, m: Model, session: str) -> None:
        for s in m.plan.stages:
            task = asyncio.ensure_future(self._quiet(s.node_id, "pipe.close", {"model": m.model_id, "session": session}))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, m: Model, session: str, prompt: list[int], sampling: SamplingSpec, max_tokens: int,
                   stop_ids: frozenset[int], emitted: list[int]) -> AsyncIterator[Token]:
        """One attempt on the current plan; `emitted` holds what the client already has
        (replayed, not re-sampled) and grows as tokens are yielded."""
        step = 0
        resume = len(emitted)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = np.asarray(prompt + emitted, np.int64)
        head = m.plan.stages[0].node_id
        base = {"model": m.model_id, "epoch": m.epoch, "session": session, "timeout": self.engine.step_timeout}
        spans = chunk_spans(0, len(prompt), self.engine.prefill_chunk)
        reply: dict[str, Any] = {}
        for a, b in spans:
            body = {**base, "step": step, "kind": "prefill", "start": a,
                    "inputs": np.asarray(prompt[a:b], np.int64), "last": b == len(prompt)}
            if b == len(prompt):
                body["sampling"] = sampling.to_dict()
                if resume:
                    body["resume_step"] = resume
                if seen is not None:
                    body["seen"] = seen
            reply = await self._step(m, head, body)
            step += 1
        pos = len(prompt)
        for token in emitted[:-1]:  # replay: teacher-forced, nothing sampled
            await self._step(m, head, {**base, "step": step, "kind": "forced", "start": pos,
                                       "inputs": np.asarray([token], np.int64)})
            step, pos = step + 1, pos + 1
        if resume:
            next_input = emitted[-1]
        else:
            tok = Token(int(reply["token"]), float(reply["logprob"]))
            if tok.id in stop_ids:
                return
            emitted.append(tok.id)
            yield tok
            next_input = tok.id
        while len(emitted) < max_tokens:
            reply = await self._step(m, head, {**base, "step": step, "kind": "decode", "start": pos,
                                               "inputs": np.asarray([next_input], np.int64)})
            step, pos = step + 1, pos + 1
            tok = Token(int(reply["token"]), float(reply["logprob"]))
            if tok.id in stop_ids:
                return
            emitted.append(tok.id)
            yield tok
            next_input = tok.id

    async def _step(self, m: Model, head: str, body: dict[str, Any]) -> dict[str, Any]:
        m.used_at = time.monotonic()
        try:
            reply = await self.peers.request(head, "pipe.step", body, timeout=self.engine.step_timeout + 5.0)
        except (RemoteError, RequestRefused) as exc:
            if exc.code == "stage_failed":
                raise _StageGone(exc.message if len(exc.message) == 64 else None, f"node {exc.message[:12]} failed") from None
            if exc.code in ("stale_epoch", "not_loaded", "unknown_session"):
                raise _StageGone(None, f"the plan changed under the session ({exc.code})") from None
            raise GenerationError(f"the pipeline refused a step: [{exc.code}] {exc.message}") from None
        except (TransportError, PeerUnknown, OSError, TimeoutError) as exc:
            raise _StageGone(head, f"node {head[:12]} failed: {type(exc).__name__}") from None
        if not isinstance(reply, dict):
            raise GenerationError("the pipeline answered a step with something that is not a map")
        return reply
