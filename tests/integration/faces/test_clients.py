"""Third-party clients, unmodified, on a real three-node cluster: litellm's ``ollama/``,
``ollama_chat/`` and ``openai/`` providers (chat, embeddings, a forced tool call) and
langchain's ``ChatOllama`` (with ``bind_tools``), ``OllamaEmbeddings`` and ``ChatOpenAI``
(a forced tool call, structured output). The tiny model is random: where a call is not
forced (Ollama has no ``tool_choice``) it answers text, and the test checks the shape the
client gives back; where it is forced (``tool_choice`` required or named, a JSON schema) the
arguments parse and validate.

Nothing here may reach the internet (CI has none): litellm reads its bundled cost map and
tiktoken files (``LITELLM_LOCAL_MODEL_COST_MAP`` and ``LITELLM_OFFLINE_MODE``, set before it
is imported; without them its import fetches the cost map from GitHub), langsmith tracing
stays off, and an audit hook fails any test that resolves or connects to anything but the
loopback (the clients' imports included)."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from tests.helpers.faces import MODEL, Faces

# litellm's bundled cost map and tokenizers, never a download (read when it is imported).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_OFFLINE_MODE"] = "true"
os.environ.pop("LANGSMITH_TRACING", None)
os.environ.pop("LANGCHAIN_TRACING_V2", None)

jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

pytestmark = pytest.mark.slow

# Small and bounded (the context is 256 tokens; a random model left free in a string would
# fill its budget before closing it), closed to other keys.
WEATHER_PARAMS = {"type": "object",
                  "properties": {"city": {"enum": ["Lima", "Oslo"]}, "days": {"type": "integer", "minimum": 0,
                                                                               "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Forecast",
                                            "parameters": WEATHER_PARAMS}}
HELLO = [{"role": "user", "content": "hola"}]
KEY = "sk-unused"


# --- nothing but the loopback ----------------------------------------------------------------

_offline = {"on": False, "seen": []}


def _loopback(host: Any) -> bool:
    if not isinstance(host, str):
        return True  # AF_UNIX paths (bytes) and the like
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _offline["on"]:
        return
    if event == "socket.getaddrinfo" and not _loopback(args[0]):
        _offline["seen"].append(f"getaddrinfo {args[0]}")
    elif event == "socket.connect" and isinstance(args[1], tuple) and not _loopback(args[1][0]):
        _offline["seen"].append(f"connect {args[1]}")


sys.addaudithook(_audit)  # cannot be removed; inert outside this module's tests


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """On before the module's other fixtures (the clients are imported in them or later)."""
    _offline["seen"] = []
    _offline["on"] = True
    try:
        yield
    finally:
        _offline["on"] = False


@pytest.fixture(autouse=True)
def stays_offline(offline: None) -> Iterator[None]:
    yield
    seen, _offline["seen"] = _offline["seen"], []
    assert not seen, f"reached beyond the loopback: {seen}"


def _unit(vec: list[float]) -> None:
    assert len(vec) == 64 and all(isinstance(x, float) for x in vec)
    assert math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, abs_tol=1e-4)


# --- litellm ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def litellm() -> Any:
    mod = pytest.importorskip("litellm")
    mod.num_retries = 0
    return mod


@pytest.mark.parametrize("provider", ["ollama", "ollama_chat"])
def test_litellm_ollama_providers(faces: Faces, litellm: Any, provider: str) -> None:
    done = litellm.completion(model=f"{provider}/{MODEL}", api_base=faces.url(), messages=HELLO,
                              max_tokens=8, temperature=0)
    choice = done.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0
    chunks = list(litellm.completion(model=f"{provider}/{MODEL}", api_base=faces.url(), messages=HELLO,
                                     max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_litellm_openai_provider(faces: Faces, litellm: Any) -> None:
    done = litellm.completion(model=f"openai/{MODEL}", api_base=faces.url("/v1"), api_key=KEY, messages=HELLO,
                              max_tokens=8, temperature=0)
    choice = done.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length") and done.usage.completion_tokens <= 8

    forced = litellm.completion(model=f"openai/{MODEL}", api_base=faces.url("/v1"), api_key=KEY, messages=HELLO,
                                tools=[WEATHER], tool_choice="required", max_tokens=150)
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


def test_litellm_embedding(faces: Faces, litellm: Any) -> None:
    done = litellm.embedding(model=f"ollama/{MODEL}", api_base=faces.url(), input=["hola mundo", "adios"])
    assert [d["index"] for d in done.data] == [0, 1]
    for d in done.data:
        _unit(d["embedding"])
    assert done.data[0]["embedding"] != done.data[1]["embedding"]


# --- langchain -------------------------------------------------------------------------------

def test_langchain_chat_ollama(faces: Faces) -> None:
    lc_ollama = pytest.importorskip("langchain_ollama")
    from langchain_core.messages import AIMessage

    chat = lc_ollama.ChatOllama(model=MODEL, base_url=faces.url(), num_predict=8, temperature=0)
    answer = chat.invoke("hola")
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] <= 8
    # Ollama has no tool_choice: offered a tool, the random model answers text (or, rarely, a call).
    tooled = chat.bind_tools([WEATHER]).invoke("hola")
    assert isinstance(tooled, AIMessage) and isinstance(tooled.content, str)
    assert tooled.content or tooled.tool_calls
    for call in tooled.tool_calls:
        assert call["name"] == "weather" and isinstance(call["args"], dict)


def test_langchain_ollama_embeddings(faces: Faces) -> None:
    lc_ollama = pytest.importorskip("langchain_ollama")
    emb = lc_ollama.OllamaEmbeddings(model=MODEL, base_url=faces.url())
    docs = emb.embed_documents(["hola mundo", "adios"])
    assert len(docs) == 2 and docs[0] != docs[1]
    for vec in docs:
        _unit(vec)
    query = emb.embed_query("hola mundo")
    _unit(query)
    assert max(abs(a - b) for a, b in zip(query, docs[0], strict=True)) < 1e-4


def test_langchain_chat_openai(faces: Faces) -> None:
    lc_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage

    chat = lc_openai.ChatOpenAI(model=MODEL, base_url=faces.url("/v1"), api_key=KEY, max_tokens=150,
                                max_retries=0, timeout=120)
    answer = chat.bind(max_tokens=8).invoke("hola")
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str) and answer.content

    forced = chat.bind_tools([WEATHER], tool_choice="required").invoke("hola")
    assert isinstance(forced, AIMessage) and not forced.invalid_tool_calls
    (call,) = forced.tool_calls
    assert call["name"] == "weather" and call["id"]
    jsonschema.validate(call["args"], WEATHER_PARAMS)


class Person(pydantic.BaseModel):  # type: ignore[name-defined,misc]
    """Bounded fields: the grammar holds the form, the bounds hold the length."""

    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]


def test_langchain_structured_output(faces: Faces) -> None:
    lc_openai = pytest.importorskip("langchain_openai")
    chat = lc_openai.ChatOpenAI(model=MODEL, base_url=faces.url("/v1"), api_key=KEY, max_tokens=150,
                                max_retries=0, timeout=120)
    person = chat.with_structured_output(Person, method="json_schema").invoke("hola")
    assert isinstance(person, Person)
    Person.model_validate(person.model_dump())
