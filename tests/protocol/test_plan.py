"""The plan wire forms peers exchange: plans, plan records, load requests, stage views,
step answers and model references. Each rejects what breaks its rules with a message that
says what was wrong, before anyone uses a number a peer sent."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from protocol.pipeline import PipelineMessageError, parse_model_ref, parse_step_reply
from protocol.plan import (
    MAX_STAGES,
    LoadRequest,
    Plan,
    PlanFormError,
    PlanRecord,
    Stage,
    StageView,
    parse_load,
    parse_plan_record,
    parse_stage_view,
)

A, B = "a" * 64, "b" * 64
MODEL = "c" * 64


def _stages(*spans: tuple[Any, Any, Any]) -> dict[str, Any]:
    return {"stages": [{"node_id": i, "start": s, "end": e, "memory": 1} for i, s, e in spans]}


def _drop(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(d: dict[str, Any]) -> dict[str, Any]:
        del d["stages"][0][key]
        return d

    return edit


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (_stages(("a", 0, 4), ("b", 5, 8)), "leaves a gap"),
        (_stages(("a", 0, 4), ("b", 3, 8)), "overlaps"),
        (_stages(("a", 1, 4)), "expected 0"),
        (_stages(("a", 0, 0)), "no layers"),
        (_stages(("a", 0, 4), ("a", 4, 8)), "already serves"),
        (_stages(("a", "0", 4)), "start must be a non-negative int"),
        (_stages(("a", 0, True)), "end must be a non-negative int"),
        (_stages((7, 0, 4)), "node_id must be a non-empty string"),
        (_drop("memory")(_stages(("a", 0, 4))), "must have node_id, start, end and memory"),
        ({"stages": []}, "non-empty 'stages' list"),
        ({"stages": "a"}, "non-empty 'stages' list"),
        ([1, 2], "non-empty 'stages' list"),
        ({"stages": [None]}, "must have node_id"),
    ],
)
def test_from_dict_rejects(data: object, fragment: str) -> None:
    with pytest.raises(PlanFormError) as err:
        Plan.from_dict(data)
    assert fragment in str(err.value)


def test_from_dict_ignores_extra_keys() -> None:
    d = _stages(("a", 0, 4))
    d["stages"][0]["future"] = 1
    assert Plan.from_dict(d) == Plan((Stage("a", 0, 4, 1),))




def record(**change: Any) -> dict[str, Any]:
    good = PlanRecord(MODEL, "tiny", 7, Plan((Stage(A, 0, 4, 10), Stage(B, 4, 8, 20))), "native", "float32",
                      256, 4, 32).to_dict()
    good.update(change)
    return good


def test_plan_record_round_trip() -> None:
    r = parse_plan_record(record())
    assert r.epoch == 7 and r.plan.num_layers == 8 and r.plan.index_of(B) == 1
    assert parse_plan_record(r.to_dict(), model_id=MODEL) == r


def test_plan_record_carries_the_kv_dtype_and_a_record_without_one_means_the_compute_dtype() -> None:
    r = parse_plan_record(record(kv_dtype="float16"))
    assert r.kv_dtype == "float16" and r.dtype == "float32"
    assert parse_plan_record(r.to_dict()) == r
    # Nodes older than engine.kv_dtype held the cache in the compute dtype and sent no key.
    assert "kv_dtype" not in record()
    assert parse_plan_record(record(dtype="bfloat16")).kv_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"model": "x"}, "name its model"),
        ({"epoch": 2**64 - 1}, "epoch must be an integer"),
        ({"epoch": -1}, "epoch must be an integer"),
        ({"epoch": True}, "epoch must be an integer"),
        ({"max_context": math.nan}, "max_context"),
        ({"slots": 0}, "slots"),
        ({"weights": "int4"}, "weights must be one of"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"kv_dtype": "auto"}, "kv_dtype must be one of"),
        ({"name": "a\x1bb"}, "printable"),
        ({"plan": {"stages": [{"node_id": "short", "start": 0, "end": 8, "memory": 1}]}}, "64 hex digits"),
        ({"plan": {"stages": [{"node_id": f"{i:064x}", "start": i, "end": i + 1, "memory": 1}
                              for i in range(MAX_STAGES + 1)]}}, "at most"),
        ({"plan": {"stages": [{"node_id": A, "start": 0, "end": 8, "memory": 2**60}]}}, "memory"),
    ],
)
def test_plan_record_rejects(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PlanFormError, match=fragment):
        parse_plan_record(record(**change))


def test_plan_record_of_another_model_is_refused() -> None:
    with pytest.raises(PlanFormError):
        parse_plan_record(record(), model_id="d" * 64)


def test_load_request() -> None:
    req = parse_load({**record(), "index": 1, "step_timeout": 20.0, "lease_ttl": 30})
    assert isinstance(req, LoadRequest) and req.stage.node_id == B and req.last and not req.first
    assert parse_load(req.to_dict()) == req
    for bad in ({"index": 2}, {"index": -1}, {"lease_ttl": math.inf}, {"lease_ttl": math.nan},
                {"step_timeout": 0}, {"keep_alive": 1, "index": "0"}):
        with pytest.raises(PlanFormError):
            parse_load({**record(), "index": 0, **bad})


def test_stage_view() -> None:
    view = StageView(MODEL, 3, 0, 4, "ready", memory=5, sessions=1, leased=True)
    assert parse_stage_view(view.to_dict()) == view
    for bad in ({"state": "dancing"}, {"epoch": "1"}, {"memory": -1}, {"load_s": math.nan}, {"leased": 1}):
        with pytest.raises(PlanFormError):
            parse_stage_view({**view.to_dict(), **bad})
    assert parse_stage_view({**view.to_dict(), "error": "a\nb"}).error == "a?b"


def test_step_reply() -> None:
    assert parse_step_reply({"token": 5, "logprob": -0.5}, vocab_size=10).token == 5
    assert parse_step_reply({"token": None, "logprob": None}, vocab_size=10).token is None
    for bad in ({"token": 10, "logprob": 0.0}, {"token": -1, "logprob": 0.0}, {"token": True, "logprob": 0.0},
                {"token": 1, "logprob": math.nan}, {"token": 1, "logprob": 3.0}, {"token": 1}, [1]):
        with pytest.raises(PipelineMessageError):
            parse_step_reply(bad, vocab_size=10)


def test_model_ref() -> None:
    assert parse_model_ref({"model": MODEL}).model_id == MODEL
    assert parse_model_ref({"model": MODEL, "session": "ab" * 8}, session=True).session == "ab" * 8
    lease = parse_model_ref({"model": MODEL, "epoch": 4, "ttl": 10}, lease=True)
    assert lease.epoch == 4 and lease.ttl == 10.0
    for body, kw in (({"model": "x"}, {}), ({"model": MODEL}, {"session": True}),
                     ({"model": MODEL, "ttl": math.nan}, {"lease": True}),
                     ({"model": MODEL, "epoch": 2**63}, {"lease": True})):
        with pytest.raises(PipelineMessageError):
            parse_model_ref(body, **kw)
