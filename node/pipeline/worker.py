"""This node's side of every plan it is part of: load a layer range, run steps, forward.

Requests (over the authenticated transport; bodies checked by protocol/pipeline.py):
- ``pipe.load`` {model, epoch, plan, index, max_context, slots, dtype, prefill_chunk,
  keep_alive}: fetch the pieces of this node's range through the swarm, load the
  partition in the engine thread, compile, answer when ready. A newer epoch replaces an
  older one; a failure is reported, and the state says why.
- ``pipe.step``: run one step of one session (stage.py) and forward the result to the
  next stage of the plan; the answer (the tail's token) travels back the same way.
  When the next stage cannot be reached the answer is ``stage_failed`` naming it, so
  the driver knows which node to re-plan without.
- ``pipe.close`` {model, session}: free a session's cache. ``pipe.unload`` {model}.
- ``pipe.state``: what this node has loaded or is loading, per model.
Stages unload after ``keep_alive`` seconds without a step; sessions without a step for
twice the step timeout are freed (their driver died).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from node.cluster.peers import Peers, PeerUnknown
from node.engine.errors import EngineError
from node.net.errors import RemoteError, RequestRefused, TransportError
from node.pipeline.planner import Plan, PlanError
from node.pipeline.stage_errors import StageError
from node.store.pieces import StoreError
from node.swarm.layers import pieces_for_layers
from node.swarm.service import ModelService
from protocol.manifest import Manifest
from protocol.pipeline import PipelineMessageError, parse_step

if TYPE_CHECKING:
    from node.pipeline.stage import StageRunner

__all__ = ["StageWorker", "config_of"]

log = structlog.get_logger("node.pipeline")

LOAD_DTYPES = ("float32", "bfloat16", "float16")
LOAD_WEIGHTS = ("native", "int8")


def config_of(store: Any, manifest: Manifest) -> Any:
    """The engine's ModelConfig from the model's config.json, read from held pieces."""
    from node.engine.config import parse_config

    entry = manifest.files[manifest.file_index("config.json")]
    raw = store.read_range(manifest, "config.json", 0, entry.size)
    return parse_config(json.loads(raw))


@dataclass
class Loaded:
    model_id: str
    epoch: int
    plan: Plan
    index: int
    state: str = "fetching"
    error: str | None = None
    runner: StageRunner | None = None
    memory: int = 0
    load_s: float = 0.0
    compile_s: float = 0.0
    step_timeout: float = 60.0
    keep_alive: float = 300.0
    name: str = ""
    dtype: str = ""
    chunk: int = 0
    weights: str = "native"


class StageWorker:
    def __init__(self, node_id: str, service: ModelService, peers: Peers, *, memory_allowed: int,
                 step_timeout: float, on_change: Callable[[], None] = lambda: None) -> None:
        self.node_id = node_id
        self.on_change = on_change
        self.service = service
        self.peers = peers
        self.memory_allowed = memory_allowed
        self.step_timeout = step_timeout
        # One engine thread: JAX serialises work on a device anyway, and a donated
        # cache must never be used by two calls at once.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.stages: dict[str, Loaded] = {}  # serving (or failed after replacing one)
        self.loading: dict[str, Loaded] = {}  # loads in progress, by model
        self._loads: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        peers.local.update({"pipe.step": self.step, "pipe.load": self.load, "pipe.close": self.close,
                            "pipe.unload": self.unload, "pipe.state": self.state})

    def register(self, transport: Any) -> None:
        for method, fn in self.peers.local.items():
            transport.on_request(method, self._remote(fn))
        self._sweeper = asyncio.ensure_future(self._sweep_loop())

    @staticmethod
    def _remote(fn: Any) -> Any:
        async def handler(_conn: Any, body: Any) -> Any:
            return await fn(body)
        return handler

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._loads.values():
            task.cancel()
        for loaded in list(self.stages.values()):
            if loaded.runner is not None:
                await loaded.runner.close()
        self.stages.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ load

    async def load(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise RequestRefused("bad_request", "pipe.load needs {model, epoch, plan, index, ...}")
        try:
            plan = Plan.from_dict(body.get("plan"))
        except PlanError as exc:
            raise RequestRefused("bad_plan", str(exc)) from None
        model_id, epoch, index = body["model"], body.get("epoch"), body.get("index")
        if not isinstance(epoch, int) or not isinstance(index, int) or not 0 <= index < len(plan.stages):
            raise RequestRefused("bad_request", "epoch and index must be integers inside the plan")
        if plan.stages[index].node_id != self.node_id:
            raise RequestRefused("bad_plan", "this node is not that stage of the plan")
        current, pending = self.stages.get(model_id), self.loading.get(model_id)
        newest = max((x.epoch for x in (current, pending) if x is not None), default=-1)
        if newest > epoch:
            raise RequestRefused("stale_epoch", f"this node serves epoch {newest} of the model")
        if pending is not None and pending.epoch == epoch and model_id in self._loads:
            return await asyncio.shield(self._loads[model_id])
        if current is not None and current.epoch == epoch and current.state == "ready":
            return self._view(current)
        task = asyncio.ensure_future(self._load(model_id, epoch, plan, index, body))
        self._loads[model_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._loads.get(model_id) is task:
                del self._loads[model_id]

    async def _load(self, model_id: str, epoch: int, plan: Plan, index: int, body: dict[str, Any]) -> dict[str, Any]:
        stage = plan.stages[index]
        first, last = stage.start == 0, index == len(plan.stages) - 1
        slots, context = int(body.get("slots", 4)), int(body.get("max_context", 2048))
        chunk = int(body.get("prefill_chunk", 256))
        dtype, weights = body.get("dtype", "float32"), body.get("weights", "native")
        if dtype not in LOAD_DTYPES or weights not in LOAD_WEIGHTS or not 1 <= slots <= 256 \
                or not 16 <= context <= 1 << 20:
            raise RequestRefused("bad_request", "dtype, weights, slots or max_context out of range")
        loaded = Loaded(model_id, epoch, plan, index, step_timeout=float(body.get("step_timeout", self.step_timeout)),
                        keep_alive=float(body.get("keep_alive", 300.0)), name=str(body.get("name", ""))[:128],
                        weights=weights)
        # The stage being replaced keeps serving until this load passes its checks: a
        # plan that cannot be loaded here (a lie, or too big) must not take it down.
        self.loading[model_id] = loaded
        t0 = time.monotonic()
        try:
            manifest = await self.service.manifest(model_id)
            wanted = pieces_for_layers(manifest, stage.start, stage.end, has_embedding=first, has_head=last)
            await self.service.ensure(manifest, wanted)
            loaded.state = "loading"
            config = config_of(self.service.store, manifest)
            used = sum(s.memory for m, s in self.stages.items() if m != model_id)
            # The planner's figure (node/pipeline/cost.py), but never less than the weights
            # and cache themselves: a plan comes from a peer, which may lie.
            # JAX loads here, on first use, not when the daemon starts (it takes seconds,
            # and the daemon sets JAX's memory settings before it).
            from node.engine import PartitionSpec, WeightSource, load_partition
            from node.engine.memory import resident_bytes
            from node.pipeline.stage import StageRunner

            spec = PartitionSpec(stage.start, stage.end, first, last)
            need = max(stage.memory, resident_bytes(config, spec, dtype, context, slots, prefill_chunk=chunk,
                                                    weights=weights))
            if need + used > self.memory_allowed:
                raise RequestRefused("out_of_memory", (
                    f"layers {stage.start}-{stage.end} need {need / 2**20:.0f} MiB; this node lends "
                    f"{self.memory_allowed / 2**20:.0f} MiB and {used / 2**20:.0f} MiB are in use"))
            old = self.stages.pop(model_id, None)
            if old is not None and old.runner is not None:
                await old.runner.close()
                part = old.runner.partition
                if (part.spec == spec and part.max_context == context
                        and old.runner.slots == slots and old.dtype == dtype and old.chunk == chunk
                        and old.weights == weights):
                    # A re-plan that keeps this node's range (a recovery elsewhere in the
                    # chain): keep the weights and the compiled steps, start a fresh cache.
                    return self._ready(loaded, StageRunner(part, slots=slots, executor=self.executor,
                                                           session_idle=2 * loaded.step_timeout), need, dtype, chunk)
            files = [f.path for f in manifest.files if f.data_start is not None]
            reader = self.service.store.range_reader(manifest)
            source = WeightSource(reader, files, read_into=reader.read_into,
                                  sizes={f.path: f.size for f in manifest.files},
                                  headers={f.path: f.data_start for f in manifest.files if f.data_start is not None})
            part = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: load_partition(source, config, spec, dtype=dtype, max_context=context,
                                                      prefill_chunk=chunk, weights=weights))
            loaded.load_s = time.monotonic() - t0
            loaded.state = "compiling"
            runner = StageRunner(part, slots=slots, executor=self.executor, session_idle=2 * loaded.step_timeout)
            t1 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(self.executor, _warm, runner)
            loaded.compile_s = time.monotonic() - t1
            return self._ready(loaded, runner, need, dtype, chunk)
        except RequestRefused as exc:
            loaded.state, loaded.error = "failed", exc.message
            raise
        except (StoreError, EngineError, OSError, ValueError) as exc:
            loaded.state, loaded.error = "failed", str(exc)
            raise RequestRefused("load_failed", f"{type(exc).__name__}: {exc}") from None
        finally:
            if self.loading.get(model_id) is loaded:
                del self.loading[model_id]

    def _ready(self, loaded: Loaded, runner: StageRunner, need: int, dtype: str, chunk: int) -> dict[str, Any]:
        stage = loaded.plan.stages[loaded.index]
        loaded.memory, loaded.runner, loaded.state, loaded.dtype, loaded.chunk = need, runner, "ready", dtype, chunk
        self.stages[loaded.model_id] = loaded
        runner.start()
        self.on_change()
        log.info("stage_ready", model=loaded.model_id[:12], epoch=loaded.epoch, layers=f"{stage.start}-{stage.end}",
                 load_s=round(loaded.load_s, 2), compile_s=round(loaded.compile_s, 2))
        return self._view(loaded)

    def _view(self, loaded: Loaded) -> dict[str, Any]:
        stage = loaded.plan.stages[loaded.index]
        runner = loaded.runner
        return {"model": loaded.model_id, "epoch": loaded.epoch, "start": stage.start, "end": stage.end,
                "state": loaded.state, "error": loaded.error, "memory": loaded.memory,
                "sessions": len(runner.sessions) if runner else 0, "load_s": loaded.load_s,
                "compile_s": loaded.compile_s, "weights": loaded.weights}

    def serving(self) -> list[dict[str, Any]]:
        """What this node's record says it serves (node/cluster/directory.py checks it)."""
        out = []
        for m in self.stages.values():
            if m.state == "ready" and m.runner is not None:
                stage = m.plan.stages[m.index]
                out.append({"model": m.model_id, "name": m.name[:128], "start": stage.start, "end": stage.end,
                            "epoch": m.epoch, "sessions": len(m.runner.sessions), "memory": stage.memory})
        return out

    def sessions(self) -> int:
        return sum(len(m.runner.sessions) for m in self.stages.values() if m.runner is not None)

    async def state(self, _body: Any = None) -> dict[str, Any]:
        return {"models": [self._view(m) for m in (*self.stages.values(), *self.loading.values())]}

    async def unload(self, body: Any) -> dict[str, Any]:
        model_id = body.get("model") if isinstance(body, dict) else None
        loaded = self.stages.pop(model_id, None) if isinstance(model_id, str) else None
        if loaded is not None and loaded.runner is not None:
            await loaded.runner.close()
        if loaded is not None:
            self.on_change()
        return {"unloaded": loaded is not None}

    async def close(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise RequestRefused("bad_request", "pipe.close needs {model, session}")
        loaded = self.stages.get(body.get("model"))  # type: ignore[arg-type]
        freed = bool(loaded and loaded.runner and loaded.runner.free(str(body.get("session"))))
        return {"freed": freed}

    # ------------------------------------------------------------------ steps

    async def step(self, body: Any) -> dict[str, Any]:
        model_id = body.get("model") if isinstance(body, dict) else None
        loaded = self.stages.get(model_id) if isinstance(model_id, str) else None
        if loaded is None or loaded.runner is None:
            raise RequestRefused("not_loaded", "this node has not loaded that model (load it first)")
        runner = loaded.runner
        cfg = runner.partition.config
        try:
            step = parse_step(body, first=runner.is_first, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                              max_context=runner.partition.max_context)
        except PipelineMessageError as exc:
            raise RequestRefused("bad_step", str(exc)) from None
        if step.epoch != loaded.epoch:
            raise RequestRefused("stale_epoch", f"this node serves epoch {loaded.epoch} of the model")
        try:
            result = await runner.submit(step)
        except StageError as exc:
            raise RequestRefused(exc.code, str(exc)) from None
        if runner.is_last:
            return {"token": result.token, "logprob": result.logprob}
        nxt = loaded.plan.stages[loaded.index + 1].node_id
        forward = {**body, "inputs": result.hidden, "timeout": max(0.5, step.timeout - 1.0)}
        try:
            reply = await self.peers.request(nxt, "pipe.step", forward, timeout=step.timeout)
        except RemoteError as exc:
            raise RequestRefused(exc.code, exc.message) from None
        except (TransportError, PeerUnknown, OSError, TimeoutError) as exc:
            raise RequestRefused("stage_failed", nxt) from exc
        if not isinstance(reply, dict):
            raise RequestRefused("stage_failed", nxt)
        return reply

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            now = time.monotonic()
            for model_id, loaded in list(self.stages.items()):
                runner = loaded.runner
                if runner is None:
                    continue
                for session in runner.sweep():
                    log.info("session_expired", model=model_id[:12], session=session[:12])
                if not runner.sessions and now - runner.used_at > loaded.keep_alive:
                    log.info("stage_unloaded_idle", model=model_id[:12], idle_s=round(now - runner.used_at))
                    with contextlib.suppress(Exception):
                        await self.unload({"model": model_id})


def _warm(runner: StageRunner) -> None:
    """Compile the first buckets (a one-token prefill and a decode step) on a scratch slot."""
    import numpy as np

    part, cfg = runner.partition, runner.partition.config
    x: Any = np.zeros(1, np.int64) if runner.is_first else np.zeros((1, cfg.hidden_size), np.float32)
    runner.cache, _ = part.prefill(runner.cache, x, start_pos=0, slot=0)
    runner.cache, _ = part.decode(runner.cache, x, [0], [1])
