"""A driver's verdict on a published plan from its stages' answers (table-driven)."""

from __future__ import annotations

import pytest

from node.pipeline.planner import Pin
from node.pipeline.verdict import judge
from protocol.plan import Plan, PlanRecord, Stage, StageView

MODEL = "c" * 64
A, B, C = "a" * 64, "b" * 64, "e" * 64
RECORD = PlanRecord(MODEL, "m", 10, Plan((Stage(A, 0, 2, 1), Stage(B, 2, 4, 1), Stage(C, 4, 6, 1))), "native",
                    "float32", 256, 4, 32)


def v(state: str, epoch: int = 10) -> StageView:
    return StageView(MODEL, epoch, 0, 0, state)


READY = v("ready")


@pytest.mark.parametrize(
    ("views", "kind", "keep", "broken"),
    [
        ([READY, READY, READY], "ready", (), ()),
        ([READY, v("compiling"), READY], "wait", (), ()),
        ([READY, v("ready", epoch=11), READY], "newer", (), ()),  # a newer plan: use it
        ([None, v("loading", epoch=11), READY], "newer", (), ()),  # even with a stage gone
        ([READY, v("none", epoch=3), READY], "wait", (), ()),  # not asked yet: within the grace
        ([READY, None, READY], "repair", (Pin(A, 0, 2), Pin(C, 4, 6)), (B,)),  # no answer
        ([READY, v("failed"), READY], "repair", (Pin(A, 0, 2), Pin(C, 4, 6)), (B,)),
        ([READY, v("none", epoch=10), READY], "repair", (Pin(A, 0, 2), Pin(C, 4, 6)), ()),  # let it go
        ([v("draining"), v("draining"), v("draining")], "repair", (), ()),  # stopped by someone
        ([None, v("loading"), READY], "repair", (Pin(B, 2, 4), Pin(C, 4, 6)), (A,)),
    ],
)
def test_verdicts(views: list[StageView | None], kind: str, keep: tuple[Pin, ...], broken: tuple[str, ...]) -> None:
    got = judge(RECORD, views, {}, now=100.0, grace=10.0)
    assert (got.kind, got.keep, got.broken) == (kind, keep, broken)


def test_a_stage_that_never_hears_of_the_plan_is_gone_after_the_grace() -> None:
    seen: dict[str, float] = {}
    views = [READY, v("none", epoch=3), READY]
    assert judge(RECORD, views, seen, now=100.0, grace=10.0).kind == "wait"
    assert judge(RECORD, views, seen, now=109.0, grace=10.0).kind == "wait"
    late = judge(RECORD, views, seen, now=110.0, grace=10.0)
    assert late.kind == "repair" and late.gone == (B,) and late.broken == ()


def test_what_is_waited_for_is_said() -> None:
    got = judge(RECORD, [READY, v("compiling"), READY], {}, now=0.0, grace=10.0)
    assert got.detail == "waiting for layers 2-4 (compiling)" and set(got.answered) == {A, B, C}
