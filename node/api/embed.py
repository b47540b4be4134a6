"""Embeddings in both APIs' shapes: Ollama's /api/embed and /api/embeddings, OpenAI's /v1/embeddings.

One path, two faces. ``parse_inputs`` turns a request's input into texts or token-id
lists, bounded (at most ``MAX_INPUTS`` inputs, ``MAX_PROMPT_CHARS`` characters in all)
before any work; ``embed_inputs`` tokenizes them all, checks every length against the
model's context (``truncate``: cut to it, as Ollama does by default; else a 400 naming
the input) before the first vector is computed, then asks the pipeline for one vector
per input (node/pipeline/session.py ``Sessions.embed``: the tail of the plan returns
the pooled, L2-normalized final hidden state). ``dimensions`` keeps the first N values
and normalizes again (Matryoshka-style, as Ollama and OpenAI do).

- ``POST /api/embed`` {model, input: str | [str], truncate, dimensions, keep_alive,
  options (ignored, as Ollama ignores most)} -> {model, embeddings, total_duration,
  load_duration, prompt_eval_count}; no ``input`` only loads the model, as Ollama.
- ``POST /api/embeddings`` {model, prompt} -> {embedding} (Ollama's older endpoint; an
  empty prompt loads the model and answers an empty vector, as Ollama).
- ``POST /v1/embeddings`` {model, input: str | [str] | [int] | [[int]], encoding_format
  float | base64 (little-endian float32), dimensions, user} -> OpenAI's list with usage.

Errors come in the asking API's shape (guard.py ``refusal``): 400 for a bad input, 404
for an unknown model, 503 when busy.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from node.api.generate import (
    MAX_PROMPT_CHARS,
    BadRequest,
    error_for,
    parse_keep_alive,
    read_body,
)
from node.api.guard import refusal
from node.pipeline.models import DriverError, LoadedModels, Model
from node.pipeline.session import Sessions

__all__ = ["MAX_INPUTS", "add_embed_routes", "embed_inputs", "parse_inputs"]

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request
_ENCODE_ON_LOOP_CHARS = 16 * 2**10  # longer inputs are tokenized in a thread, off the loop

Input = str | list[int]


@dataclass(frozen=True)
class Embedded:
    vectors: list[np.ndarray]  # float32 [dimensions or hidden], unit length
    tokens: int  # tokens embedded, after truncation


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value)


def parse_inputs(value: Any, *, field: str, token_ids: bool = False) -> list[Input]:
    """A request's input as a list of texts (or, with ``token_ids``, token-id lists),
    bounded before any work; BadRequest saying what is wrong."""
    shapes = "a string or a list of strings" + (" (or token ids)" if token_ids else "")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif token_ids and _int_list(value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise BadRequest(f"{field} must be {shapes}")
    if not items:
        raise BadRequest(f"{field} is an empty list: give {shapes} to embed")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"{field} holds {len(items)} inputs; at most {MAX_INPUTS} per request")
    chars = 0
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise BadRequest(f"{field}[{i}] is an empty string: there is nothing to embed")
            chars += len(item)
        elif token_ids and _int_list(item):
            chars += len(item)
        else:
            raise BadRequest(f"{field}[{i}] must be a string" + (" or a list of token ids" if token_ids else ""))
    if chars > MAX_PROMPT_CHARS:
        raise BadRequest(f"{field} holds {chars} characters; at most {MAX_PROMPT_CHARS} per request")
    return items


def parse_dimensions(value: Any, field: str = "dimensions") -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"{field} must be a positive integer")
    return value


def _ids(m: Model, item: Input, i: int, field: str) -> list[int]:
    from node.engine.tokenizer import TokenizerError  # loaded with the model, never at start-up

    if isinstance(item, list):
        vocab = m.config.vocab_size
        bad = next((x for x in item if not 0 <= x < vocab), None)
        if bad is not None:
            raise BadRequest(f"{field}[{i}] holds token id {bad}, outside the model's vocabulary (0..{vocab - 1})")
        return list(item)
    try:
        ids = m.tokenizer.encode(item, add_special_tokens=True)
    except TokenizerError as exc:
        raise BadRequest(f"{field}[{i}]: {exc}") from None
    if not ids:
        raise BadRequest(f"{field}[{i}] has no tokens: there is nothing to embed")
    return ids


def _shorten(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    if dimensions is None or dimensions >= vector.shape[0]:
        return vector
    cut = vector[:dimensions].astype(np.float32)
    norm = float(np.linalg.norm(cut))
    return cut / norm if norm > 0 else cut


async def embed_inputs(sessions: Sessions, m: Model, items: list[Input], *, truncate: bool,
                       dimensions: int | None, field: str) -> Embedded:
    """One vector per input, in order. Every input is tokenized and checked against the
    context before the first is embedded, so a bad one costs no work."""
    if dimensions is not None and dimensions > m.config.hidden_size:
        raise BadRequest(f"dimensions must be at most {m.config.hidden_size} (the model's embedding size)")
    context = m.max_context

    def tokenized() -> list[list[int]]:
        prompts = []
        for i, item in enumerate(items):
            ids = _ids(m, item, i, field)
            if len(ids) > context:
                if not truncate:
                    raise BadRequest(f"{field}[{i}] has {len(ids)} tokens; the context holds {context} "
                                     "(shorten it, or let it be cut with truncate: true)")
                ids = ids[:context]
            prompts.append(ids)
        return prompts

    chars = sum(len(x) for x in items)
    prompts = tokenized() if chars <= _ENCODE_ON_LOOP_CHARS else await asyncio.to_thread(tokenized)
    # One input after another: each is a session of the model's pipeline, like a generation.
    vectors = [_shorten(await sessions.embed(m, ids), dimensions) for ids in prompts]
    return Embedded(vectors, sum(len(p) for p in prompts))


def _truncate(body: dict[str, Any]) -> bool:
    value = body.get("truncate", True)
    if not isinstance(value, bool):
        raise BadRequest("truncate must be true or false")
    return value


def add_embed_routes(app: web.Application, loaded: LoadedModels, sessions: Sessions) -> None:
    async def ollama_embed(request: web.Request) -> web.Response:
        t0 = time.monotonic()
        try:
            body = await read_body(request)
            keep_alive = parse_keep_alive(body.get("keep_alive"))
            truncate, dimensions = _truncate(body), parse_dimensions(body.get("dimensions"))
            items = None if body.get("input") is None else parse_inputs(body["input"], field="input")
            was_loaded = await loaded.resolve(body["model"]) in loaded.table
            m = await loaded.get(body["model"], keep_alive=keep_alive)
            load_ns = 0 if was_loaded else int((time.monotonic() - t0) * 1e9)
            done = Embedded([], 0) if items is None else await embed_inputs(
                sessions, m, items, truncate=truncate, dimensions=dimensions, field="input")
        except BadRequest as exc:
            return refusal(request, 400, str(exc))
        except DriverError as exc:
            return refusal(request, *error_for(exc))
        return web.json_response({
            "model": body["model"], "embeddings": [v.tolist() for v in done.vectors],
            "total_duration": int((time.monotonic() - t0) * 1e9), "load_duration": load_ns,
            "prompt_eval_count": done.tokens,
        })

    async def ollama_embeddings(request: web.Request) -> web.Response:
        try:
            body = await read_body(request)
            keep_alive = parse_keep_alive(body.get("keep_alive"))
            prompt = body.get("prompt", "")
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string")
            m = await loaded.get(body["model"], keep_alive=keep_alive)
            if not prompt:  # as Ollama: loads the model, embeds nothing
                return web.json_response({"embedding": []})
            items = parse_inputs(prompt, field="prompt")
            done = await embed_inputs(sessions, m, items, truncate=True, dimensions=None, field="prompt")
        except BadRequest as exc:
            return refusal(request, 400, str(exc))
        except DriverError as exc:
            return refusal(request, *error_for(exc))
        return web.json_response({"embedding": done.vectors[0].tolist()})

    async def openai_embeddings(request: web.Request) -> web.Response:
        try:
            body = await read_body(request, 'say which model: {"model": "name", "input": "text"}')
            if "input" not in body:
                raise BadRequest("input is required: a string or a list of strings to embed")
            items = parse_inputs(body["input"], field="input", token_ids=True)
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise BadRequest('encoding_format must be "float" or "base64"')
            dimensions = parse_dimensions(body.get("dimensions"))
            m = await loaded.get(body["model"])
            done = await embed_inputs(sessions, m, items, truncate=False, dimensions=dimensions, field="input")
        except BadRequest as exc:
            return refusal(request, 400, str(exc))
        except DriverError as exc:
            return refusal(request, *error_for(exc))

        def encoded(v: np.ndarray) -> Any:
            if fmt == "base64":
                return base64.b64encode(v.astype("<f4").tobytes()).decode()
            return v.tolist()

        return web.json_response({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(done.vectors)],
            "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
        })

    app.router.add_post("/api/embed", ollama_embed)
    app.router.add_post("/api/embeddings", ollama_embeddings)
    app.router.add_post("/v1/embeddings", openai_embeddings)
