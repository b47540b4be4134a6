"""Plans as they cross nodes: the layer ranges, the published plan record, the load request,
and a stage's answer about itself. Each is a frozen form with ``to_dict`` and a ``parse_*``
that returns the value or raises ``PlanFormError`` with a text the sender can act on.

A plan is the cluster's one truth for a loaded model: the driver that makes it publishes
a ``PlanRecord`` under ``plan/<model id>`` before it loads the stages, so every other entry
node adopts it (or waits for it) instead of planning its own; every driver that adopts a
plan publishes the same record under its own key, so the plan outlives the driver that
made it. Epochs order plans: a stage serves the newest epoch it was asked to load.
Every number a peer sends is checked here (finite, in range) before anyone uses it.
Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DTYPES",
    "MAX_EPOCH",
    "MAX_STAGES",
    "STAGE_STATES",
    "WEIGHTS",
    "LoadRequest",
    "Plan",
    "PlanFormError",
    "PlanRecord",
    "Stage",
    "StageView",
    "model_id_ok",
    "node_id_ok",
    "parse_load",
    "parse_plan_record",
    "parse_stage_view",
]

MAX_EPOCH = (1 << 62) - 1
MAX_STAGES = 48  # a record must fit one DHT datagram (~7.5 KB): ~110 bytes a stage
MAX_LAYERS = 1 << 16
MAX_MEMORY = 1 << 50  # a PiB: a stage's memory figure beyond it is a lie
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS = ("native", "int8")
# What a stage says about a model: nothing here, being fetched/loaded/compiled, ready,
# failed to load, or unloading once its live sessions end.
STAGE_STATES = ("none", "fetching", "loading", "compiling", "ready", "failed", "draining")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PlanFormError(ValueError):
    """A plan, plan record, load request or stage view that breaks the rules."""


def model_id_ok(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.match(value) is not None


node_id_ok = model_id_ok  # both are sha256 hex digests


def _int(d: Mapping[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PlanFormError(f"{key} must be an integer from {low} to {high}, got {value!r:.40}")
    return value


def _float(d: Mapping[str, Any], key: str, low: float, high: float, default: float | None = None) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanFormError(f"{key} must be a number, got {value!r:.40}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise PlanFormError(f"{key} must be a finite number from {low} to {high}")
    return value


def _choice(d: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    value = d.get(key, default)
    if value not in allowed:
        raise PlanFormError(f"{key} must be one of {', '.join(allowed)}, got {value!r:.40}")
    return str(value)


def _text(d: Mapping[str, Any], key: str, limit: int) -> str:
    value = d.get(key, "")
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise PlanFormError(f"{key} must be printable text of at most {limit} characters")
    return value


@dataclass(frozen=True)
class Stage:
    node_id: str
    start: int
    end: int
    memory: int  # bytes the stage holds: need(start, end, start == 0, end == num_layers)


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]

    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.stages]

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end if self.stages else 0

    def index_of(self, node_id: str) -> int | None:
        return next((i for i, s in enumerate(self.stages) if s.node_id == node_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [{"node_id": s.node_id, "start": s.start, "end": s.end, "memory": s.memory}
                           for s in self.stages]}

    @classmethod
    def from_dict(cls, d: object) -> Plan:
        """Parse a plan a peer sent; ``PlanFormError`` unless its stages tile [0, end) in order."""
        raw = d.get("stages") if isinstance(d, Mapping) else None
        if not isinstance(raw, list) or not raw:
            raise PlanFormError(f"a plan must be a mapping with a non-empty 'stages' list: {d!r:.200}")
        if len(raw) > MAX_STAGES:
            raise PlanFormError(f"a plan has at most {MAX_STAGES} stages, got {len(raw)}")
        stages: list[Stage] = []
        for i, s in enumerate(raw):
            if not isinstance(s, Mapping) or not all(k in s for k in ("node_id", "start", "end", "memory")):
                raise PlanFormError(f"plan stage {i} must have node_id, start, end and memory: {s!r:.200}")
            node_id, start, end, memory = s["node_id"], s["start"], s["end"], s["memory"]
            if not isinstance(node_id, str) or not node_id or len(node_id) > 64:
                raise PlanFormError(f"plan stage {i}: node_id must be a non-empty string: {node_id!r:.100}")
            for key, v, top in (("start", start, MAX_LAYERS), ("end", end, MAX_LAYERS),
                                ("memory", memory, MAX_MEMORY)):
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                    raise PlanFormError(f"plan stage {i}: {key} must be a non-negative int: {v!r:.100}")
            expected = stages[-1].end if stages else 0
            if start != expected:
                what = "leaves a gap" if start > expected else "overlaps the stage before"
                raise PlanFormError(f"plan stage {i} starts at layer {start}, {what}: expected {expected}")
            if end <= start:
                raise PlanFormError(f"plan stage {i} has no layers: [{start}, {end})")
            if any(x.node_id == node_id for x in stages):
                raise PlanFormError(f"plan stage {i}: node {node_id} already serves an earlier stage")
            stages.append(Stage(node_id, start, end, memory))
        return cls(tuple(stages))


def _strict_plan(value: Any) -> Plan:
    plan = Plan.from_dict(value)
    if not all(node_id_ok(s.node_id) for s in plan.stages):
        raise PlanFormError("every stage's node_id must be a node id (64 hex digits)")
    return plan


@dataclass(frozen=True)
class PlanRecord:
    """A loaded model's plan as published in the DHT (``plan/<model id>``), and the shape every
    stage of it was loaded with, so a driver that adopts it sends steps that fit."""

    model_id: str
    name: str
    epoch: int
    plan: Plan
    weights: str
    dtype: str
    max_context: int
    slots: int
    prefill_chunk: int
    # The memory line the plan was made with: (has_embedding, has_head, base, per_layer) per
    # case, so a driver that adopts the plan can repair it without computing it again.
    cost: tuple[tuple[bool, bool, int, int], ...] = ()
    # The KV cache's dtype on every stage; None: the compute dtype (what records from
    # nodes older than engine.kv_dtype meant).
    kv_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model_id, "name": self.name, "epoch": self.epoch, "plan": self.plan.to_dict(),
               "weights": self.weights, "dtype": self.dtype, "max_context": self.max_context,
               "slots": self.slots, "prefill_chunk": self.prefill_chunk}
        if self.cost:
            out["cost"] = [[int(e), int(h), b, p] for e, h, b, p in self.cost]
        if self.kv_dtype is not None:
            out["kv_dtype"] = self.kv_dtype
        return out


def _shape(d: Mapping[str, Any]) -> tuple[str, str, int, int, int]:
    return (_choice(d, "weights", WEIGHTS, "native"), _choice(d, "dtype", DTYPES, "float32"),
            _int(d, "max_context", 16, 1 << 20), _int(d, "slots", 1, 256), _int(d, "prefill_chunk", 16, 8192))


def parse_plan_record(value: Any, *, model_id: str | None = None) -> PlanRecord:
    """A plan record read from the DHT (any member may publish one: every field is checked)."""
    if not isinstance(value, Mapping):
        raise PlanFormError("a plan record must be a map")
    got = value.get("model")
    if not model_id_ok(got) or (model_id is not None and got != model_id):
        raise PlanFormError("a plan record must name its model (64 hex digits)")
    weights, dtype, context, slots, chunk = _shape(value)
    return PlanRecord(str(got), _text(value, "name", 128), _int(value, "epoch", 0, MAX_EPOCH),
                      _strict_plan(value.get("plan")), weights, dtype, context, slots, chunk,
                      _cost(value.get("cost")), _choice(value, "kv_dtype", DTYPES, dtype))


def _cost(value: Any) -> tuple[tuple[bool, bool, int, int], ...]:
    if value is None:
        return ()
    cases = {(e, h) for e in (0, 1) for h in (0, 1)}
    if not isinstance(value, list) or len(value) != 4:
        raise PlanFormError("cost must list the four (embedding, head) cases")
    out = []
    for row in value:
        if (not isinstance(row, list) or len(row) != 4
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in row)
                or (row[0], row[1]) not in cases or not -MAX_MEMORY <= row[2] <= MAX_MEMORY
                or not 0 <= row[3] <= MAX_MEMORY):
            raise PlanFormError("each cost case is [embedding 0|1, head 0|1, base bytes, bytes per layer]")
        cases.discard((row[0], row[1]))
        out.append((bool(row[0]), bool(row[1]), row[2], row[3]))
    if cases:
        raise PlanFormError("cost must list each (embedding, head) case once")
    return tuple(out)


@dataclass(frozen=True)
class LoadRequest:
    """``pipe.load``: serve stage ``index`` of ``record``'s plan. ``lease_ttl``: how long the
    sender's lease lasts unless renewed (``pipe.lease``); ``step_timeout``: what a stage
    waits for the next one before it reports it failed."""

    record: PlanRecord
    index: int
    step_timeout: float
    lease_ttl: float
    until: float = 0.0  # unix time the sender's keep_alive of the model runs out (0: not said)

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "index": self.index, "step_timeout": self.step_timeout,
                "lease_ttl": self.lease_ttl, "until": self.until}

    @property
    def stage(self) -> Stage:
        return self.record.plan.stages[self.index]

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == len(self.record.plan.stages) - 1


def parse_load(value: Any) -> LoadRequest:
    record = parse_plan_record(value)
    index = _int(value, "index", 0, len(record.plan.stages) - 1)
    return LoadRequest(record, index, _float(value, "step_timeout", 0.5, 3600.0, 60.0),
                       _float(value, "lease_ttl", 1.0, 3600.0, 30.0), _float(value, "until", 0.0, 1e11, 0.0))


@dataclass(frozen=True)
class StageView:
    """What a node says about its stage of a model (``pipe.lease``/``pipe.load``/``pipe.state``
    answers): the epoch and range it serves or is loading, its state, what went wrong."""

    model_id: str
    epoch: int
    start: int
    end: int
    state: str
    error: str = ""
    memory: int = 0
    sessions: int = 0
    load_s: float = 0.0
    compile_s: float = 0.0
    weights: str = "native"
    leased: bool = False  # the asking driver holds a lease on it

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_id, "epoch": self.epoch, "start": self.start, "end": self.end,
                "state": self.state, "error": self.error, "memory": self.memory, "sessions": self.sessions,
                "load_s": self.load_s, "compile_s": self.compile_s, "weights": self.weights,
                "leased": self.leased}


def parse_stage_view(value: Any) -> StageView:
    if not isinstance(value, Mapping) or not model_id_ok(value.get("model")):
        raise PlanFormError("a stage view must be a map naming its model")
    error = value.get("error") or ""
    if not isinstance(error, str):
        raise PlanFormError("error must be text")
    leased = value.get("leased", False)
    if not isinstance(leased, bool):
        raise PlanFormError("leased must be true or false")
    return StageView(
        str(value["model"]), _int(value, "epoch", 0, MAX_EPOCH), _int(value, "start", 0, MAX_LAYERS),
        _int(value, "end", 0, MAX_LAYERS), _choice(value, "state", STAGE_STATES),
        "".join(c if c.isprintable() else "?" for c in error[:500]), _int(value, "memory", 0, MAX_MEMORY, 0),
        _int(value, "sessions", 0, 1 << 16, 0), _float(value, "load_s", 0.0, 1e6, 0.0),
        _float(value, "compile_s", 0.0, 1e6, 0.0), _choice(value, "weights", WEIGHTS, "native"), leased)
