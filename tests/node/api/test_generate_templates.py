"""The HTTP API with a hostile chat template, in memory (node/api/app.py's build_app, the
renderer process real, the model and sessions stand-ins): the loop keeps answering while the
template runs, the refusal is a 400 naming the model and the budget, the next request fails
at once, and a normal model's prompt still reaches the pipeline rendered as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers

import node.api.app as app_module
from node.api.app import build_app
from node.api.templates import Budget, TemplateRenderer
from node.engine.tokenizer import Tokenizer
from node.pipeline.models import QueueFull
from node.pipeline.session import Request
from node.testing.tinymodel import QWEN2_CHAT_TEMPLATE
from tests.helpers.nodeview import OneNode

BUDGET_S = 1.0
HOSTILE = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
CHAT = {"messages": [{"role": "user", "content": "hi hi"}], "stream": False}


def _tokenizer(template: str) -> Tokenizer:
    hf = HFTokenizer(hf_models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(hf, chat_template=template)


@dataclass
class FakeModel:
    name: str
    tokenizer: Tokenizer
    max_context: int = 4096
    config: object = None  # a decoder's ModelConfig in the daemon; only is_encoder is asked


class FakeLoaded:
    def __init__(self, *models: FakeModel) -> None:
        self.table = {m.name: m for m in models}

    async def resolve(self, name: str) -> str:
        return name

    async def get(self, name: str, **_: Any) -> FakeModel:
        return self.table[name]


@dataclass
class FakeSessions:
    """Records what reached the pipeline; the pipeline is always busy."""

    opened: list[Request] = field(default_factory=list)

    def open(self, _m: Any, request: Request) -> FakeSessions:
        self.opened.append(request)
        return self

    async def start(self) -> None:
        raise QueueFull("busy")


class FakeService:
    dht = SimpleNamespace(node_id="ab" * 32)  # all the API reads before a request


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[TestClient[Any, Any], FakeSessions]]:
    made: list[TemplateRenderer] = []

    def renderer() -> TemplateRenderer:
        made.append(TemplateRenderer(Budget(seconds=BUDGET_S)))
        return made[-1]

    monkeypatch.setattr(app_module, "TemplateRenderer", renderer)
    loaded = FakeLoaded(FakeModel("evil:1b", _tokenizer(HOSTILE)), FakeModel("qwen", _tokenizer(QWEN2_CHAT_TEMPLATE)))
    sessions = FakeSessions()
    app = build_app(OneNode(), models=FakeService(), loaded=loaded, sessions=sessions)  # type: ignore[arg-type]
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client, sessions
    finally:
        await client.close()
    assert made and made[0].pid is None  # the app's cleanup stopped the renderer


async def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    resp = await call()
    return resp, time.monotonic() - t0


async def test_hostile_template_is_refused_while_the_loop_serves(
    api: tuple[TestClient[Any, Any], FakeSessions],
) -> None:
    client, sessions = api
    hostile = asyncio.create_task(_timed(lambda: client.post("/api/chat", json={**CHAT, "model": "evil:1b"})))
    await asyncio.sleep(0.3)  # the renderer process has the template by now
    assert not hostile.done()
    version, took = await _timed(lambda: client.get("/api/version"))
    assert version.status == 200 and took < BUDGET_S / 2

    resp, took = await hostile
    body = await resp.json()
    assert resp.status == 400 and took >= BUDGET_S
    assert "model 'evil:1b'" in body["error"] and "did not finish within 1 s" in body["error"]
    assert "1 s, 256 MiB of memory" in body["error"]

    # the verdict is kept: the next request, on either face, fails at once
    resp, took = await _timed(lambda: client.post("/v1/chat/completions", json={**CHAT, "model": "evil:1b"}))
    error = (await resp.json())["error"]
    assert resp.status == 400 and took < BUDGET_S / 2
    assert error["type"] == "invalid_request_error" and "went past its budget earlier" in error["message"]
    assert sessions.opened == []


async def test_normal_template_reaches_the_pipeline_as_before(
    api: tuple[TestClient[Any, Any], FakeSessions],
) -> None:
    client, sessions = api
    resp = await client.post("/api/chat", json={**CHAT, "model": "qwen"})
    assert resp.status == 503  # the stand-in pipeline is busy; the prompt got there
    tok = _tokenizer(QWEN2_CHAT_TEMPLATE)
    expected = tok.encode(tok.apply_chat_template(CHAT["messages"]), add_special_tokens=False)  # type: ignore[arg-type]
    assert [r.prompt for r in sessions.opened] == [tuple(expected)]
