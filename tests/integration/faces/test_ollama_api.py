"""Ollama's API on a real three-node cluster: the official `ollama` client (chat, generate,
list, show, ps, pull) gets the single-process engine's greedy tokens; the NDJSON framing is
exact; reasoning goes to `thinking`; keep_alive and empty prompts load and unload as in
Ollama; what enjambre cannot do is refused with a clear 4xx in the API's own shape."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest

from node.engine.tokenizer import Tokenizer
from node.testing.tinymodel import make_tiny_model
from tests.helpers.faces import MODEL, Faces

ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "num_predict": 10}
HOLA = [{"role": "user", "content": "hola"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def client(faces: Faces) -> Any:
    return ollama.Client(host=faces.url())


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in data.split(b"\n") if x]


def test_chat_and_generate_with_the_official_client(faces: Faces) -> None:
    tok, c = faces.tokenizer, client(faces)
    want = tok.decode(faces.reference(tok.encode_chat(HOLA), 10, penalty=1.1))  # Ollama's repeat_penalty
    done = c.chat(MODEL, messages=HOLA, options=GREEDY)
    assert done.message.content == want and done.done and done.eval_count <= 10
    assert done.prompt_eval_count == len(tok.encode_chat(HOLA))
    streamed = list(c.chat(MODEL, messages=HOLA, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in streamed) == want and streamed[-1].done
    want_raw = tok.decode(faces.reference(tok.encode("el perro"), 10, penalty=1.1))
    assert c.generate(MODEL, "el perro", raw=True, options=GREEDY).response == want_raw
    with_lp = c.generate(MODEL, "el perro", raw=True, options=GREEDY, logprobs=True)
    assert len(with_lp.logprobs) == with_lp.eval_count and all(x.logprob <= 0 for x in with_lp.logprobs)


def test_list_show_ps_and_pull(faces: Faces, tmp_path: Path) -> None:
    c = client(faces)
    assert f"{MODEL}:latest" in [m.model for m in c.list().models] or MODEL in [m.model for m in c.list().models]
    shown = c.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "llama" and "<think>" in shown.template
    assert "thinking" in (shown.capabilities or [])
    (running,) = [m for m in c.ps().models if m.name == MODEL]
    assert running.context_length == 256 and running.expires_at is not None
    other = make_tiny_model(tmp_path / "pull-model", layers=1, hidden=32, intermediate=64, vocab_size=288)
    progress = list(c.pull(str(other), stream=True))
    assert progress[-1].status == "success" and len(progress) >= 2
    assert "pull-model" in [m.model.split(":")[0] for m in c.list().models]
    # modified_at is when the model came to the node (or was first seen), not the time of asking
    first = {m.model: m.modified_at for m in c.list().models}
    time.sleep(1.1)
    assert {m.model: m.modified_at for m in c.list().models} == first
    other_node = ollama.Client(host=f"http://{faces.nodes[2].api}")  # another node's view
    seen = {m.model: m.modified_at for m in other_node.list().models}
    time.sleep(1.1)
    assert seen and {m.model: m.modified_at for m in other_node.list().models} == seen


def test_ndjson_framing_is_exact(faces: Faces) -> None:
    status, data = faces.request("POST", "/api/chat", {"model": MODEL, "messages": HOLA, "options": GREEDY})
    assert status == 200 and data.endswith(b"}\n") and b"\n\n" not in data
    out = lines(data)
    assert all(not x["done"] and set(x["message"]) == {"role", "content"} for x in out[:-1])
    last = out[-1]
    assert last["done"] and last["done_reason"] in ("stop", "length") and last["message"]["content"] == ""
    assert {"total_duration", "load_duration", "prompt_eval_count", "eval_count", "eval_duration"} <= set(last)
    assert len(set(last["nodes"])) == 3
    status, data = faces.request("POST", "/api/generate", {"model": MODEL, "prompt": "x", "options": GREEDY,
                                                           "stream": False})
    assert status == 200 and json.loads(data)["done"] is True


def test_reasoning_goes_to_thinking_on_both_apis(faces: Faces) -> None:
    tok, c = faces.tokenizer, client(faces)
    # The template opens <think> when asked; a random model never closes it: all reasoning.
    prompt = tok.encode(tok.apply_chat_template(HOLA, enable_thinking=True), add_special_tokens=False)
    reasoning = tok.decode(faces.reference(prompt, 10, penalty=1.1))
    done = c.chat(MODEL, messages=HOLA, options=GREEDY, think=True)
    assert done.message.thinking == reasoning and done.message.content == ""
    parts = list(c.chat(MODEL, messages=HOLA, options=GREEDY, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == reasoning
    hidden = c.chat(MODEL, messages=HOLA, options=GREEDY, think=False)
    assert hidden.message.thinking is None
    assert hidden.message.content == tok.decode(faces.reference(tok.encode_chat(HOLA), 10, penalty=1.1))
    status, data = faces.request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": HOLA, "temperature": 0, "max_tokens": 10,
        "chat_template_kwargs": {"enable_thinking": True}})
    assert status == 200, data
    message = json.loads(data)["choices"][0]["message"]
    assert message["reasoning_content"] == tok.decode(faces.reference(prompt, 10)) and message["content"] == ""


def test_keep_alive_and_empty_prompts_load_and_unload(faces: Faces, tmp_path: Path) -> None:
    c = client(faces)
    assert c.generate(MODEL).done_reason == "load"  # already loaded: nothing to do
    c.chat(MODEL, messages=HOLA, options={"num_predict": 1}, keep_alive="10m")
    (entry,) = [m for m in c.ps().models if m.name == MODEL]
    left = entry.expires_at - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=9) < left <= dt.timedelta(minutes=10, seconds=5)
    c.generate(MODEL, keep_alive=-1)  # the shared cluster keeps it for the other tests
    (entry,) = [m for m in c.ps().models if m.name == MODEL]
    assert entry.expires_at.year > 2200
    small = make_tiny_model(tmp_path / "small-model", layers=1, hidden=32, intermediate=64, vocab_size=288)
    faces.nodectl("pull", str(small))
    assert c.generate("small-model", keep_alive=0).done_reason == "unload"  # not loaded: stays so
    assert "small-model" not in [m.name for m in c.ps().models]
    assert c.generate("small-model").done_reason == "load"
    _, ps = faces.request("GET", "/api/ps")
    (plan,) = [m["plan"] for m in json.loads(ps)["models"] if m["name"] == "small-model"]
    assert len(plan) == 1  # a model that fits on one node runs there, beside the first
    tok = Tokenizer.from_model_dir(small)
    want = tok.decode(faces.reference(tok.encode_chat(HOLA), 6, penalty=1.1, model_dir=small))
    done = c.chat("small-model", messages=HOLA, options=GREEDY | {"num_predict": 6}, keep_alive=0)
    assert done.message.content == want
    assert "small-model" not in [m.name for m in c.ps().models]
    assert MODEL in [m.name for m in c.ps().models]


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/api/chat", b"{nope", 400, "JSON"),
    ("/api/chat", {"model": "no-such", "messages": HOLA}, 404, "not found"),
    ("/api/chat", {"model": MODEL, "messages": HOLA, "format": "yaml"}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "nonsense"}}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": ["not", "a", "schema"]}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "images"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"}, 400, "template"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/chat", {"model": MODEL, "messages": HOLA, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("/api/chat", {"model": MODEL, "messages": HOLA, "keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/chat", {"model": MODEL, "messages": HOLA, "think": "maybe"}, 400, "think"),
    ("/api/chat", {"model": MODEL, "messages": HOLA, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {"model": MODEL, "messages": HOLA, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "a " * 400}]}, 400, "context"),
    ("/api/generate", {"model": MODEL, "prompt": 7}, 400, "prompt"),
    ("/api/embed", {"model": MODEL, "input": []}, 400, "input is an empty list"),
    ("/api/embed", {"model": MODEL, "input": "a " * 400, "truncate": False}, 400, "the context holds"),
    ("/api/embeddings", {"model": MODEL, "prompt": 3}, 400, "prompt must be a string"),
])
def test_bad_requests_get_clear_ollama_errors(faces: Faces, path: str, body: Any, status: int, needle: str) -> None:
    got, data = faces.request("POST", path, body)
    assert got == status, data
    error = json.loads(data)["error"]
    assert isinstance(error, str) and needle in error


def test_unknown_options_are_ignored_like_ollama(faces: Faces) -> None:
    got, data = faces.request("POST", "/api/generate", {
        "model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 2, "num_thread": 4,
                                                                  "mirostat": 1}})
    assert got == 200 and json.loads(data)["done"]


def test_refusals_on_openai_routes_have_openai_shape(faces: Faces) -> None:
    for path, body, headers, status in [
        ("/v1/embeddings", {"model": MODEL, "input": [1, True]}, {}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": HOLA}, {"Origin": "http://evil.example"}, 403),
        ("/v1/chat/completions", {"model": MODEL, "messages": HOLA, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, {}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": HOLA, "tools": [WEATHER],
                                  "tool_choice": {"type": "function", "function": {"name": "nope"}}}, {}, 400),
        ("/v1/chat/completions", {"model": MODEL, "messages": HOLA, "reasoning_effort": "max"}, {}, 400),
    ]:
        got, data = faces.request("POST", path, body, headers=headers)
        assert got == status, (path, data)
        error = json.loads(data)["error"]
        assert isinstance(error["message"], str) and error["type"], data
    got, data = faces.request("GET", "/api/tags", headers={"Origin": "http://evil.example"})
    assert got == 403 and isinstance(json.loads(data)["error"], str)
