"""What a driver makes of a published plan after asking its stages: use it, wait, or repair it.

Pure: the plan record, each stage's answer (None: no answer), when each stage was first
seen not knowing the plan, and the time in; a ``Verdict`` out. A stage that serves the
plan (or is loading it) is kept; one that did not answer, could not load it, or let go of
it (stopped, unloaded, replaced: it remembers the epoch it let go of) is gone; one that
has not heard of the plan yet is waited for ``grace`` seconds (its driver is still asking
it). A stage that already serves a newer plan wins over everything else: that plan is
what to use (``newer``: ask those stages for it), not this one to repair.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from node.pipeline.planner import Pin
from protocol.plan import PlanRecord, StageView

__all__ = ["LOADING_STATES", "Verdict", "judge"]

LOADING_STATES = ("fetching", "loading", "compiling")


@dataclass(frozen=True)
class Verdict:
    kind: str  # "ready" | "wait" | "repair" | "newer"
    keep: tuple[Pin, ...] = ()  # when repairing: the stages that still serve, pinned to their ranges
    gone: tuple[str, ...] = ()  # stages to re-plan without
    broken: tuple[str, ...] = ()  # of those, the ones that did not answer or failed to load
    answered: tuple[str, ...] = ()  # stages that serve or load the plan (alive, whatever was thought)
    detail: str = ""  # what is being waited for
    newer: tuple[str, ...] = ()  # stages that serve (or load) a newer plan: ask them for it


def judge(record: PlanRecord, views: Sequence[StageView | None], first_seen_none: MutableMapping[str, float],
          *, now: float, grace: float) -> Verdict:
    keep: list[Pin] = []
    gone: list[str] = []
    broken: list[str] = []
    answered: list[str] = []
    waiting: list[str] = []
    newer: list[str] = []
    detail = ""
    for stage, view in zip(record.plan.stages, views, strict=True):
        node = stage.node_id
        if view is None:
            gone.append(node)
            broken.append(node)
        elif view.epoch > record.epoch and view.state in ("ready", *LOADING_STATES):
            newer.append(node)
        elif view.epoch == record.epoch and view.state in ("ready", *LOADING_STATES):
            answered.append(node)
            keep.append(Pin(node, stage.start, stage.end))
            if view.state != "ready":
                waiting.append(node)
                detail = f"waiting for layers {stage.start}-{stage.end} ({view.state})"
        elif view.state == "none" and view.epoch < record.epoch and \
                now - first_seen_none.setdefault(node, now) < grace:
            waiting.append(node)
            detail = detail or f"waiting for layers {stage.start}-{stage.end} (not started)"
        else:
            gone.append(node)
            if view.state == "failed":
                broken.append(node)
    if newer:
        return Verdict("newer", answered=tuple(answered), detail="a newer plan of the model exists", newer=tuple(newer))
    if gone:
        return Verdict("repair", tuple(keep), tuple(gone), tuple(broken), tuple(answered))
    return Verdict("wait" if waiting else "ready", answered=tuple(answered), detail=detail)
