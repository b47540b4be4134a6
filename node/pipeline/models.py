"""The models this node drives: find the cluster's plan of a model or make one, load it, keep it.

Any node is a door: the one a request reaches drives it. For a model it does not hold yet
it reads the published plans (plans.py): it adopts the newest one whose stages all answer
"ready" (leasing each), waits while they are still loading, and plans only when none is
published or a stage of it is really gone. A plan is published *before* its stages load,
so a second entry node waits for it instead of planning its own; two drivers that plan at
once are ordered by epoch, and the loser adopts the winner's plan.

Leases keep stages loaded: every ``LEASE_TTL / 3`` seconds the driver renews its lease on
each stage of each model it holds, and lets go (``pipe.release``) when the model's
keep_alive runs out; a stage unloads when no driver holds it and no session is live on it.
A renewal that finds the plan changed or gone marks the model stale, and the next request
finds the plan again.

Recovery (``recover``): after a step failed, the stages of the plan are probed. If all
answer ready the failure was passing (a busy machine, a timeout) and the session is just
retried; if some are gone, they are marked failed (marks expire: failures.py) and the
plan is repaired around them: the survivors are pinned to their ranges (they keep their
weights and compiled steps) and only the missing ranges go to other nodes. When the marks
leave no plan, planning is tried again with the marked nodes, and without the pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from node.cluster.peers import Peers, PeerUnknown
from node.cluster.speed import Speeds, probe_members
from node.net.errors import RemoteError, RequestRefused, TransportError
from node.pipeline import trust
from node.pipeline.builder import config_of
from node.pipeline.cost import cost_from_lines, model_cost
from node.pipeline.failures import FailureMarks
from node.pipeline.finder import LEASE_TTL, PlanFinder
from node.pipeline.planner import ModelCost, Pin, PlanError, make_plan
from node.pipeline.plans import new_epoch, publish_plan, read_plans, withdraw_plan
from node.pipeline.verdict import Verdict, judge
from node.store.pieces import StoreError
from node.swarm.layers import pieces_for_layers
from node.swarm.service import ModelService, ModelUnknown, PullError
from protocol.plan import (
    LoadRequest,
    Plan,
    PlanRecord,
    StageView,
    parse_stage_view,
)

if TYPE_CHECKING:
    from node.config_schema import EngineSection
    from node.engine.tokenizer import Tokenizer

__all__ = ["LEASE_TTL", "DriverError", "GenerationError", "LoadedModels", "Model", "ModelNotFound", "QueueFull"]

log = structlog.get_logger("node.pipeline")
# Pauses (s) before each read of the cluster's name records while a name is unknown here.
NAME_RETRIES = (0.0, 0.5, 1.0)

LOAD_TIMEOUT = 1800.0
RECOVERY_TIMEOUT = 300.0
PENDING_GRACE = 10.0  # a stage that has not heard of a published plan yet is waited for this long
PLAN_TTL = 600.0  # a plan record's lifetime (republished every third of it while the plan is held)
FIT_WAIT = 60.0  # how long a re-plan that fits nowhere is tried again before the request fails
MAX_PLACEMENTS = 4  # plans tried in a row when planned nodes turn out unreachable
PROBE_TIMEOUT = 10.0  # a speed probe's answer (2 GFLOP and 4 MiB) may take this long
FOREVER = 1e10  # keep_alive -1: a date centuries ahead

Progress = Callable[[dict[str, Any]], None]
Members = Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]


class DriverError(Exception):
    """A request the driver cannot serve; the text is for the user."""


class ModelNotFound(DriverError):
    pass


class QueueFull(DriverError):
    pass


class GenerationError(DriverError):
    pass


class _Overtaken(Exception):
    """A stage serves a newer plan than the one being loaded: find the plan again."""


class _Unreachable(Exception):
    pass


class _NoFit(DriverError):
    """No plan fits the nodes the directory lists right now (it may in a moment: a node
    that was busy republishes its record, a spare finishes starting)."""


@dataclass
class Model:
    model_id: str
    name: str
    config: Any
    tokenizer: Tokenizer
    max_context: int
    slots: int
    dtype: str
    prefill_chunk: int
    weights: str = "native"
    kv_dtype: str | None = None  # the KV cache's dtype (engine.kv_dtype resolved); None: dtype
    plan: Plan = field(default_factory=lambda: Plan(()))
    epoch: int = 0
    record: PlanRecord | None = None
    load_s: float = 0.0
    failed: FailureMarks = field(default_factory=FailureMarks)
    used_at: float = field(default_factory=time.monotonic)
    keep_alive: float | None = None  # seconds idle before letting go (inf: never); None: engine.keep_alive
    sessions: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gate: asyncio.Semaphore = field(init=False)  # one permit per session slot
    waiting: int = 0
    cost: ModelCost | None = None
    status: str = ""  # what is happening to it right now (loading, recovering), for ps and the CLI
    stale: bool = False  # a lease renewal found the plan changed: find it again before the next request
    published_at: float = -math.inf

    def __post_init__(self) -> None:
        self.gate = asyncio.Semaphore(self.slots)

    def adopt_shape(self, record: PlanRecord) -> None:
        """Take the shape every stage of ``record`` was loaded with (before any session)."""
        if record.slots != self.slots and not self.sessions:
            self.slots = record.slots
            self.gate = asyncio.Semaphore(record.slots)
        self.max_context, self.dtype, self.prefill_chunk = record.max_context, record.dtype, record.prefill_chunk
        self.kv_dtype = record.kv_dtype or record.dtype

    def use(self, record: PlanRecord) -> None:
        self.record, self.plan, self.epoch, self.stale = record, record.plan, record.epoch, False


class LoadedModels:
    def __init__(self, node_id: str, service: ModelService, peers: Peers, *, members: Members,
                 engine: EngineSection, data_dir: Path, record_ttl: float, allow: tuple[str, ...] = (),
                 deny: tuple[str, ...] = ()) -> None:
        self.node_id = node_id
        self.allow, self.deny = allow, deny  # cluster.allow / cluster.deny: who may serve (trust.py)
        self.speeds = Speeds()  # the members' speeds as this driver's probes measured them
        self.service = service
        self.peers = peers
        self.members = members
        # Memory figures compile (XLA's memory analysis): on their own thread, never in the
        # way of this node's stages on the engine thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan")
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.record_ttl = record_ttl
        self.finder = PlanFinder(service.dht, peers, members)
        self.table: dict[str, Model] = {}
        self._opening: dict[str, asyncio.Task[Model]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ finding a model

    async def resolve(self, name: str) -> str:
        model_id = self.service.store.resolve(name)
        # The cluster's name records, asked again after a pause when nothing answers: on a
        # lossy link one DHT read can lose every answer (the netns chaos trial got a 404 for
        # a model the cluster was serving).
        for pause in NAME_RETRIES:
            if model_id is not None:
                break
            await asyncio.sleep(pause)
            try:
                model_id = await self.service.resolve_in_cluster(name)
            except ModelUnknown as exc:  # a name two models claim: say so
                raise ModelNotFound(str(exc)) from None
            except Exception as exc:
                log.info("name_lookup_failed", name=name[:128], error=f"{type(exc).__name__}: {exc}")
        if model_id is None:
            raise ModelNotFound(f"model {name!r} not found; pull it first (nodectl pull)")
        return model_id

    def keep_alive_of(self, m: Model) -> float:
        return self.engine.keep_alive if m.keep_alive is None else m.keep_alive

    async def get(self, name: str, *, progress: Progress | None = None, weights: str | None = None,
                  keep_alive: float | None = None, pins: tuple[Pin, ...] = ()) -> Model:
        """The model, ready to serve: held here already, adopted from the cluster's plan, or
        planned and loaded. ``weights`` ("native" | "int8", default engine.weights): a model
        held otherwise is stopped and loaded again that way. ``keep_alive`` (seconds, inf:
        forever) replaces the model's idle time, as Ollama's per-request keep_alive does."""
        model_id = await self.resolve(name)
        report = progress or (lambda _e: None)
        m = self.table.get(model_id)
        if m is not None and ((weights is not None and m.weights != weights) or pins) and not m.sessions:
            await self.stop(model_id)
            m = None
        if m is not None:
            if keep_alive is not None and keep_alive != m.keep_alive:
                m.keep_alive = keep_alive
                m.used_at = time.monotonic()
                if m.record is not None:  # the stages publish the latest keep_alive: tell them now
                    self._spawn(self._probe(m.record, m))
            if m.stale:
                async with m.lock:
                    if m.stale:
                        await self._establish(m, report, deadline=time.monotonic() + LOAD_TIMEOUT,
                                              fit_wait=FIT_WAIT)
            m.used_at = time.monotonic()
            return m
        task = self._opening.get(model_id)
        if task is None:
            task = asyncio.ensure_future(self._open(model_id, name, report, weights or self.engine.weights,
                                                    keep_alive, pins))
            self._opening[model_id] = task
            task.add_done_callback(lambda _t: self._opening.pop(model_id, None))
        return await asyncio.shield(task)

    async def _open(self, model_id: str, name: str, progress: Progress, weights: str,
                    keep_alive: float | None, pins: tuple[Pin, ...]) -> Model:
        t0 = time.monotonic()
        try:
            manifest = await self.service.manifest(model_id, progress=progress)
            small = pieces_for_layers(manifest, 0, 0, has_embedding=False, has_head=False)
            await self.service.ensure(manifest, small)
        except (PullError, StoreError) as exc:
            log.warning("model_unreadable", model=model_id[:12], name=name, error=str(exc))
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
        from node.engine.config import resolve_kv_dtype

        m = Model(model_id, name, config, tokenizer, context, eng.max_sessions, dtype, eng.prefill_chunk,
                  weights=weights, kv_dtype=resolve_kv_dtype(eng.kv_dtype, dtype), keep_alive=keep_alive)
        await self._establish(m, progress, deadline=time.monotonic() + LOAD_TIMEOUT, pins=pins)
        m.load_s = time.monotonic() - t0
        m.used_at = time.monotonic()
        self.table[model_id] = m
        return m

    async def _cost(self, m: Model) -> ModelCost:
        """What layer ranges of ``m`` cost in memory: from the adopted plan's record when it
        carries the line (no compiling), else computed (seconds: XLA's memory analysis)."""
        if m.cost is None and m.record is not None and m.record.cost:
            with contextlib.suppress(ValueError):
                m.cost = cost_from_lines(m.config.num_layers, m.record.cost)
        if m.cost is None:
            m.cost = await model_cost(self.executor, m.config, m.dtype, m.max_context, m.slots, m.prefill_chunk,
                                      weights=m.weights, kv_dtype=m.kv_dtype or m.dtype)
        return m.cost

    # ------------------------------------------------------------------ one plan for all

    async def _establish(self, m: Model, progress: Progress, *, deadline: float, pins: tuple[Pin, ...] = (),
                         current: PlanRecord | None = None, fit_wait: float = 0.0) -> None:
        """Make ``m`` use a plan whose every stage is ready: the newest published one (or
        ``current``), waiting while it loads, repaired around the stages that are gone, or a
        new one when there is none. ``fit_wait``: how long a plan that fits nowhere is tried
        again (a recovery waits for the directory to settle; a first load says so at once)."""
        placements = 0
        first_seen_none: dict[str, float] = {}
        said = ""
        no_fit_since: float | None = None
        began = current.epoch if current is not None else None
        while True:
            if time.monotonic() > deadline:
                raise DriverError(f"model {m.name!r} did not become ready in time ({m.status or 'waiting'})")
            record = None if pins else await self._newest(m, current)
            if record is None:
                survivors: tuple[Pin, ...] = pins
            else:
                views = await self._probe(record, m)
                barred = await self._barred(record)
                if barred:  # a stage this operator does not let serve: re-planned without it
                    views = [None if s.node_id in barred else view for s, view in zip(record.plan.stages, views,
                                                                                        strict=True)]
                v = self._verdict(m, record, views, first_seen_none)
                verdict, survivors = v.kind, v.keep
                if verdict == "newer":  # its record may not have reached the DHT yet: ask its stages
                    newer = await self.finder.plan_of(v.newer, record.model_id)
                    if newer is not None and newer.epoch > record.epoch:
                        current = newer
                        continue
                    verdict = "wait"
                if verdict == "ready":
                    m.adopt_shape(record)
                    m.use(record)
                    m.status = ""
                    await self._publish(m)
                    if record.epoch != began:
                        log.info("plan_adopted", model=m.model_id[:12], name=m.name, epoch=record.epoch,
                                 stages=len(record.plan.stages))
                        progress({"status": "adopted", "epoch": record.epoch, "stages": await self._stage_list(
                            record.plan)})
                    return
                if verdict == "wait":
                    if m.status != said:
                        said = m.status
                        progress({"status": "waiting", "detail": m.status, "epoch": record.epoch})
                    await asyncio.sleep(0.5)
                    continue
                m.adopt_shape(record)
            placements += 1
            try:
                await self._place(m, progress, survivors, floor=record.epoch if record else 0)
                return
            except _Overtaken:
                pins = ()
                continue
            except _Unreachable as exc:
                if placements >= MAX_PLACEMENTS:
                    raise DriverError(f"model {m.name!r} could not be loaded: {exc}") from None
                pins = ()
                await asyncio.sleep(0.5 * placements)
            except _NoFit as exc:
                now = time.monotonic()
                no_fit_since = no_fit_since or now
                if now - no_fit_since >= fit_wait or now + 1.0 > deadline:
                    log.warning("plan_failed", model=m.model_id[:12], name=m.name, error=str(exc),
                                waited_s=round(now - no_fit_since, 1))
                    raise
                placements -= 1
                m.status = f"waiting for room: {exc}"
                if said != m.status:
                    said = m.status
                    progress({"status": "waiting", "detail": m.status})
                await asyncio.sleep(1.0)

    async def _barred(self, record: PlanRecord) -> set[str]:
        """The stages of ``record`` on nodes cluster.allow / cluster.deny keep from serving."""
        if not self.allow and not self.deny:
            return set()
        records = await self.members()
        out = set()
        for s in record.plan.stages:
            name = str(records.get(s.node_id, {}).get("name", s.node_id[:12]))
            if not trust.may_serve(s.node_id, name, self.allow, self.deny):
                out.add(s.node_id)
        if out:
            log.info("plan_stage_barred", model=record.model_id[:12], epoch=record.epoch, nodes=[n[:12] for n in out])
        return out

    async def _newest(self, m: Model, current: PlanRecord | None) -> PlanRecord | None:
        return await self.finder.newest(m.model_id, weights=m.weights, layers=m.config.num_layers, current=current)

    def until(self, m: Model) -> float:
        """The unix time ``m``'s keep_alive here runs out (stages publish the latest of these)."""
        left = m.used_at + min(FOREVER, self.keep_alive_of(m)) - time.monotonic()
        return min(FOREVER, time.time() + max(0.0, left))

    async def _probe(self, record: PlanRecord, m: Model | None = None) -> list[StageView | None]:
        return await self.finder.probe(record, self.until(m) if m is not None else None)

    def _verdict(self, m: Model, record: PlanRecord, views: list[StageView | None],
                 first_seen_none: dict[str, float]) -> Verdict:
        """judge() on ``record``, with the marks of the stages that answered cleared and those
        that did not (or failed) set."""
        v = judge(record, views, first_seen_none, now=time.monotonic(), grace=PENDING_GRACE)
        for node in v.answered:
            m.failed.clear(node)
        for node in v.broken:
            m.failed.mark(node)
        if v.detail:
            m.status = v.detail
        if v.kind == "repair":
            log.info("plan_needs_repair", model=m.model_id[:12], epoch=record.epoch,
                     gone=[n[:12] for n in v.gone], keep=len(v.keep))
        return v

    async def _place(self, m: Model, progress: Progress, pins: tuple[Pin, ...], *, floor: int = 0) -> None:
        """Plan (keeping ``pins``), publish the plan, then load every stage of it."""
        cost = await self._cost(m)
        records = await self.members()
        names = {nid: str(r.get("name", nid[:12])) for nid, r in records.items()}
        await probe_members(self.speeds, records, self.node_id,
                            lambda nid, body: self.peers.request(nid, "cluster.probe", body, timeout=PROBE_TIMEOUT))
        offers = trust.offers(records, m.model_id, allow=self.allow, deny=self.deny, believed=self.speeds.believed,
                              barred=self.speeds.barred())
        failed = m.failed.active()
        plan = None
        tries = [(pins, failed), (pins, set()), ((), failed), ((), set())]
        errors: list[str] = []
        for p, excluded in dict.fromkeys((tuple(p), frozenset(e)) for p, e in tries):
            try:
                live = {o.node_id for o in offers}
                plan = make_plan(cost, offers, max_rtt_ms=self.engine.max_rtt_ms,
                                 pins=[x for x in p if x.node_id in live and x.node_id not in excluded],
                                 exclude=excluded)
                break
            except PlanError as exc:
                errors.append(str(exc))
        if plan is None:
            raise _NoFit(errors[-1])
        epoch = new_epoch(max(floor, m.epoch, m.record.epoch if m.record else 0), self.node_id)
        record = PlanRecord(m.model_id, m.name, epoch, plan, m.weights, m.dtype, m.max_context, m.slots,
                            m.prefill_chunk, cost.lines, m.kv_dtype or m.dtype)
        stages = [{"node": names.get(s.node_id, s.node_id[:12]), "node_id": s.node_id, "layers": [s.start, s.end]}
                  for s in plan.stages]
        progress({"status": "planned", "epoch": epoch, "stages": stages})
        log.info("planned", model=m.model_id[:12], name=m.name, epoch=epoch,
                 stages=" ".join(f"{st['node']}[{st['layers'][0]},{st['layers'][1]})" for st in stages),
                 kept=len(pins))
        # Published before loading: other entry nodes wait for this plan instead of making theirs.
        await self._publish(m, record)

        async def load(i: int) -> dict[str, Any]:
            stage = plan.stages[i]
            node = names.get(stage.node_id, stage.node_id[:12])
            m.status = f"loading layers {stage.start}-{stage.end} on {node}"
            body = LoadRequest(record, i, self.engine.step_timeout, LEASE_TTL, self.until(m)).to_dict()
            try:
                reply = await self.peers.request(stage.node_id, "pipe.load", body, timeout=LOAD_TIMEOUT)
            except (RemoteError, RequestRefused) as exc:
                if exc.code == "stale_epoch":
                    raise _Overtaken(exc.message) from None
                if exc.code == "busy":  # building other stages: try again shortly
                    raise _Unreachable(f"node {node} is busy: {exc.message}") from None
                raise DriverError(f"node {node} could not load layers {stage.start}-{stage.end}: "
                                  f"{exc.message}") from None
            except (TransportError, PeerUnknown, OSError, TimeoutError) as exc:
                m.failed.mark(stage.node_id)
                raise _Unreachable(f"node {node} is unreachable: {type(exc).__name__}: {exc}") from None
            view = parse_stage_view(reply)
            progress({"status": "ready", "node": node, "node_id": stage.node_id, "layers": [stage.start, stage.end],
                      "load_s": view.load_s, "compile_s": view.compile_s})
            return dict(reply)

        results = await asyncio.gather(*(load(i) for i in range(len(plan.stages))), return_exceptions=True)
        for kind in (_Overtaken, _Unreachable, DriverError, BaseException):
            err = next((r for r in results if isinstance(r, kind)), None)
            if err is not None:
                if not isinstance(err, _Overtaken):
                    log.warning("load_failed", model=m.model_id[:12], name=m.name, epoch=epoch, error=str(err))
                raise err
        m.use(record)
        m.status = ""

    async def _publish(self, m: Model, record: PlanRecord | None = None) -> None:
        record = record or m.record
        if record is None:
            return
        try:
            await publish_plan(self.service.dht, record, ttl=max(self.record_ttl, PLAN_TTL))
            m.published_at = time.monotonic()
        except Exception as exc:  # the plan still works; other drivers just won't find it yet
            log.warning("plan_publish_failed", model=m.model_id[:12], error=f"{type(exc).__name__}: {exc}")

    async def _stage_list(self, plan: Plan) -> list[dict[str, Any]]:
        records = await self.members()
        return [{"node": str(records.get(s.node_id, {}).get("name", s.node_id[:12])), "node_id": s.node_id,
                 "layers": [s.start, s.end]} for s in plan.stages]

    # ------------------------------------------------------------------ recovery

    async def recover(self, m: Model, epoch: int, why: str) -> None:
        """A step of plan ``epoch`` failed (``why``): use a plan that works, the same one when
        nothing is gone."""
        async with m.lock:
            if m.epoch != epoch and not m.stale:
                return  # another session already moved the model on
            t0 = time.monotonic()
            m.status = f"recovering: {why}"
            log.info("recovering", model=m.model_id[:12], name=m.name, epoch=epoch, why=why)

            def report(event: dict[str, Any]) -> None:
                if event.get("status") == "planned":
                    m.status = "re-planned: " + ", ".join(f"{s['node']} {s['layers'][0]}-{s['layers'][1]}"
                                                          for s in event.get("stages", []))

            if m.record is not None:
                # Ask the plan's stages first, before any DHT lookup: a dead node's port refuses at
                # once, and the DHT then skips it instead of waiting 2 s per lookup round on it.
                await self._probe(m.record, m)
            try:
                await self._establish(m, report, deadline=t0 + RECOVERY_TIMEOUT, current=m.record, fit_wait=FIT_WAIT)
            except DriverError as exc:
                log.warning("recovery_failed", model=m.model_id[:12], name=m.name, why=why, error=str(exc))
                raise GenerationError(f"a node failed ({why}) and the model cannot be re-planned: {exc}") from None
            finally:
                m.status = ""
            log.info("recovered", model=m.model_id[:12], name=m.name, epoch=m.epoch, replanned=m.epoch != epoch,
                     seconds=round(time.monotonic() - t0, 2))

    # ------------------------------------------------------------------ leases and keep_alive

    async def maintain(self) -> None:
        """Renew this driver's leases, let go of models idle past their keep_alive, and
        notice plans that changed or were stopped by another node."""
        now = time.monotonic()
        for m in list(self.table.values()):
            if not m.sessions and now - m.used_at > self.keep_alive_of(m):
                log.info("model_released_idle", model=m.model_id[:12], name=m.name)
                await self.release(m)
                continue
            if m.record is None or m.lock.locked():
                continue
            views = await self._probe(m.record, m)
            ok = [v is not None and v.epoch == m.epoch and v.state == "ready" for v in views]
            if all(v is not None and v.state in ("none", "draining") and v.epoch >= m.epoch for v in views):
                log.info("model_stopped_elsewhere", model=m.model_id[:12], name=m.name)
                self.table.pop(m.model_id, None)
                with contextlib.suppress(Exception):
                    await withdraw_plan(self.service.dht, m.model_id)
                continue
            if not all(ok):
                m.stale = not await self._readopt(m)
            elif now - m.published_at > max(self.record_ttl, PLAN_TTL) / 3:
                await self._publish(m)

    async def _readopt(self, m: Model) -> bool:
        """Adopt a newer published plan of ``m`` whose stages are all ready (another driver
        repaired it); False when there is none: the next request finds the plan again."""
        async with m.lock:
            record = await self._newest(m, None)
            if record is None or record.epoch <= m.epoch:
                return False
            views = await self._probe(record, m)
            if self._verdict(m, record, views, {}).kind != "ready":
                return False
            m.use(record)
            await self._publish(m)
            log.info("plan_adopted", model=m.model_id[:12], name=m.name, epoch=record.epoch, stages=len(record.plan.stages))
            return True

    async def release(self, m: Model) -> None:
        """Let go of the model here (its keep_alive ran out): other drivers keep their leases."""
        if self.table.get(m.model_id) is m:
            del self.table[m.model_id]
        await asyncio.gather(*(self._quiet(s.node_id, "pipe.release", {"model": m.model_id}) for s in m.plan.stages))
        with contextlib.suppress(Exception):
            await withdraw_plan(self.service.dht, m.model_id)

    async def stop(self, name: str) -> bool:
        """Unload the model on every node of its plan (for every driver), once the requests in
        flight end. A model this node does not drive is found through its published plan."""
        model_id = await self.resolve(name)
        m = self.table.pop(model_id, None)
        record = m.record if m is not None else None
        if record is None:
            with contextlib.suppress(Exception):
                found = await read_plans(self.service.dht, model_id)
                record = found[0] if found else None
            if record is None:
                return False
            views = await self._probe(record)  # leases first: only drivers may stop a stage
            if not any(v is not None and v.state not in ("none", "failed") for v in views):
                return False
        await asyncio.gather(*(self._quiet(s.node_id, "pipe.unload", {"model": model_id})
                               for s in record.plan.stages))
        with contextlib.suppress(Exception):
            await withdraw_plan(self.service.dht, model_id)
        log.info("model_stopped", model=model_id[:12], name=record.name)
        return True

    async def _quiet(self, node: str, method: str, body: dict[str, Any]) -> None:
        try:
            await self.peers.request(node, method, body, timeout=10.0)
        except Exception as exc:  # the stage unloads on its own once no lease is renewed
            log.info("stage_request_failed", method=method, node=node[:12], error=f"{type(exc).__name__}: {exc}")

    def close_session(self, m: Model, session: str) -> None:
        for s in m.plan.stages:
            self._spawn(self._quiet(s.node_id, "pipe.close", {"model": m.model_id, "session": session}))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
