"""Tool calling through both APIs, driven by the official `ollama` and `openai` clients, in
memory (node/api/app.py's build_app, the template renderer real; the model's answer is a
scripted stand-in for the pipeline, written as Qwen2.5 writes a call). The tools reach the
model's own template, the calls come back in each API's shape (streamed too), results go
back in, and a model whose template has no tools is a clear 400."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import ollama
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from node.api.app import build_app
from node.engine.tokenizer import Tokenizer
from node.pipeline.session import Generation, Request, Token
from tests.helpers.chat_templates import MISTRAL_TEMPLATE, QWEN2_TEMPLATE
from tests.helpers.nodeview import OneNode

WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def _bytes_tokenizer(template: str | None) -> Tokenizer:
    """One token per byte: any text the script writes decodes back exactly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = HFTokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf, chat_template=template)


@dataclass
class FakeModel:
    name: str
    tokenizer: Tokenizer
    max_context: int = 8192
    config: object = None  # a decoder's ModelConfig in the daemon; only is_encoder is asked
    model_id: str = "cd" * 32
    sessions: dict[str, Any] = field(default_factory=dict)
    plan: Any = field(default_factory=lambda: SimpleNamespace(stages=[]))


class FakeLoaded:
    def __init__(self, *ms: FakeModel) -> None:
        self.table = {m.name: m for m in ms}

    async def resolve(self, name: str) -> str:
        return name

    async def get(self, name: str, **_: Any) -> FakeModel:
        return self.table[name]


@dataclass
class ScriptedSessions:
    """The pipeline's stand-in: every request is answered with ``answer``, token by token;
    the prompts that reached it are kept as text."""

    answer: str = ""
    prompts: list[str] = field(default_factory=list)
    grammars: list[str | None] = field(default_factory=list)

    def open(self, m: FakeModel, request: Request) -> Generation:
        self.prompts.append(m.tokenizer.decode(list(request.prompt)))
        self.grammars.append(request.grammar)
        return Generation(self, m, request)  # type: ignore[arg-type]

    async def tokens(self, m: FakeModel, *_: Any) -> AsyncGenerator[Token, None]:
        for i in m.tokenizer.encode(self.answer, add_special_tokens=False):
            yield Token(i, -0.5)


class FakeService:
    dht = SimpleNamespace(node_id="ab" * 32)


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, ScriptedSessions]]:
    loaded = FakeLoaded(FakeModel("qwen", _bytes_tokenizer(QWEN2_TEMPLATE)),
                        FakeModel("mistral", _bytes_tokenizer(MISTRAL_TEMPLATE)),
                        FakeModel("plain", _bytes_tokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")))
    sessions = ScriptedSessions()
    app = build_app(OneNode(), models=FakeService(), loaded=loaded, sessions=sessions)  # type: ignore[arg-type]
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield f"http://127.0.0.1:{client.port}", sessions
    finally:
        await client.close()


async def test_ollama_chat_returns_the_call_and_takes_the_result_back(
    api: tuple[str, ScriptedSessions],
) -> None:
    url, sessions = api
    client = ollama.AsyncClient(host=url)
    sessions.answer = CALL
    reply = await client.chat(model="qwen", messages=ASK, tools=[WEATHER], stream=False)
    assert '"name": "get_weather"' in sessions.prompts[-1] and "<tools>" in sessions.prompts[-1]
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Paris"}
    assert reply.message.content == "" and reply.done

    sessions.answer = "It is 18 C and sunny in Paris."
    history = [*ASK, reply.message, {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"}]
    reply = await client.chat(model="qwen", messages=history, tools=[WEATHER], stream=False)
    prompt = sessions.prompts[-1]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt  # the call went back
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    assert reply.message.content == "It is 18 C and sunny in Paris." and not reply.message.tool_calls


async def test_ollama_stream_sends_text_then_the_calls(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    sessions.answer = "Let me check.\n" + CALL
    parts = [p async for p in await ollama.AsyncClient(host=url).chat(model="qwen", messages=ASK, tools=[WEATHER],
                                                                        stream=True)]
    text = "".join(p.message.content or "" for p in parts)
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert text == "Let me check.\n"
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert parts[-1].done and not parts[-1].message.tool_calls


async def test_mistral_style_calls(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    sessions.answer = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lyon"}}]'
    reply = await ollama.AsyncClient(host=url).chat(model="mistral", messages=ASK, tools=[WEATHER], stream=False)
    assert "[AVAILABLE_TOOLS]" in sessions.prompts[-1]
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Lyon"}


async def test_openai_tool_calls_with_ids_and_results_by_id(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
    sessions.answer = CALL
    reply = await client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    sessions.answer = "Sunny."
    history: Any = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    reply = await client.chat.completions.create(model="qwen", messages=history, tools=[WEATHER])
    assert '"arguments": {"city": "Paris"}' in sessions.prompts[-1]
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in sessions.prompts[-1]
    assert reply.choices[0].message.content == "Sunny." and reply.choices[0].finish_reason == "stop"


async def test_openai_stream_deltas(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
    sessions.answer = "One moment. " + CALL
    stream = await client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert text == "One moment. "
    assert len(deltas) == 1 and deltas[0].index == 0 and (deltas[0].id or "").startswith("call_")
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments or "") == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_choice(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
    sessions.answer = CALL
    reply = await client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER],
                                                 tool_choice="none")
    assert "<tools>" not in sessions.prompts[-1]  # the model was not offered the tools
    assert reply.choices[0].message.content == CALL and not reply.choices[0].message.tool_calls
    # required, or a named function: a grammar goes with the request to the tail (the
    # real cluster's tests show it holds: tests/integration/faces/test_structured.py)
    reply = await client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER],
                                                 tool_choice="required")
    assert sessions.grammars[-1] is not None and "<tool_call>" in sessions.grammars[-1]
    assert reply.choices[0].finish_reason == "tool_calls"
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    await client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], tool_choice=named)
    assert sessions.grammars[-1] is not None and "get_weather" in sessions.grammars[-1]
    for choice, needle in [({"type": "function", "function": {"name": "nope"}}, "not among the request's tools"),
                           ("sometimes", "tool_choice must be"), ("required", "offers no tools")]:
        with pytest.raises(openai.BadRequestError, match=needle):
            await client.chat.completions.create(model="qwen", messages=ASK, tool_choice=choice,
                                                 tools=[] if needle == "offers no tools" else [WEATHER])
    before = len(sessions.prompts)
    with pytest.raises(openai.BadRequestError, match="cannot both hold"):
        await client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], tool_choice="required",
                                             response_format={"type": "json_object"})
    assert len(sessions.prompts) == before


async def test_formats_reach_the_tail_as_grammars(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    sessions.answer = '{"a": 1}'
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    reply = await ollama.AsyncClient(host=url).chat(model="qwen", messages=ASK, format=schema, stream=False)
    assert reply.message.content == '{"a": 1}' and '"required":["a"]' in (sessions.grammars[-1] or "")
    await ollama.AsyncClient(host=url).generate(model="qwen", prompt="x", format="json", stream=False)
    assert '"type":"object"' in (sessions.grammars[-1] or "")
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    await client.chat.completions.create(model="qwen", messages=ASK, response_format=fmt)
    assert '"required":["a"]' in (sessions.grammars[-1] or "")
    await client.chat.completions.create(model="qwen", messages=ASK, response_format={"type": "text"})
    assert sessions.grammars[-1] is None
    before = len(sessions.prompts)
    for bad, needle in [({"type": "nonsense"}, "Invalid type"),
                        ({"type": "object", "properties": {"a": {"pattern": "("}}}, "cannot be followed")]:
        with pytest.raises(ollama.ResponseError, match=needle):
            await ollama.AsyncClient(host=url).chat(model="qwen", messages=ASK, format=bad, stream=False)
    for rf, needle in [({"type": "xml"}, "response_format type"), ({"type": "json_schema"}, "needs"),
                       ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 3}}}, "cannot")]:
        with pytest.raises(openai.BadRequestError, match=needle):
            await client.chat.completions.create(model="qwen", messages=ASK, response_format=rf)
    assert len(sessions.prompts) == before  # refused before any node did work


async def test_a_call_to_a_function_not_offered_stays_text(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    sessions.answer = CALL.replace("get_weather", "delete_files")
    reply = await ollama.AsyncClient(host=url).chat(model="qwen", messages=ASK, tools=[WEATHER], stream=False)
    assert reply.message.content == sessions.answer and not reply.message.tool_calls


async def test_refusals_are_clear(api: tuple[str, ScriptedSessions]) -> None:
    url, sessions = api
    with pytest.raises(ollama.ResponseError, match="model 'plain' does not support tools") as caught:
        await ollama.AsyncClient(host=url).chat(model="plain", messages=ASK, tools=[WEATHER], stream=False)
    assert caught.value.status_code == 400
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
    with pytest.raises(openai.BadRequestError, match="needs a name"):
        await client.chat.completions.create(model="qwen", messages=ASK,
                                             tools=[{"type": "function", "function": {"name": "a b"}}])
    assert not sessions.prompts  # nothing reached the pipeline
