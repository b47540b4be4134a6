"""What is loaded in the cluster, as ``ps`` shows it on every node: from the published records.

Each node's directory record lists the stages it serves (worker.py ``serving``); grouping
them by model and epoch gives every loaded model's plan, with the nodes' names, so every
node answers ``ps`` the same, whichever node loaded the model. The driver's own table adds
what only it knows: a model being recovered right now. ``models_view`` is pure.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from protocol.plan import WEIGHTS

if TYPE_CHECKING:
    from node.pipeline.models import LoadedModels, Model

__all__ = ["models_view", "ps_entries"]

FOREVER = 1e10  # an expiry this far is "never": Ollama shows a date centuries ahead


def _count(entry: Mapping[str, Any], key: str, top: int = 1 << 50) -> int | None:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        return None
    return value


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(seconds, FOREVER)))


def models_view(members: Mapping[str, Mapping[str, Any]], local: Mapping[str, Model], *, now: float,
                keep_alive: Callable[[Model], float] = lambda m: 300.0) -> list[dict[str, Any]]:
    """Ollama's /api/ps entries (plus each model's plan) from the members' records. A model
    stays until the last of its drivers' keep_alive runs out (the stages publish it)."""
    stages: dict[str, dict[int, list[tuple[str, Mapping[str, Any]]]]] = {}
    for node_id, record in members.items():
        if record.get("state") == "leaving":
            continue
        for entry in record.get("serving") or []:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
                continue
            epoch = _count(entry, "epoch", 1 << 62)
            if epoch is None or _count(entry, "start") is None or _count(entry, "end") is None:
                continue
            stages.setdefault(entry["model"], {}).setdefault(epoch, []).append((node_id, entry))
    names = {nid: str(r.get("name", nid[:12])) for nid, r in members.items()}
    out = []
    for model_id in sorted(set(stages) | set(local)):
        m = local.get(model_id)
        plan = _complete(stages.get(model_id, {}), m)
        if plan is None and m is None:
            continue
        if plan is None and m is not None:
            plan = [(s.node_id, {"start": s.start, "end": s.end, "memory": s.memory, "sessions": len(m.sessions),
                                 "name": m.name, "context": m.max_context, "weights": m.weights})
                    for s in m.plan.stages]
        assert plan is not None
        head = plan[0][1] if plan else {}
        name = m.name if m is not None else str(head.get("name") or model_id[:12])
        weights = str(head.get("weights")) if head.get("weights") in WEIGHTS else "native"
        expires = [float(e["expires_at"]) for _, e in plan
                   if isinstance(e.get("expires_at"), int | float) and not isinstance(e.get("expires_at"), bool)]
        if m is not None:  # this driver's own keep_alive is known here at once
            expires.append(now + max(0.0, m.used_at + min(FOREVER, keep_alive(m)) - time.monotonic()))
        family = str(head.get("family") or (m.config.architecture if m is not None else ""))[:32]
        out.append({
            "name": name, "model": name, "digest": model_id,
            "size": sum(_count(e, "memory") or 0 for _, e in plan), "size_vram": 0,
            "expires_at": _iso(max(expires, default=now)),
            "details": {"family": family, "parameter_size": "",
                        "quantization_level": _quantization(weights, m)},
            "context_length": _count(head, "context", 1 << 24) or (m.max_context if m else 0),
            "weights": weights, "sessions": _count(head, "sessions", 1 << 16) or 0,
            "epoch": m.epoch if m is not None and m.plan.stages else _count(head, "epoch", 1 << 62) or 0,
            "status": m.status if m is not None else "",
            "plan": [{"node_id": nid, "node": names.get(nid, nid[:12]), "start": e.get("start"), "end": e.get("end"),
                      "memory": _count(e, "memory") or 0} for nid, e in plan],
        })
    return out


def _quantization(weights: str, m: Model | None) -> str:
    """int8, else a GGUF's commonest matrix type (its blocks are what the nodes hold, on CPU),
    else the compute dtype."""
    if weights == "int8":
        return "int8"
    if m is None:
        return ""
    types = Counter(t for _, t in getattr(m.config, "matrix_types", ()))  # BERT's config has none
    return types.most_common(1)[0][0] if types else str(m.dtype)


def _complete(by_epoch: Mapping[int, list[tuple[str, Mapping[str, Any]]]],
              m: Model | None) -> list[tuple[str, Mapping[str, Any]]] | None:
    """The newest epoch whose stages tile the model's layers, in layer order; on the node
    that drives the model, none older than its own plan (a dead member's record outlives
    it by the record TTL, and its epoch still tiles: ps would show the plan it left)."""
    for epoch in sorted(by_epoch, reverse=True):
        if m is not None and m.plan.stages and epoch < m.epoch:
            break
        chain = sorted(by_epoch[epoch], key=lambda x: int(x[1]["start"]))
        layers = _count(chain[-1][1], "layers") or (m.config.num_layers if m is not None else None)
        at = 0
        for _, e in chain:
            if int(e["start"]) != at:
                break
            at = int(e["end"])
        else:
            if layers is None or at == layers:
                return chain
    return None


async def ps_entries(loaded: LoadedModels) -> list[dict[str, Any]]:
    return models_view(await loaded.members(), dict(loaded.table), now=time.time(),
                       keep_alive=loaded.keep_alive_of)
