"""Building a stage: fetch a layer range's pieces, check the memory, load and compile it.

One build per shape at a time: when two drivers repair a plan at the same moment, the new
owner of a range gets two loads of different epochs for the same layers; the second waits
for the first one's build instead of fetching, loading and compiling it again (and the
newest epoch installs the result; worker.py decides that). ``on_state`` tells each waiting
load what the build is doing (fetching, loading, compiling).

Budgets, since any member may ask for a load: a build reserves its memory against what the
node lends (every model's stages and every other build together) before it fetches a byte
(the plan's figure) and again once the model's config gives the real one; a driver has at
most MAX_BUILDS_PER_PEER new builds here at once and the node MAX_BUILDS (others are refused
``busy``, and the driver tries again); loading and compiling run on their own thread, so a
build never holds the engine thread that runs the stages' steps.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from node.net.errors import RequestRefused
from node.swarm.layers import pieces_for_layers
from node.swarm.service import ModelService
from protocol.manifest import Manifest, ManifestFile
from protocol.plan import LoadRequest

if TYPE_CHECKING:
    from node.pipeline.encoder_stage import EncoderRunner
    from node.pipeline.grammar import Grammars
    from node.pipeline.stage import StageRunner

__all__ = ["MAX_BUILDS", "MAX_BUILDS_PER_PEER", "Built", "StageBuilder", "config_of", "shape_of"]

MAX_BUILDS = 4  # new stages being built on this node at once
MAX_BUILDS_PER_PEER = 2  # of those, asked for by one driver

Shape = tuple[str, int, int, bool, bool, int, int, str, int, str, str | None]


def config_of(store: Any, manifest: Manifest) -> Any:
    """The engine's config from the model's config.json, read from held pieces: a decoder's
    ModelConfig, or an encoder's BertConfig (``is_encoder``: embeddings only, one stage)."""
    from node.engine.config import is_bert, parse_config

    entry = manifest.files[manifest.file_index("config.json")]
    raw = json.loads(store.read_range(manifest, "config.json", 0, entry.size))
    if isinstance(raw, dict) and is_bert(raw):
        from node.engine.bert import parse_bert_config

        return parse_bert_config(raw)
    return parse_config(raw)


def shape_of(req: LoadRequest) -> Shape:
    """What a built stage depends on: the model, its range and ends, and how it is held."""
    r, s = req.record, req.stage
    return (r.model_id, s.start, s.end, req.first, req.last, r.max_context, r.slots, r.dtype, r.prefill_chunk,
            r.weights, r.kv_dtype)


@dataclass
class Built:
    runner: StageRunner | EncoderRunner
    need: int  # bytes it holds, by the stage's own figure
    load_s: float
    compile_s: float


@dataclass
class _Build:
    task: asyncio.Task[Built]
    peer: str
    model_id: str
    reserved: int = 0  # bytes held back for it until it ends
    watchers: list[Callable[[str], None]] = field(default_factory=list)

    def state(self, value: str) -> None:
        for watch in self.watchers:
            watch(value)


class StageBuilder:
    def __init__(self, service: ModelService, executor: ThreadPoolExecutor, *, memory_allowed: int,
                 used: Callable[[str], int]) -> None:
        """``used(model_id)``: bytes this node's stages of other models hold."""
        self.service = service
        self.executor = executor
        self.memory_allowed = memory_allowed
        self.used = used
        self._building: dict[Shape, _Build] = {}
        # Loading and compiling, off the engine thread that runs the stages' steps.
        self.build_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build")

    async def build(self, req: LoadRequest, on_state: Callable[[str], None], peer: str = "") -> Built:
        key = shape_of(req)
        entry = self._building.get(key)
        if entry is None:
            mine = sum(1 for b in self._building.values() if b.peer == peer)
            if mine >= MAX_BUILDS_PER_PEER or len(self._building) >= MAX_BUILDS:
                raise RequestRefused("busy", f"this node is building {len(self._building)} stages "
                                             f"({mine} for this driver); try again shortly")
            holder: list[_Build] = []
            task = asyncio.ensure_future(self._build(req, lambda s: holder[0].state(s), key))
            entry = _Build(task, peer, req.record.model_id)
            holder.append(entry)
            self._building[key] = entry

            def done(_t: asyncio.Task[Built]) -> None:
                if self._building.get(key) is entry:
                    del self._building[key]

            task.add_done_callback(done)
        entry.watchers.append(on_state)
        return await asyncio.shield(entry.task)

    def cancel(self) -> None:
        for entry in self._building.values():
            entry.task.cancel()
        self.build_executor.shutdown(wait=False, cancel_futures=True)

    def _reserve(self, key: Shape, need: int, what: str) -> None:
        """Hold ``need`` bytes for the build of ``key``, or refuse when the node's stages and
        the other builds (of other models: one of a model's builds replaces another) leave
        too little of what it lends."""
        entry = self._building.get(key)
        model_id = key[0]
        used = self.used(model_id) + sum(b.reserved for k, b in self._building.items()
                                         if k != key and b.model_id != model_id)
        if need + used > self.memory_allowed:
            raise RequestRefused("out_of_memory", (
                f"{what} need {need / 2**20:.0f} MiB; this node lends "
                f"{self.memory_allowed / 2**20:.0f} MiB and {used / 2**20:.0f} MiB are in use or reserved"))
        if entry is not None:
            entry.reserved = need

    def _grammars(self, manifest: Manifest, vocab_size: int) -> Grammars | None:
        """The tail's grammars, reading the model's tokenizer.json (a small file every stage
        fetched, bounded by the model's limits) when the first constrained session comes."""
        from node.pipeline.grammar import Grammars

        f = _tokenizer_file(manifest)
        if f is None:
            return None
        store = self.service.store
        return Grammars(lambda: store.read_range(manifest, f.path, 0, f.size).decode("utf-8", "replace"), vocab_size)

    async def _build(self, req: LoadRequest, state: Callable[[str], None], key: Shape) -> Built:
        stage, rec = req.stage, req.record
        t0 = time.monotonic()
        what = f"layers {stage.start}-{stage.end}"
        self._reserve(key, stage.memory, what)  # the plan's figure, before fetching anything
        manifest = await self.service.manifest(rec.model_id)
        wanted = pieces_for_layers(manifest, stage.start, stage.end, has_embedding=req.first, has_head=req.last)
        await self.service.ensure(manifest, wanted)
        state("loading")
        config = config_of(self.service.store, manifest)
        if config.num_layers != rec.plan.num_layers:
            raise RequestRefused("bad_plan", f"the plan covers {rec.plan.num_layers} layers; "
                                             f"the model has {config.num_layers}")
        if getattr(config, "is_encoder", False):
            return await self._build_encoder(req, config, manifest, key, state, t0)
        # The planner's figure (node/pipeline/cost.py), but never less than the weights and
        # cache themselves: a plan comes from a peer, which may lie. JAX loads here, on
        # first use (the daemon warms it up after start-up, off the loop).
        from node.engine import PartitionSpec, WeightSource, load_partition
        from node.engine.memory import resident_bytes
        from node.pipeline.stage import StageRunner

        spec = PartitionSpec(stage.start, stage.end, req.first, req.last)
        need = max(stage.memory, resident_bytes(config, spec, rec.dtype, rec.max_context, rec.slots,
                                                prefill_chunk=rec.prefill_chunk, weights=rec.weights,
                                                kv_dtype=rec.kv_dtype or rec.dtype))
        self._reserve(key, need, what)
        files = [f.path for f in manifest.files if f.data_start is not None]
        reader = self.service.store.range_reader(manifest)
        source = WeightSource(reader, files, read_into=reader.read_into,
                              sizes={f.path: f.size for f in manifest.files},
                              headers={f.path: f.data_start for f in manifest.files if f.data_start is not None})
        loop = asyncio.get_running_loop()
        part = await loop.run_in_executor(self.build_executor, lambda: load_partition(
            source, config, spec, dtype=rec.dtype, max_context=rec.max_context, prefill_chunk=rec.prefill_chunk,
            weights=rec.weights, kv_dtype=rec.kv_dtype or rec.dtype))
        load_s = time.monotonic() - t0
        state("compiling")
        runner = StageRunner(part, slots=rec.slots, executor=self.executor, session_idle=2 * req.step_timeout,
                             grammars=self._grammars(manifest, config.vocab_size) if req.last else None)
        t1 = time.monotonic()
        await loop.run_in_executor(self.build_executor, _warm, runner)
        return Built(runner, need, load_s, time.monotonic() - t1)


    async def _build_encoder(self, req: LoadRequest, config: Any, manifest: Manifest, key: Shape,
                             state: Callable[[str], None], t0: float) -> Built:
        """An encoder (BERT) runs whole on one node: a plan that splits it is refused."""
        from node.engine import WeightSource
        from node.engine.bert import encoder_memory, load_encoder
        from node.pipeline.encoder_stage import EncoderRunner

        stage, rec = req.stage, req.record
        if not (req.first and req.last and stage.start == 0 and stage.end == config.num_layers):
            raise RequestRefused("bad_plan", "an embedding model runs whole on one node; the plan splits it")
        need = max(stage.memory, encoder_memory(config, rec.slots, rec.max_context, rec.dtype))
        self._reserve(key, need, "the embedding model")
        files = [f.path for f in manifest.files if f.data_start is not None]
        reader = self.service.store.range_reader(manifest)
        source = WeightSource(reader, files, read_into=reader.read_into,
                              sizes={f.path: f.size for f in manifest.files},
                              headers={f.path: f.data_start for f in manifest.files if f.data_start is not None})
        loop = asyncio.get_running_loop()
        encoder = await loop.run_in_executor(self.build_executor, lambda: load_encoder(
            source, config, rec.dtype, max_context=rec.max_context))
        load_s = time.monotonic() - t0
        state("compiling")
        t1 = time.monotonic()
        await loop.run_in_executor(self.build_executor, encoder.embed, [[0]])
        runner = EncoderRunner(encoder, slots=rec.slots, executor=self.executor, session_idle=2 * req.step_timeout)
        return Built(runner, need, load_s, time.monotonic() - t1)


def _tokenizer_file(manifest: Manifest) -> ManifestFile | None:
    return next((f for f in manifest.files if f.data_start is None and f.path.rsplit("/", 1)[-1] == "tokenizer.json"),
                None)


def _warm(runner: StageRunner) -> None:
    """Compile the first buckets (a one-token prefill, a decode step and, at the tail, a
    sampling decode step) on a scratch slot."""
    import numpy as np

    part, cfg = runner.partition, runner.partition.config
    x: Any = np.zeros(1, np.int64) if runner.is_first else np.zeros((1, cfg.hidden_size), np.float32)
    runner.cache, _ = part.prefill(runner.cache, x, start_pos=0, slot=0)
    runner.cache, _ = part.decode(runner.cache, x, [0], [1])  # also the tail's replayed (forced) steps
    if runner.is_last:  # the tail decodes and samples in one call
        runner.cache, _ = part.tail_step(runner.cache, x, [0], [1], [None])
