"""Embeddings through both APIs, driven by the official `ollama` and `openai` clients, in
memory (node/api/app.py's build_app): the vectors are a real tiny model's (the engine in
this process stands in for the pipeline), in each API's shape, truncated and normalized
when asked, base64 as little-endian float32; bad inputs are 400s that say what is wrong,
refused before any vector is computed."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import ollama
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from node.api.app import build_app
from node.api.embed import MAX_INPUTS
from node.engine import Partition, PartitionSpec, WeightSource, load_config, load_partition
from node.engine.config import ModelConfig
from node.engine.tokenizer import Tokenizer
from node.testing.tinymodel import make_tiny_model
from tests.helpers.nodeview import OneNode

CONTEXT = 64


@dataclass
class FakeModel:
    name: str
    tokenizer: Tokenizer
    config: ModelConfig
    max_context: int = CONTEXT
    model_id: str = "cd" * 32
    sessions: dict[str, Any] = field(default_factory=dict)
    plan: Any = field(default_factory=lambda: SimpleNamespace(stages=[]))


class FakeLoaded:
    def __init__(self, *ms: FakeModel) -> None:
        self.table = {m.name: m for m in ms}

    async def resolve(self, name: str) -> str:
        return name

    async def get(self, name: str, **_: Any) -> FakeModel:
        if name not in self.table:
            from node.pipeline.models import ModelNotFound

            raise ModelNotFound(f"model {name!r} not found; pull it first (nodectl pull)")
        return self.table[name]


@dataclass
class EngineSessions:
    """The pipeline's stand-in: each input is embedded by the whole model in this process."""

    part: Partition
    asked: list[list[int]] = field(default_factory=list)

    async def embed(self, m: FakeModel, ids: list[int]) -> np.ndarray:
        self.asked.append(list(ids))
        _, vec = self.part.prefill(self.part.new_cache(1), np.asarray(ids), embed=True)
        return np.asarray(vec)


class FakeService:
    dht = SimpleNamespace(node_id="ab" * 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Partition]:
    path = make_tiny_model(tmp_path_factory.mktemp("e") / "tiny", layers=2, hidden=32, intermediate=64,
                           vocab_size=320)
    cfg = load_config(path)
    part = load_partition(WeightSource.from_dir(path), cfg, PartitionSpec.whole(cfg), dtype="float32",
                          max_context=CONTEXT, prefill_chunk=16)
    return path, part


@pytest.fixture
async def api(tiny: tuple[Path, Partition]) -> AsyncIterator[tuple[str, EngineSessions]]:
    path, part = tiny
    model = FakeModel("tiny", Tokenizer.from_model_dir(path), part.config)
    sessions = EngineSessions(part)
    app = build_app(OneNode(), models=FakeService(), loaded=FakeLoaded(model),  # type: ignore[arg-type]
                    sessions=sessions)  # type: ignore[arg-type]
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield f"http://127.0.0.1:{client.port}", sessions
    finally:
        await client.close()


def _direct(part: Partition, ids: list[int]) -> np.ndarray:
    _, vec = part.prefill(part.new_cache(1), np.asarray(ids), embed=True)
    return np.asarray(vec)


async def test_ollama_embed(api: tuple[str, EngineSessions], tiny: tuple[Path, Partition]) -> None:
    url, sessions = api
    part = tiny[1]
    client = ollama.AsyncClient(host=url)
    reply = await client.embed(model="tiny", input=["hola mundo", "otra cosa"])
    assert reply.model == "tiny" and len(reply.embeddings) == 2
    vecs = np.asarray(reply.embeddings)
    assert vecs.shape == (2, 32) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vecs[0], _direct(part, sessions.asked[0]), atol=1e-6)
    assert reply.prompt_eval_count == sum(len(a) for a in sessions.asked)
    assert (reply.total_duration or 0) > 0
    # dimensions: the first values, normalized again.
    short = await client.embed(model="tiny", input="hola mundo", dimensions=8)
    cut = vecs[0][:8] / np.linalg.norm(vecs[0][:8])
    np.testing.assert_allclose(short.embeddings[0], cut, atol=1e-6)
    # The older endpoint: one prompt, one vector.
    old = await client.embeddings(model="tiny", prompt="hola mundo")
    np.testing.assert_allclose(old.embedding, vecs[0], atol=1e-6)
    assert (await client.embeddings(model="tiny", prompt="")).embedding == []  # loads, embeds nothing
    import aiohttp

    async with aiohttp.ClientSession() as http, http.post(url + "/api/embed", json={"model": "tiny"}) as resp:
        loaded = await resp.json()  # no input: loads the model, as Ollama
    assert resp.status == 200 and loaded["embeddings"] == [] and loaded["prompt_eval_count"] == 0


async def test_ollama_truncates_to_the_context_unless_told_not_to(api: tuple[str, EngineSessions]) -> None:
    url, sessions = api
    client = ollama.AsyncClient(host=url)
    long = "hola mundo " * 2000  # over 16 KiB: tokenized in a thread
    reply = await client.embed(model="tiny", input=long)
    assert len(sessions.asked[-1]) == CONTEXT and reply.prompt_eval_count == CONTEXT
    before = len(sessions.asked)
    with pytest.raises(ollama.ResponseError, match=r"input\[1\] has \d+ tokens; the context holds 64") as caught:
        await client.embed(model="tiny", input=["short", long], truncate=False)
    assert caught.value.status_code == 400
    assert len(sessions.asked) == before  # refused before any work


async def test_openai_embeddings(api: tuple[str, EngineSessions], tiny: tuple[Path, Partition]) -> None:
    url, sessions = api
    part = tiny[1]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
    reply = await client.embeddings.create(model="tiny", input=["hola mundo", "otra cosa"], encoding_format="float")
    assert reply.object == "list" and [d.index for d in reply.data] == [0, 1]
    first = np.asarray(reply.data[0].embedding)
    np.testing.assert_allclose(first, _direct(part, sessions.asked[-2]), atol=1e-6)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == len(sessions.asked[-2]) + len(sessions.asked[-1])
    # The client asks for base64 by default and decodes it (little-endian float32).
    default = await client.embeddings.create(model="tiny", input="hola mundo")
    np.testing.assert_allclose(default.data[0].embedding, first, atol=1e-6)
    raw = await client.embeddings.with_raw_response.create(model="tiny", input="hola mundo",
                                                           encoding_format="base64", dimensions=4)
    blob = raw.http_response.json()["data"][0]["embedding"]
    short = np.frombuffer(base64.b64decode(blob), "<f4")
    np.testing.assert_allclose(short, first[:4] / np.linalg.norm(first[:4]), atol=1e-6)
    # Token ids instead of text.
    ids = sessions.asked[-1]
    by_ids = await client.embeddings.create(model="tiny", input=[ids, ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[1].embedding, first, atol=1e-6)


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/api/embed", {"model": "tiny", "input": []}, "input is an empty list"),
    ("/api/embed", {"model": "tiny", "input": 7}, "input must be a string or a list of strings"),
    ("/api/embed", {"model": "tiny", "input": ["a", 3]}, "input[1] must be a string"),
    ("/api/embed", {"model": "tiny", "input": ["a", ""]}, "input[1] is an empty string"),
    ("/api/embed", {"model": "tiny", "input": ["a"] * (MAX_INPUTS + 1)}, f"at most {MAX_INPUTS}"),
    ("/api/embed", {"model": "tiny", "input": "a", "truncate": "yes"}, "truncate must be true or false"),
    ("/api/embed", {"model": "tiny", "input": "a", "dimensions": 0}, "dimensions must be a positive integer"),
    ("/api/embed", {"model": "tiny", "input": "a", "dimensions": 33}, "at most 32"),
    ("/api/embed", {"input": "a"}, "say which model"),
    ("/api/embeddings", {"model": "tiny", "prompt": ["a"]}, "prompt must be a string"),
    ("/v1/embeddings", {"model": "tiny", "input": []}, "input is an empty list"),
    ("/v1/embeddings", {"model": "tiny"}, "input is required"),
    ("/v1/embeddings", {"model": "tiny", "input": {"a": 1}}, "input must be a string or a list of strings"),
    ("/v1/embeddings", {"model": "tiny", "input": [[1, 2], [400]]}, "input[1] holds token id 400"),
    ("/v1/embeddings", {"model": "tiny", "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"model": "tiny", "input": "hola " * 200}, "the context holds 64"),
])
async def test_bad_inputs_are_clear_400s(api: tuple[str, EngineSessions], path: str, body: Any,
                                        needle: str) -> None:
    import aiohttp

    url, sessions = api
    async with aiohttp.ClientSession() as http, http.post(url + path, json=body) as resp:
        data = await resp.json()
    assert resp.status == 400, data
    message = data["error"]["message"] if path.startswith("/v1/") else data["error"]
    assert needle in message, message
    assert not sessions.asked  # nothing was embedded


async def test_an_unknown_model_is_a_404_in_each_shape(api: tuple[str, EngineSessions]) -> None:
    url, _ = api
    with pytest.raises(ollama.ResponseError, match="not found") as caught:
        await ollama.AsyncClient(host=url).embed(model="nope", input="a")
    assert caught.value.status_code == 404
    with pytest.raises(openai.NotFoundError, match="not found"):
        await openai.AsyncOpenAI(base_url=url + "/v1", api_key="none").embeddings.create(model="nope", input="a")
