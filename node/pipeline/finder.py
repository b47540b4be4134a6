"""Finding a model's plan in the cluster and asking its stages about it.

``newest`` reads the published plan records (plans.py) and, when none is found (expired,
not spread yet), asks a node the directory lists as serving the model for the plan it
serves (``pipe.plan``): a loaded model must never look unloaded, or a second entry node
would plan it again. ``probe`` asks each stage of a plan for its view (``pipe.lease``,
which also renews the asker's lease and tells the stage when the asker's keep_alive ends).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from node.cluster.peers import PeerUnknown
from node.net.errors import RemoteError, RequestRefused, TransportError
from node.pipeline.plans import PlanDHT, epoch_from_future, read_plans
from protocol.plan import PlanFormError, PlanRecord, StageView, parse_plan_record, parse_stage_view

__all__ = ["LEASE_TTL", "PROBE_TIMEOUT", "PlanFinder"]

log = structlog.get_logger("node.pipeline")

LEASE_TTL = 30.0
PROBE_TIMEOUT = 5.0

Members = Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]


class Requester(Protocol):
    async def request(self, node_id: str, method: str, body: Any, *, timeout: float) -> Any: ...  # noqa: ASYNC109


class PlanFinder:
    def __init__(self, dht: PlanDHT, peers: Requester, members: Members) -> None:
        self.dht, self.peers, self.members = dht, peers, members

    async def newest(self, model_id: str, *, weights: str, layers: int,
                     current: PlanRecord | None = None) -> PlanRecord | None:
        """The newest plan of the model held as ``weights`` (or ``current`` if none is newer)."""
        try:
            records = [r for r in await read_plans(self.dht, model_id)
                       if r.weights == weights and r.plan.num_layers == layers]
        except Exception as exc:  # the DHT is best effort here: without it, our own plan stands
            log.info("plan_lookup_failed", model=model_id[:12], error=f"{type(exc).__name__}: {exc}")
            records = []
        if not records:
            found = await self.from_stages(model_id, weights=weights, layers=layers)
            records = [found] if found is not None else []
        if current is not None and all(r.epoch < current.epoch for r in records):
            return current
        return records[0] if records else current

    async def from_stages(self, model_id: str, *, weights: str, layers: int) -> PlanRecord | None:
        """The plan the directory says nodes serve the model with, asked of one of its stages."""
        members = await self.members()
        serving = sorted(((int(e["epoch"]), nid) for nid, r in members.items() for e in r.get("serving") or []
                          if isinstance(e, dict) and e.get("model") == model_id
                          and isinstance(e.get("epoch"), int) and not isinstance(e.get("epoch"), bool)),
                         reverse=True)
        for epoch, node in serving[:2]:
            record = await self.plan_of([node], model_id)
            if record is not None and record.epoch == epoch and record.weights == weights and \
                    record.plan.num_layers == layers:
                return record
        return None

    async def plan_of(self, nodes: Sequence[str], model_id: str) -> PlanRecord | None:
        """The newest plan record one of ``nodes`` serves or loads the model with (asked in turn)."""
        for node in nodes[:3]:
            try:
                answer = await self.peers.request(node, "pipe.plan", {"model": model_id}, timeout=PROBE_TIMEOUT)
                record = parse_plan_record(answer, model_id=model_id) if answer else None
                if record is not None and not epoch_from_future(record.epoch):
                    return record
            except Exception as exc:  # gone, or an answer that does not parse: try the next one
                log.info("stage_plan_unreadable", model=model_id[:12], node=node[:12],
                         error=f"{type(exc).__name__}: {exc}")
        return None

    async def probe(self, record: PlanRecord, until: float | None = None) -> list[StageView | None]:
        """Each stage's view of ``record``'s model (leasing it), None where it did not answer."""

        async def one(node: str) -> StageView | None:
            body: dict[str, Any] = {"model": record.model_id, "epoch": record.epoch, "ttl": LEASE_TTL}
            if until is not None:
                body["until"] = until
            try:
                return parse_stage_view(await self.peers.request(node, "pipe.lease", body, timeout=PROBE_TIMEOUT))
            except (RemoteError, RequestRefused, TransportError, PeerUnknown, OSError, TimeoutError,
                    PlanFormError) as exc:
                log.info("stage_probe_failed", model=record.model_id[:12], node=node[:12],
                         error=f"{type(exc).__name__}: {exc}")
                return None

        return list(await asyncio.gather(*(one(s.node_id) for s in record.plan.stages)))
