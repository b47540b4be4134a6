"""This node's side of every plan it is part of: load a layer range, run steps, forward, leases.

Requests (over the authenticated transport; every body is parsed by protocol/plan.py or
protocol/pipeline.py before any work; ``peer`` is the sender's node id, taken from its
certificate):
- ``pipe.load`` (LoadRequest): fetch the pieces of this node's range through the swarm,
  load the partition in the engine thread, compile, answer when ready (a StageView).
  A newer epoch replaces an older one (an older one is refused ``stale_epoch``); a load
  that a newer one overtook is dropped, never installed. The sender gets a lease.
- ``pipe.lease`` {model, epoch, ttl}: renew the sender's lease on the model's stage; the
  answer is the stage's view (state ``none`` when this node serves nothing of it), which
  is how drivers check that a published plan still stands.
- ``pipe.release`` {model}: the sender lets go of its lease (its keep_alive ran out).
- ``pipe.unload`` {model}: a lease holder stops the model for everyone: leases are
  dropped, no new session starts, and the stage unloads once its live sessions end.
- ``pipe.step``: run one step of one session (stage.py) and forward the result to the
  next stage of the plan; the answer (the tail's token, or an embed step's vector)
  travels back the same way. An embedding model's stage is an EncoderRunner
  (encoder_stage.py): the whole model, whole inputs, nothing kept.
  The first stage takes steps only from a driver holding a lease on it (or owning the
  session); every other stage only from the plan's previous stage, which names the
  session's driver (``driver``). A session belongs to the driver that opened it, and
  no driver takes the last slots from other drivers with sessions on the stage.
  When the next stage cannot be reached the answer is ``stage_failed`` naming it, so
  the driver knows which node to check.
- ``pipe.close`` {model, session}: the session's driver frees its cache. ``pipe.state``: every stage.
  ``pipe.plan`` {model}: the plan record the stage serves (drivers ask it when the DHT
  record is missing).
A stage stays loaded while any driver holds a lease on it or a session is live on it;
sessions without a step for twice the step timeout are freed (their driver died).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from node.cluster.peers import Peers, PeerUnknown
from node.engine.errors import EngineError
from node.net.errors import RemoteError, RequestRefused, TransportError
from node.pipeline.builder import StageBuilder, shape_of
from node.pipeline.plans import EPOCH_AHEAD_S, epoch_from_future
from node.pipeline.stage_errors import StageError
from node.store.pieces import StoreError
from node.swarm.service import ModelService
from protocol.pipeline import PipelineMessageError, parse_model_ref, parse_step, parse_step_reply
from protocol.plan import LoadRequest, PlanFormError, StageView, node_id_ok, parse_load

if TYPE_CHECKING:
    from node.pipeline.encoder_stage import EncoderRunner
    from node.pipeline.stage import StageRunner

    Runner = StageRunner | EncoderRunner

__all__ = ["Handler", "StageWorker"]

log = structlog.get_logger("node.pipeline")

Handler = Callable[[str, Any], Awaitable[Any]]
MAX_LEASES = 64  # drivers holding one stage


@dataclass
class Loaded:
    request: LoadRequest
    state: str = "fetching"
    error: str = ""
    runner: Runner | None = None
    memory: int = 0
    load_s: float = 0.0
    compile_s: float = 0.0
    leases: dict[str, float] = field(default_factory=dict)  # driver id -> when its lease ends
    until: dict[str, float] = field(default_factory=dict)  # driver id -> unix time its keep_alive ends
    draining: bool = False

    @property
    def model_id(self) -> str:
        return self.request.record.model_id

    @property
    def epoch(self) -> int:
        return self.request.record.epoch

    def lease(self, driver: str, ttl: float, now: float, until: float | None = None) -> None:
        if driver in self.leases or len(self.leases) < MAX_LEASES:
            self.leases[driver] = now + ttl
            if until:
                self.until[driver] = until

    def live_leases(self, now: float) -> int:
        for driver in [d for d, end in self.leases.items() if end <= now]:
            del self.leases[driver]
            self.until.pop(driver, None)
        return len(self.leases)

    def expires_at(self) -> float | None:
        """When the last keep_alive of the drivers holding it runs out (unix time)."""
        return max((self.until[d] for d in self.leases if d in self.until), default=None)


class StageWorker:
    def __init__(self, node_id: str, service: ModelService, peers: Peers, *, memory_allowed: int,
                 step_timeout: float, on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.on_change = on_change
        self.service = service
        self.peers = peers
        self.memory_allowed = memory_allowed
        self.step_timeout = step_timeout
        self._clock = clock
        # One engine thread: JAX serialises work on a device anyway, and a donated
        # cache must never be used by two calls at once.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.stages: dict[str, Loaded] = {}  # serving, by model
        self.loading: dict[str, Loaded] = {}  # loads in progress, by model
        self._loads: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self.builder = StageBuilder(service, self.executor, memory_allowed=memory_allowed,
                                    used=lambda model: sum(s.memory for m, s in self.stages.items() if m != model))
        # The last epoch of each model this node served and let go: a plan at that epoch or
        # older is known to be gone here, not still on its way.
        self.retired: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.handlers: dict[str, Handler] = {
            "pipe.step": self.step, "pipe.load": self.load, "pipe.close": self.close, "pipe.lease": self.lease,
            "pipe.release": self.release, "pipe.unload": self.unload, "pipe.state": self.state,
            "pipe.plan": self.plan}
        peers.local.update(self.handlers)

    def register(self, transport: Any) -> None:
        for method, fn in self.handlers.items():
            transport.on_request(method, _remote(fn))
        self._sweeper = asyncio.ensure_future(self._sweep_loop())

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._loads.values():
            task.cancel()
        self.builder.cancel()
        for loaded in list(self.stages.values()):
            if loaded.runner is not None:
                await loaded.runner.close()
        self.stages.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ load

    async def load(self, peer: str, body: Any) -> dict[str, Any]:
        try:
            req = parse_load(body)
        except PlanFormError as exc:
            raise RequestRefused("bad_plan", str(exc)) from None
        if req.stage.node_id != self.node_id:
            raise RequestRefused("bad_plan", "this node is not that stage of the plan")
        if epoch_from_future(req.record.epoch):
            raise RequestRefused("bad_plan", f"the plan's epoch is from more than {EPOCH_AHEAD_S:.0f} s "
                                             "ahead of this node's clock")
        model_id, epoch, now = req.record.model_id, req.record.epoch, self._clock()
        current, pending = self.stages.get(model_id), self.loading.get(model_id)
        newest = max((x.epoch for x in (current, pending) if x is not None), default=-1)
        if newest > epoch:
            raise RequestRefused("stale_epoch", f"this node serves epoch {newest} of the model")
        if pending is not None and pending.epoch == epoch and model_id in self._loads:
            pending.lease(peer, req.lease_ttl, now, req.until)
            return await asyncio.shield(self._loads[model_id])
        if current is not None and current.epoch == epoch and current.state == "ready":
            current.lease(peer, req.lease_ttl, now, req.until)
            current.draining = False
            return self._view(current, peer).to_dict()
        loaded = Loaded(req)
        for old in (current, pending):  # a lease is on the model here, whatever the epoch
            if old is not None:
                loaded.leases.update(old.leases)
                loaded.until.update(old.until)
        loaded.lease(peer, req.lease_ttl, now, req.until)
        # The stage being replaced keeps serving until this load passes its checks: a
        # plan that cannot be loaded here (a lie, or too big) must not take it down.
        self.loading[model_id] = loaded
        task = asyncio.ensure_future(self._load(loaded, peer))
        self._loads[model_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._loads.get(model_id) is task:
                del self._loads[model_id]

    async def _load(self, loaded: Loaded, peer: str) -> dict[str, Any]:
        req, model_id = loaded.request, loaded.model_id
        stage, rec = req.stage, req.record
        try:
            old = self.stages.get(model_id)
            if old is not None and old.runner is not None and shape_of(old.request) == shape_of(req):
                # A re-plan that keeps this node's range (a recovery elsewhere in the chain):
                # keep the weights and the compiled steps, start a fresh cache (the same kind
                # of runner: a decoder's StageRunner or an encoder's EncoderRunner).
                runner = type(old.runner)(old.runner.partition, slots=rec.slots, executor=self.executor,
                                          session_idle=2 * req.step_timeout)
                need = old.memory
            else:
                def state(value: str) -> None:
                    loaded.state = value

                built = await self.builder.build(req, state, peer)
                runner, need, loaded.load_s, loaded.compile_s = built.runner, built.need, built.load_s, built.compile_s
            self._still_wanted(loaded)
            old = self.stages.pop(model_id, None)
            if old is not None and old.runner is not None:
                await old.runner.close()
            return self._ready(loaded, runner, need)
        except RequestRefused as exc:
            loaded.state, loaded.error = "failed", exc.message
            if exc.code != "stale_epoch":
                log.warning("stage_load_failed", model=model_id[:12], name=rec.name, epoch=rec.epoch,
                            layers=f"{stage.start}-{stage.end}", asked_by=peer[:12], code=exc.code, error=exc.message)
            raise
        except (StoreError, EngineError, OSError, ValueError) as exc:
            loaded.state, loaded.error = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("stage_load_failed", model=model_id[:12], name=rec.name, epoch=rec.epoch,
                        layers=f"{stage.start}-{stage.end}", asked_by=peer[:12], error=loaded.error)
            raise RequestRefused("load_failed", loaded.error) from None
        finally:
            if self.loading.get(model_id) is loaded:
                del self.loading[model_id]

    def _retire(self, model_id: str, epoch: int) -> None:
        self.retired[model_id] = max(epoch, self.retired.get(model_id, 0))
        while len(self.retired) > 256:
            del self.retired[next(iter(self.retired))]

    def _still_wanted(self, loaded: Loaded) -> None:
        """A load that a newer epoch's load overtook stops here (the newer one installs itself)."""
        if self.loading.get(loaded.model_id) is not loaded:
            raise RequestRefused("stale_epoch", "a newer plan of the model replaced this load")

    def _ready(self, loaded: Loaded, runner: Runner, need: int) -> dict[str, Any]:
        stage = loaded.request.stage
        loaded.memory, loaded.runner, loaded.state = need, runner, "ready"
        # The leases given when the load began run from now: a compile longer than a lease
        # (52 s on a busy machine) would otherwise unload the stage the moment it is ready.
        fresh = self._clock() + loaded.request.lease_ttl
        for driver, end in list(loaded.leases.items()):
            loaded.leases[driver] = max(end, fresh)
        runner.owner_cap = lambda driver: self._share(loaded, driver)
        self.stages[loaded.model_id] = loaded
        runner.start()
        self.on_change()
        log.info("stage_ready", model=loaded.model_id[:12], name=loaded.request.record.name, epoch=loaded.epoch,
                 layers=f"{stage.start}-{stage.end}", load_s=round(loaded.load_s, 2),
                 compile_s=round(loaded.compile_s, 2))
        return self._view(loaded, "").to_dict()

    def _view(self, loaded: Loaded, peer: str) -> StageView:
        stage = loaded.request.stage
        runner = loaded.runner
        state = "draining" if loaded.draining and loaded.state == "ready" else loaded.state
        return StageView(loaded.model_id, loaded.epoch, stage.start, stage.end, state, loaded.error[:500],
                         loaded.memory, len(runner.sessions) if runner else 0, round(loaded.load_s, 3),
                         round(loaded.compile_s, 3), loaded.request.record.weights, peer in loaded.leases)

    def serving(self) -> list[dict[str, Any]]:
        """What this node's record says it serves (node/cluster/directory.py checks it)."""
        out = []
        for m in self.stages.values():
            if m.state == "ready" and m.runner is not None and not m.draining:
                stage, rec = m.request.stage, m.request.record
                entry = {"model": m.model_id, "name": _printable(rec.name, 128), "start": stage.start, "end": stage.end,
                         "epoch": m.epoch, "sessions": len(m.runner.sessions), "memory": m.memory,
                         "layers": rec.plan.num_layers, "context": rec.max_context, "weights": rec.weights,
                         "family": _printable(str(m.runner.partition.config.architecture), 32),
                         "drivers": m.live_leases(self._clock())}
                expires = m.expires_at()
                if expires is not None:
                    entry["expires_at"] = round(expires, 1)
                out.append(entry)
        return out

    def memory_in_use(self) -> int:
        return sum(m.memory for m in self.stages.values())

    def sessions(self) -> int:
        return sum(len(m.runner.sessions) for m in self.stages.values() if m.runner is not None)

    # ------------------------------------------------------------------ leases and control

    async def state(self, peer: str, _body: Any = None) -> dict[str, Any]:
        return {"models": [self._view(m, peer).to_dict() for m in (*self.stages.values(), *self.loading.values())]}

    async def plan(self, _peer: str, body: Any) -> dict[str, Any]:
        """The plan record this node's stage of a model serves ({} when none): the stages are
        the plan's last word when its DHT record is missing (expired, not spread yet)."""
        try:
            ref = parse_model_ref(body)
        except PipelineMessageError as exc:
            raise RequestRefused("bad_request", str(exc)) from None
        loaded = self.loading.get(ref.model_id) or self.stages.get(ref.model_id)
        if loaded is None or loaded.draining:
            return {}
        return loaded.request.record.to_dict()

    async def lease(self, peer: str, body: Any) -> dict[str, Any]:
        try:
            ref = parse_model_ref(body, lease=True)
        except PipelineMessageError as exc:
            raise RequestRefused("bad_request", str(exc)) from None
        loaded = self.loading.get(ref.model_id) or self.stages.get(ref.model_id)
        if loaded is None:
            return StageView(ref.model_id, self.retired.get(ref.model_id, 0), 0, 0, "none").to_dict()
        if not loaded.draining and loaded.state != "failed":
            loaded.lease(peer, ref.ttl or 30.0, self._clock(), ref.until)
        return self._view(loaded, peer).to_dict()

    async def release(self, peer: str, body: Any) -> dict[str, Any]:
        try:
            ref = parse_model_ref(body)
        except PipelineMessageError as exc:
            raise RequestRefused("bad_request", str(exc)) from None
        released = False
        for loaded in (self.stages.get(ref.model_id), self.loading.get(ref.model_id)):
            if loaded is not None:
                released = loaded.leases.pop(peer, None) is not None or released
                loaded.until.pop(peer, None)
        await self._unload_if_unused(ref.model_id)
        return {"released": released}

    async def unload(self, peer: str, body: Any) -> dict[str, Any]:
        try:
            ref = parse_model_ref(body)
        except PipelineMessageError as exc:
            raise RequestRefused("bad_request", str(exc)) from None
        loaded = self.stages.get(ref.model_id)
        if loaded is None:
            return {"unloaded": False}
        if peer != self.node_id and peer not in loaded.leases:
            raise RequestRefused("not_a_driver", "only a node that drives this model here may stop it")
        loaded.leases.clear()
        loaded.draining = True
        self.on_change()
        log.info("stage_stopping", model=ref.model_id[:12], asked_by=peer[:12],
                 sessions=len(loaded.runner.sessions) if loaded.runner else 0)
        return {"unloaded": await self._unload_if_unused(ref.model_id)}

    async def _unload_if_unused(self, model_id: str) -> bool:
        loaded = self.stages.get(model_id)
        if loaded is None or loaded.runner is None:
            return False
        if loaded.runner.sessions or (loaded.live_leases(self._clock()) and not loaded.draining):
            return False
        del self.stages[model_id]
        self._retire(model_id, loaded.epoch)
        await loaded.runner.close()
        self.on_change()
        log.info("stage_unloaded", model=model_id[:12], name=loaded.request.record.name, epoch=loaded.epoch)
        return True

    async def close(self, peer: str, body: Any) -> dict[str, Any]:
        try:
            ref = parse_model_ref(body, session=True)
        except PipelineMessageError as exc:
            raise RequestRefused("bad_request", str(exc)) from None
        loaded = self.stages.get(ref.model_id)
        freed = bool(loaded and loaded.runner and ref.session and loaded.runner.free(ref.session, peer))
        if freed and loaded is not None and loaded.draining:
            await self._unload_if_unused(ref.model_id)
        return {"freed": freed}

    # ------------------------------------------------------------------ steps

    def _share(self, loaded: Loaded, driver: str) -> int:
        """Sessions ``driver`` may hold on a stage: every slot but one for each other driver
        with a session on it now (at most half of them kept so), so that no driver, an
        insider included, can take every slot from the others in use."""
        slots = loaded.request.record.slots
        runner = loaded.runner
        others = {s.owner for s in runner.sessions.values() if s.owner != driver} if runner is not None else set()
        return max(1, slots - min(len(others), slots // 2))

    def _driver_of(self, loaded: Loaded, peer: str, body: dict[str, Any]) -> str:
        """The driver a step is sent for, when ``peer`` is entitled to send it here."""
        index = loaded.request.index
        if index == 0:
            session = body.get("session")
            runner = loaded.runner
            owns = runner is not None and isinstance(session, str) and (
                (s := runner.sessions.get(session)) is not None and s.owner == peer)
            if peer != self.node_id and peer not in loaded.leases and not owns:
                raise RequestRefused("not_a_driver", "steps come from a driver holding a lease on this stage "
                                                     "(pipe.load or pipe.lease first)")
            return peer
        previous = loaded.request.record.plan.stages[index - 1].node_id
        if peer != previous:
            raise RequestRefused("not_a_driver", "this stage takes steps only from the plan's previous stage")
        driver = body.get("driver")
        if not node_id_ok(driver):
            raise RequestRefused("bad_step", "driver must be the session's driver's node id")
        assert isinstance(driver, str)
        return driver

    async def step(self, peer: str, body: Any) -> dict[str, Any]:
        model_id = body.get("model") if isinstance(body, dict) else None
        loaded = self.stages.get(model_id) if isinstance(model_id, str) else None
        if loaded is None or loaded.runner is None:
            raise RequestRefused("not_loaded", "this node has not loaded that model (load it first)")
        runner = loaded.runner
        epoch = body.get("epoch")
        if isinstance(epoch, int) and epoch != loaded.epoch:  # before the shape checks: another plan's step
            raise RequestRefused("stale_epoch", f"this node serves epoch {loaded.epoch} of the model")
        driver = self._driver_of(loaded, peer, body)  # before any parsing: a stranger's step costs nothing
        cfg = runner.partition.config
        try:
            step = parse_step(body, first=runner.is_first, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                              max_context=runner.partition.max_context)
        except PipelineMessageError as exc:
            raise RequestRefused("bad_step", str(exc)) from None
        if step.epoch != loaded.epoch:
            raise RequestRefused("stale_epoch", f"this node serves epoch {loaded.epoch} of the model")
        if loaded.draining and step.session not in runner.sessions:
            raise RequestRefused("not_loaded", "the model is being unloaded on this node")
        try:
            result = await runner.submit(step, driver)
        except StageError as exc:
            raise RequestRefused(exc.code, str(exc)) from None
        if runner.is_last:
            if result.embedding is not None:
                return {"token": None, "logprob": None, "embedding": result.embedding}
            return {"token": result.token, "logprob": result.logprob}
        plan = loaded.request.record.plan
        nxt = plan.stages[loaded.request.index + 1].node_id
        forward = {**body, "inputs": result.hidden, "driver": driver, "timeout": max(0.5, step.timeout - 1.0)}
        try:
            reply = await self.peers.request(nxt, "pipe.step", forward, timeout=step.timeout)
        except RemoteError as exc:
            raise RequestRefused(exc.code, exc.message) from None
        except RequestRefused:
            raise
        except (TransportError, PeerUnknown, OSError, TimeoutError) as exc:
            log.warning("next_stage_failed", model=model_id[:12] if model_id else "", node=nxt[:12],
                        error=f"{type(exc).__name__}: {exc}")
            raise RequestRefused("stage_failed", nxt) from exc
        try:
            return parse_step_reply(reply, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size).to_dict()
        except PipelineMessageError as exc:
            log.warning("next_stage_bad_answer", model=model_id[:12] if model_id else "", node=nxt[:12], error=str(exc))
            raise RequestRefused("stage_failed", nxt) from None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for model_id, loaded in list(self.stages.items()):
                runner = loaded.runner
                if runner is None:
                    continue
                for session in runner.sweep():
                    log.info("session_expired", model=model_id[:12], session=session[:12])
                if not runner.sessions and (loaded.draining or not loaded.live_leases(self._clock())):
                    with contextlib.suppress(Exception):
                        await self._unload_if_unused(model_id)


def _printable(text: str, limit: int) -> str:
    """Text a peer chose, fit for this node's own record (one control character in it would
    make the record invalid everywhere, and the node would vanish from the cluster)."""
    return "".join(c for c in text if c.isprintable())[:limit]


def _remote(fn: Handler) -> Any:
    async def handler(conn: Any, body: Any) -> Any:
        return await fn(str(conn.node_id), body)
    return handler
