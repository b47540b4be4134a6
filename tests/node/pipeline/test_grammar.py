"""Constrained sampling at the tail (node/pipeline/grammar.py and the stage that uses it): a
random model sampled at temperature 1 writes only what the grammar allows and stops where it
is complete; a session rebuilt after a failure, its tokens so far replayed into a fresh
matcher, goes on exactly as the undisturbed one; broken grammars and tokenizers are clear
errors."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.api.formats import json_grammar, tool_grammar
from node.api.tools import parse_tools
from node.engine import PartitionSpec, WeightSource, load_config, load_partition
from node.engine.tokenizer import Tokenizer
from node.pipeline.grammar import GrammarError, Grammars
from node.pipeline.stage import StageError, StageRunner
from node.testing.tinymodel import make_tiny_model
from protocol.pipeline import SamplingSpec, Step

jsonschema = pytest.importorskip("jsonschema")

MODEL = "c" * 64
OWNER = "a" * 64
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "w": {"enum": ["si", "no"]}},
          "required": ["n", "w"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Tokenizer, Path]:
    path = Path(make_tiny_model(tmp_path_factory.mktemp("g") / "tiny", layers=2, hidden=32, intermediate=64,
                                vocab_size=320))
    cfg = load_config(path)
    part = load_partition(WeightSource.from_dir(path), cfg, PartitionSpec.whole(cfg), dtype="float32",
                          max_context=160, prefill_chunk=32)
    return part, Tokenizer.from_model_dir(path), path


def _grammars(tiny: tuple[Any, Tokenizer, Path]) -> Grammars:
    part, _, path = tiny
    return Grammars(lambda: (path / "tokenizer.json").read_text(), part.config.vocab_size)


def _allowed(mask: np.ndarray) -> list[int]:
    return np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))[0].tolist()


def test_masks_follow_the_grammar_and_end_with_the_stops(tiny: tuple[Any, Tokenizer, Path]) -> None:
    _, tok, _ = tiny
    stops = sorted(tok.stop_token_ids)
    c = _grammars(tiny).start(json_grammar(SCHEMA), stops)
    first = _allowed(c.mask())
    assert first and all(tok.decode([t]).startswith("{") for t in first)
    for t in tok.encode('{"n": 7, "w": "si"}', add_special_tokens=False):
        assert t in _allowed(c.mask())
        c.consume(t)
    assert _allowed(c.mask()) == stops  # complete: only the end remains
    resumed = _grammars(tiny).start(json_grammar(SCHEMA), stops, tok.encode('{"n": 7', add_special_tokens=False))
    assert all(tok.decode([t])[:1] in ",0123456789" for t in _allowed(resumed.mask()))


def test_bad_grammars_and_tokenizers_are_clear_errors(tiny: tuple[Any, Tokenizer, Path]) -> None:
    _, tok, _ = tiny
    stops = sorted(tok.stop_token_ids)
    with pytest.raises(GrammarError, match="not valid"):
        _grammars(tiny).start("start: nope", stops)
    with pytest.raises(GrammarError, match="do not follow the grammar"):
        _grammars(tiny).start(json_grammar(SCHEMA), stops, tok.encode("hola", add_special_tokens=False))
    with pytest.raises(GrammarError, match="tokenizer cannot drive a grammar"):
        Grammars(lambda: "{not json", 320).start(json_grammar(SCHEMA), stops)


def _step(session: str, n: int, kind: str, start: int, ids: list[int], **extra: Any) -> Step:
    base: dict[str, Any] = dict(sampling=None, resume_step=0, seen=None, timeout=10.0)
    base.update(extra)
    return Step(MODEL, 1, session, n, kind, start, np.asarray(ids, np.int64), True, base["sampling"],
                base["resume_step"], base["seen"], base["timeout"], base.get("grammar"), base.get("stops", ()),
                base.get("emitted"))


async def _generate(r: StageRunner, session: str, prompt: list[int], grammar: str, stops: tuple[int, ...],
                    emitted: list[int] | None = None, most: int = 140) -> list[int]:
    """As the driver does: prefill (resumed past ``emitted`` when given), replay, then decode."""
    sampling = SamplingSpec(temperature=1.0, seed=11)
    out = list(emitted or [])
    first = await r.submit(_step(session, 0, "prefill", 0, prompt, sampling=sampling, grammar=grammar, stops=stops,
                                 resume_step=len(out), emitted=np.asarray(out, np.int64) if out else None), OWNER)
    n, pos = 1, len(prompt)
    if out:
        for t in out[:-1]:
            await r.submit(_step(session, n, "forced", pos, [t]), OWNER)
            n, pos = n + 1, pos + 1
    else:
        assert first.token is not None
        out.append(first.token)
    while out[-1] not in stops and len(out) < most:
        res = await r.submit(_step(session, n, "decode", pos, [out[-1]]), OWNER)
        assert res.token is not None
        out.append(res.token)
        n, pos = n + 1, pos + 1
    return out


def test_a_random_model_at_temperature_one_writes_valid_json_and_resumes_exactly(
    tiny: tuple[Any, Tokenizer, Path],
) -> None:
    part, tok, _ = tiny
    stops = tuple(sorted(tok.stop_token_ids))
    prompt = tok.encode("hola", add_special_tokens=False)

    async def go() -> None:
        r = StageRunner(part, slots=4, executor=ThreadPoolExecutor(1), session_idle=60, grammars=_grammars(tiny))
        r.start()
        try:
            whole = await _generate(r, "00000001", prompt, json_grammar(SCHEMA), stops)
            assert whole[-1] in stops
            jsonschema.validate(json.loads(tok.decode(whole[:-1])), SCHEMA)
            # the node died after 5 tokens: a new session replays them and goes on the same way
            again = await _generate(r, "00000002", prompt, json_grammar(SCHEMA), stops, emitted=whole[:5])
            assert again == whole
            call = tool_grammar(parse_tools([{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]),
                                "hermes")
            text = tok.decode((await _generate(r, "00000003", prompt, call, stops))[:-1])
            assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
            body = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
            assert body["name"] == "f"
            jsonschema.validate(body["arguments"], SCHEMA)
            with pytest.raises(StageError) as info:
                await _generate(r, "00000004", prompt, "start: nope", stops)
            assert info.value.code == "bad_grammar"
        finally:
            await r.close()

    asyncio.run(go())
