"""OpenAI's API on a real daemon: the official `openai` client (chat and completions,
streaming and not, usage) gets the engine's greedy tokens; the raw SSE framing is exact;
bad requests get 4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.engine.tokenizer import Tokenizer
from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.tinymodel import make_tiny_model
from tests.integration.test_pipeline import reference

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

ENGINE = {"max_context": 256, "max_sessions": 2, "prefill_chunk": 32, "compute_dtype": "float32"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "oa-model", layers=2, hidden=64,
                           intermediate=128, vocab_size=512)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[LocalNode]:
    with LocalCluster(tmp_path_factory.mktemp("oa"), env={"PYTHONUNBUFFERED": "1"}) as c:
        n = c.add_node(config={"engine": ENGINE})
        c.start(n)
        out = subprocess.run([sys.executable, "-m", "node.cli", "pull", str(tiny)], capture_output=True, text=True,
                             env={**os.environ, "ENJAMBRE_CONFIG": str(n.config)}, timeout=120)
        assert out.returncode == 0, out.stderr
        yield n


def client(node: LocalNode) -> Any:
    return openai.OpenAI(base_url=f"http://{node.api}/v1", api_key="unused", max_retries=0)


def raw(node: LocalNode, path: str, body: Any) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{node.api}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_chat_with_the_official_client(node: LocalNode, tiny: Path) -> None:
    tok = Tokenizer.from_model_dir(tiny)
    messages = [{"role": "user", "content": "hola"}]
    want = tok.decode(reference(tiny, tok.encode_chat(messages), 12, penalty=1.0))
    c = client(node)
    done = c.chat.completions.create(model="oa-model", messages=messages, temperature=0, max_tokens=12)
    assert done.choices[0].message.content == want
    assert done.usage.prompt_tokens == len(tok.encode_chat(messages))
    assert done.usage.completion_tokens <= 12 and done.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model="oa-model", messages=messages, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [m.id for m in c.models.list().data] == ["oa-model:latest"]
    assert c.models.retrieve("oa-model").id == "oa-model"


def test_completions_and_logprobs(node: LocalNode, tiny: Path) -> None:
    tok = Tokenizer.from_model_dir(tiny)
    want_ids = reference(tiny, tok.encode("el perro"), 8, penalty=1.0)
    c = client(node)
    done = c.completions.create(model="oa-model", prompt="el perro", temperature=0, max_tokens=8, logprobs=1)
    assert done.choices[0].text == tok.decode(want_ids)
    lp = done.choices[0].logprobs
    assert len(lp.token_logprobs) == done.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)
    chat = c.chat.completions.create(model="oa-model", messages=[{"role": "user", "content": "x"}], temperature=0,
                                     max_tokens=4, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_sse_framing_is_exact(node: LocalNode) -> None:
    status, data = raw(node, "/v1/chat/completions", {
        "model": "oa-model", "messages": [{"role": "user", "content": "hola"}], "temperature": 0, "max_tokens": 5,
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
    ({"model": "oa-model", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n must be 1"),
    ({"model": "oa-model", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "oa-model", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "oa-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "oa-model", "messages": "x"}, 400, "messages"),
    ({"model": "oa-model", "messages": [{"role": "user", "content": "a " * 400}]}, 400, "context"),
])
def test_bad_requests_get_openai_errors(node: LocalNode, body: Any, status: int, needle: str) -> None:
    got, data = raw(node, "/v1/chat/completions", body)
    assert got == status
    error = json.loads(data)["error"]
    assert needle in error["message"] and error["type"]
