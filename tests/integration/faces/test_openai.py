"""OpenAI's API on a real three-node cluster: the official `openai` client (chat and completions,
streaming and not, usage) gets the engine's greedy tokens; the raw SSE framing is exact;
bad requests get 4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from tests.helpers.attacker import metric
from tests.helpers.faces import MODEL, Faces

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


def client(faces: Faces) -> Any:
    return openai.OpenAI(base_url=faces.url("/v1"), api_key="unused", max_retries=0)


def test_chat_with_the_official_client(faces: Faces) -> None:
    tok = faces.tokenizer
    messages = [{"role": "user", "content": "hola"}]
    want = tok.decode(faces.reference(tok.encode_chat(messages), 12))
    c = client(faces)
    done = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    assert done.choices[0].message.content == want
    assert done.usage.prompt_tokens == len(tok.encode_chat(messages))
    assert done.usage.completion_tokens <= 12 and done.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert "faces-model:latest" in [m.id for m in c.models.list().data]
    assert c.models.retrieve(MODEL).id == MODEL


def test_completions_and_logprobs(faces: Faces) -> None:
    tok = faces.tokenizer
    want_ids = faces.reference(tok.encode("el perro"), 8)
    c = client(faces)
    done = c.completions.create(model=MODEL, prompt="el perro", temperature=0, max_tokens=8, logprobs=1)
    assert done.choices[0].text == tok.decode(want_ids)
    lp = done.choices[0].logprobs
    assert len(lp.token_logprobs) == done.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=0,
                                     max_tokens=4, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_sse_framing_is_exact(faces: Faces) -> None:
    status, data = faces.request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hola"}], "temperature": 0, "max_tokens": 5,
        "stream": True})
    assert status == 200
    events = data.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-2]]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"} and len({p["id"] for p in payloads}) == 1


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{nope", 400, "JSON"),
    ({"model": "no-such", "messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n must be 1"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": "x"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "a " * 400}]}, 400, "context"),
])
def test_bad_requests_get_openai_errors(faces: Faces, body: Any, status: int, needle: str) -> None:
    got, data = faces.request("POST", "/v1/chat/completions", body)
    assert got == status
    error = json.loads(data)["error"]
    assert needle in error["message"] and error["type"]


def test_a_client_leaving_mid_stream_frees_the_session_on_every_node(faces: Faces) -> None:
    req = urllib.request.Request(faces.url("/v1/chat/completions"), method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "adios"}],
                                                  "temperature": 0, "max_tokens": 200, "stream": True}).encode())
    resp = urllib.request.urlopen(req, timeout=120)
    for _ in range(3):
        assert resp.readline().startswith(b"data: {")
        resp.readline()
    assert sum(metric(n, "enjambre_pipeline_sessions") for n in faces.nodes) == 3  # one per stage
    resp.close()
    faces.cluster.wait_until(lambda: all(metric(n, "enjambre_pipeline_sessions") == 0 for n in faces.nodes), 30,
                             "every stage freeing the session")
