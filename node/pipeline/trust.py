"""Who a driver lets serve, and what it takes from the members' claims when it plans.

The operator decides who may serve at all (``cluster.allow`` / ``cluster.deny``, by node id
or name: ``may_serve``); what a member says it lends and how fast it is counts only as far
as node/cluster/claims.py believes it, and its speed no further than the driver's probe
measured (node/cluster/speed.py) (``offers``). Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from node.cluster.claims import capped
from node.pipeline.planner import NodeOffer

__all__ = ["may_serve", "offers"]


def may_serve(node_id: str, name: str, allow: Collection[str], deny: Collection[str]) -> bool:
    """Whether the operator lets this node serve (ids are what a member cannot fake; a name
    is whatever the member says it is, so lists of names keep out only the honest)."""
    if node_id in deny or name in deny:
        return False
    return not allow or node_id in allow or name in allow


def offers(records: Mapping[str, Mapping[str, Any]], model_id: str, *, allow: Collection[str] = (),
           deny: Collection[str] = (), believed: Callable[[str, float], float] = lambda _n, t: t,
           barred: Collection[str] = ()) -> list[NodeOffer]:
    """The ready members the operator lets serve (and no member ``barred``: caught answering
    a speed probe wrongly), each offering what it lends (capped) less what its other models'
    layers hold (a second model is planned around the first), at the speed ``believed``
    makes of its capped claim (node/cluster/speed.py: bounded by what was measured)."""

    def held(r: Mapping[str, Any]) -> int:
        return sum(int(e.get("memory", 0)) for e in r.get("serving") or [] if e.get("model") != model_id)

    out = []
    for pid, r in records.items():
        name = str(r.get("name", pid[:12]))
        if r.get("state") != "ready" or not may_serve(pid, name, allow, deny) or pid in barred:
            continue
        memory, tflops = capped(r)
        out.append(NodeOffer(pid, name, max(0, memory - held(r)), believed(pid, tflops),
                             dict(r.get("rtt_ms") or {})))
    return out
