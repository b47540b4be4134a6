"""protocol/pipeline.py: every field of a step a peer sends is checked and bounded."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from protocol.pipeline import (
    MAX_GRAMMAR_CHARS,
    MAX_STEP_TOKENS,
    PipelineMessageError,
    parse_sampling,
    parse_step,
)

H, V, CTX = 8, 100, 64
MODEL = "ab" * 32


def body(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": MODEL, "epoch": 3, "session": "00ff00ff00ff", "step": 0, "kind": "prefill",
                            "start": 0, "inputs": np.arange(5, dtype=np.int64), "last": True}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def parse(b: Any, first: bool = True) -> Any:
    return parse_step(b, first=first, hidden_size=H, vocab_size=V, max_context=CTX)


def test_a_good_first_stage_prefill() -> None:
    step = parse(body(sampling={"temperature": 0.5, "seed": 7}, seen=np.array([1, 2], np.int32)))
    assert step.kind == "prefill" and step.inputs.dtype == np.int64 and step.inputs.tolist() == [0, 1, 2, 3, 4]
    assert step.sampling is not None and step.sampling.temperature == 0.5 and step.sampling.seed == 7
    assert step.seen is not None and step.seen.tolist() == [1, 2]


def test_hidden_states_at_later_stages() -> None:
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        step = parse(body(inputs=np.zeros((3, H), dtype)), first=False)
        assert step.inputs.shape == (3, H)


@pytest.mark.parametrize(("over", "first", "needle"), [
    ({"model": "x"}, True, "model must be"),
    ({"session": "../../etc"}, True, "session must be"),
    ({"kind": "explode"}, True, "kind must be"),
    ({"epoch": -1}, True, "epoch must be"),
    ({"step": True}, True, "step must be"),
    ({"start": CTX}, True, "start must be"),
    ({"inputs": [1, 2, 3]}, True, "token ids"),
    ({"inputs": np.array([1.5])}, True, "token ids"),
    ({"inputs": np.array([V])}, True, f"[0, {V})"),
    ({"inputs": np.array([-1])}, True, f"[0, {V})"),
    ({"inputs": np.zeros(0, np.int64)}, True, "1 to"),
    ({"inputs": np.zeros((2, H + 1), np.float32)}, False, "hidden states"),
    ({"inputs": np.zeros((2, H), np.int32)}, False, "hidden states"),
    ({"inputs": np.zeros((2, 2, H), np.float32)}, False, "hidden states"),
    ({"inputs": np.array([[0.0] * (H - 1) + [np.nan]], np.float32)}, False, "finite"),
    ({"inputs": np.full((2, H), np.inf, np.float16)}, False, "finite"),
    ({"inputs": np.full((1, H), -np.inf, ml_dtypes.bfloat16)}, False, "finite"),
    ({"kind": "decode", "inputs": np.array([1, 2])}, True, "exactly one token"),
    ({"start": CTX - 2}, True, "exceed the context"),
    ({"last": "yes"}, True, "last must be"),
    ({"seen": np.array([[1]])}, True, "seen must be"),
    ({"seen": np.array([V + 5])}, True, "seen token ids"),
    ({"timeout": 1e9}, True, "timeout must be"),
    ({"sampling": {"temperature": float("nan")}}, True, "temperature"),
    ({"sampling": {"top_p": 0}}, True, "top_p"),
    ({"sampling": {"repetition_penalty": 0}}, True, "repetition_penalty"),
    ({"sampling": {"seed": 2**40}}, True, "seed"),
    ({"sampling": "greedy"}, True, "sampling must be"),
    ({"grammar": "start: x", "stops": np.array([1])}, True, "comes with the sampling"),
    ({"sampling": {}, "grammar": ""}, True, "grammar must be a text"),
    ({"sampling": {}, "grammar": 5}, True, "grammar must be a text"),
    ({"sampling": {}, "grammar": "x" * (MAX_GRAMMAR_CHARS + 1), "stops": np.array([1])}, True, "grammar must be"),
    ({"sampling": {}, "grammar": "start: x"}, True, "needs the stop tokens"),
    ({"sampling": {}, "grammar": "start: x", "stops": np.array([V])}, True, "stops token ids"),
    ({"sampling": {}, "grammar": "start: x", "stops": np.arange(65) % V}, True, "at most 64"),
    ({"sampling": {}, "grammar": "start: x", "stops": np.array([1]), "emitted": np.arange(CTX + 1) % V}, True,
     f"at most {CTX}"),
    ({"sampling": {}, "grammar": "start: x", "stops": np.array([1]), "emitted": np.array([1.5])}, True,
     "emitted must be"),
])
def test_bad_steps_are_refused_with_a_reason(over: dict[str, Any], first: bool, needle: str) -> None:
    with pytest.raises(PipelineMessageError) as info:
        parse(body(**over), first=first)
    assert needle in str(info.value)


def test_not_a_map() -> None:
    with pytest.raises(PipelineMessageError, match="must be a map"):
        parse([1, 2])


def test_token_count_is_bounded_before_any_work() -> None:
    big = np.zeros(MAX_STEP_TOKENS + 1, np.int64)
    with pytest.raises(PipelineMessageError, match="1 to"):
        parse_step(body(inputs=big), first=True, hidden_size=H, vocab_size=V, max_context=1 << 20)


def test_sampling_defaults_are_greedy() -> None:
    spec = parse_sampling({})
    assert spec.temperature == 0.0 and spec.top_k == 0 and spec.top_p == 1.0 and spec.repetition_penalty == 1.0


def test_a_grammar_rides_with_the_last_chunk() -> None:
    step = parse(body(sampling={}, grammar="start: x", stops=np.array([3, 1]), emitted=np.array([4, 5], np.int32)))
    assert step.grammar == "start: x" and step.stops == (3, 1)
    assert step.emitted is not None and step.emitted.tolist() == [4, 5] and step.emitted.dtype == np.int64
    assert parse(body()).grammar is None


def test_embed_steps_carry_a_chunk_of_an_input() -> None:
    step = parse(body(kind="embed", last=None))
    assert step.kind == "embed" and step.inputs.size == 5 and step.last is False  # a chunk unless told
    assert parse(body(kind="embed", inputs=np.zeros((4, H), np.float32)), first=False).last is True
    with pytest.raises(PipelineMessageError, match="exceed the context"):
        parse(body(kind="embed", start=60))
    with pytest.raises(PipelineMessageError, match="1 to"):
        parse(body(kind="embed", inputs=np.zeros(0, np.int64)))


def test_an_embedding_answer_is_checked_before_use() -> None:
    from protocol.pipeline import parse_step_reply

    vec = np.zeros(H, np.float32)
    vec[2] = 1.0
    got = parse_step_reply({"token": None, "logprob": None, "embedding": vec}, vocab_size=V, hidden_size=H)
    assert got.embedding is not None and got.embedding.tolist() == vec.tolist()
    assert got.to_dict()["embedding"] is vec
    nan = vec.copy()
    nan[0] = np.nan
    for bad, why in ((np.ones(H + 1, np.float32) / np.sqrt(H + 1), "float32 tensor"),
                     (vec.astype(np.float64), "float32 tensor"), (vec.tolist(), "float32 tensor"),
                     (nan, "finite"), (vec * 3, "unit length")):
        with pytest.raises(PipelineMessageError, match=why):
            parse_step_reply({"embedding": bad}, vocab_size=V, hidden_size=H)
    with pytest.raises(PipelineMessageError, match="cannot carry"):  # not asked for one
        parse_step_reply({"embedding": vec}, vocab_size=V)
