"""OpenAI's API on every node: /v1/chat/completions, /v1/completions, /v1/models.

The same driver as Ollama's endpoints (node/api/generate.py), in OpenAI's shapes:
``stream: true`` is server-sent events, one ``data: {chunk}`` per piece of text and a
final ``data: [DONE]``; ``stream: false`` one object with ``usage``. Sampling follows
OpenAI's defaults (temperature 1, top_p 1, no top_k, no repeat penalty), with
``max_tokens`` / ``max_completion_tokens``, ``seed``, ``stop``, ``logprobs`` (the
chosen token's) and ``stream_options.include_usage``. ``n`` other than 1 and
``top_logprobs`` above 0 are refused, saying so; unknown fields are ignored, as
OpenAI's own server ignores ones it does not use. ``response_format`` ``json_object``
and ``json_schema`` hold the answer to JSON (node/api/formats.py). ``tools`` reach the
model's chat template; its calls come back as ``tool_calls`` (with ids; streamed as
deltas) and ``finish_reason: "tool_calls"``; ``tool_choice`` ``auto`` (the default),
``none``, ``required`` and a named function are honoured, the last two by a grammar that
makes the answer a call of an offered function with arguments that match its parameters. A reasoning model's ``<think>`` block goes to
``reasoning_content`` beside ``content``, as DeepSeek's API does; ``reasoning_effort``
(or vLLM's ``chat_template_kwargs.enable_thinking``) turns the template's thinking on
or off where it has the switch. Errors have OpenAI's shape
``{"error": {"message", "type", "code"}}``. The request guard (Host, Origin, token)
covers these routes like every other.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from aiohttp import web

from node.api.formats import openai_format, tool_grammar
from node.api.generate import (
    MAX_STOP,
    BadRequest,
    _prompt_ids,
    constrained,
    error_for,
    read_body,
    refuse_embedding_model,
    request_tools,
)
from node.api.templates import TemplateRenderer
from node.api.thinking import ThinkSplitter, opens_thinking, split_piece
from node.api.tools import CallParser, ToolCall, style_of
from node.pipeline.models import DriverError, LoadedModels, Model, ModelNotFound, QueueFull
from node.pipeline.session import Request, Sessions, Token
from node.swarm.service import ModelService
from protocol.pipeline import PipelineMessageError, SamplingSpec, parse_sampling

__all__ = ["add_openai_routes"]

_FINISH = {"stop": "stop", "length": "length"}


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}},
                             status=status)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be a number from {lo} to {hi}")
    return float(value)


def _request(body: dict[str, Any]) -> tuple[SamplingSpec, int | None, list[str], bool, bool]:
    """(sampling, max tokens, stop strings, logprobs, include usage in the stream)."""
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("n must be 1: enjambre generates one choice per request")
    if body.get("top_logprobs") not in (None, 0):
        raise BadRequest("top_logprobs is not supported (logprobs: true gives the chosen tokens')")
    logprobs = body.get("logprobs", False)
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):  # /v1/completions: an int
        if logprobs not in (0, 1):
            raise BadRequest("logprobs above 1 (alternatives per token) are not supported")
        logprobs = bool(logprobs)
    if not isinstance(logprobs, bool):
        raise BadRequest("logprobs must be true or false")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BadRequest("seed must be an integer")
    try:
        sampling = parse_sampling({
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0), "top_k": 0,
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0), "min_p": 0.0,
            "repetition_penalty": 1.0, "seed": seed % (1 << 31),
        })
    except PipelineMessageError as exc:
        raise BadRequest(str(exc)) from None
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest("max_tokens must be a positive integer")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) and x for x in stop):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} strings")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    return sampling, limit, stop, logprobs, bool(options.get("include_usage", False))


def _think(body: dict[str, Any]) -> bool | None:
    """Whether to ask the chat template to think (None: the template's default); refuses
    what cannot be honoured."""
    effort = body.get("reasoning_effort")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("enable_thinking", False), bool):
        raise BadRequest("chat_template_kwargs must be an object; enable_thinking true or false")
    if "enable_thinking" in kwargs:
        return bool(kwargs["enable_thinking"])
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise BadRequest('reasoning_effort must be "none", "minimal", "low", "medium" or "high"')
    return effort != "none"


def _tool_choice(body: dict[str, Any]) -> tuple[str, str | None]:
    """("auto" | "none" | "required", the function a named choice must call)."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto", None
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict) \
            and isinstance(fn.get("name"), str):
        return "required", fn["name"]
    raise BadRequest('tool_choice must be "auto", "none", "required" or '
                     '{"type": "function", "function": {"name": ...}}')


async def _constraint(m: Model, body: dict[str, Any], chat: bool) -> tuple[list[dict[str, Any]], str | None]:
    """(the tools the model is offered, the grammar its answer must follow): a call when
    ``tool_choice`` requires one, else ``response_format``'s JSON (node/api/formats.py)."""
    mode, named = _tool_choice(body) if chat else ("none", None)
    tools = request_tools(m, body) if chat and mode != "none" else []
    if mode != "required":
        return tools, await constrained(lambda: openai_format(body.get("response_format")), "response_format")
    if not tools:
        raise BadRequest("tool_choice requires a call, but the request offers no tools")
    if openai_format(body.get("response_format")) is not None:
        raise BadRequest("tool_choice that requires a call and a JSON response_format cannot both hold")
    style = style_of(m.tokenizer.chat_template)
    return tools, await constrained(lambda: tool_grammar(tools, style, named), "tool_choice")


def _openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}


def _model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "enjambre"}


def add_openai_routes(app: web.Application, loaded: LoadedModels, sessions: Sessions,
                      service: ModelService, renderer: TemplateRenderer) -> None:
    async def completion(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await read_body(request, "model is required")
            if not chat and not isinstance(body.get("prompt"), str):
                raise BadRequest("prompt must be a string (lists of prompts are not supported)")
            sampling, limit, stop, want_logprobs, include_usage = _request(body)
            think = _think(body) if chat else None
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("stream must be true or false")
            m = await loaded.get(body["model"])
            refuse_embedding_model(m)
            tools, grammar = await _constraint(m, body, chat)
            prompt, prompt_text = await _prompt_ids(m, {**body, "raw": True} if not chat else body, chat, renderer,
                                                     think, tools)
            if len(prompt) + 1 > m.max_context:
                raise BadRequest(f"the prompt has {len(prompt)} tokens; the model's context holds {m.max_context}")
            room = m.max_context - len(prompt)
            limit = room if limit is None else min(limit, room)
            gen = sessions.open(m, Request(tuple(prompt), sampling, limit, tuple(stop), grammar))
            await gen.start()
        except BadRequest as exc:
            return _error(400, str(exc))
        except ModelNotFound as exc:
            return _error(404, str(exc), code="model_not_found")
        except QueueFull as exc:
            return _error(503, str(exc), "server_error", "overloaded")
        except DriverError as exc:
            return _error(error_for(exc)[0], str(exc), "server_error")
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created, name = int(time.time()), body["model"]
        seen = gen.tokens
        kind = "chat.completion" if chat else "text_completion"
        splitter = ThinkSplitter(thinking=opens_thinking(prompt_text)) if chat else None
        calls = CallParser(style_of(m.tokenizer.chat_template), {t["function"]["name"] for t in tools}) \
            if tools else None
        called: list[dict[str, Any]] = []

        def split(text: str, last: bool = False) -> tuple[str, str]:
            content, reasoning = split_piece(splitter, text, last)
            if calls is not None:
                content = calls.feed(content)
                if last:
                    rest, found = calls.finish()
                    content += rest
                    called.extend(_openai_call(c) for c in found)
            return content, reasoning

        def choice(text: str, reason: str | None, tokens_now: list[Any], delta: bool,
                   reasoning: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text} if not delta or text else {}
                if reasoning:
                    message["reasoning_content"] = reasoning
                out["delta" if delta else "message"] = message
            else:
                out["text"] = text
            out["logprobs"] = _logprobs(m, tokens_now, chat) if want_logprobs else None
            return out

        def usage(count: int) -> dict[str, int]:
            return {"prompt_tokens": len(prompt), "completion_tokens": count, "total_tokens": len(prompt) + count}

        if not stream:
            text, reason, count = "", "stop", 0
            try:
                async for piece in gen.pieces():
                    text += piece.text
                    count, reason = piece.count, piece.reason
            except DriverError as exc:
                return _error(500, str(exc), "server_error")
            text, reasoning = split(text, last=True)
            one = choice(text, _FINISH[reason], seen, False, reasoning)
            if called:
                one["message"]["tool_calls"] = called
                one["message"]["content"] = text or None
                one["finish_reason"] = "tool_calls"
            return web.json_response({"id": ident, "object": kind, "created": created, "model": name,
                                      "choices": [one], "usage": usage(count)})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict[str, Any]) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        base = {"id": ident, "object": chunk_kind, "created": created, "model": name}
        reason, count, sent = "stop", 0, 0
        try:
            if chat:
                await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None, "logprobs": None}]})
            async for piece in gen.pieces():
                count, reason = piece.count, piece.reason
                content, reasoning = split(piece.text)
                if content or reasoning or (want_logprobs and len(seen) > sent):
                    await send({**base, "choices": [choice(content, None, seen[sent:], True, reasoning)]})
                    sent = len(seen)
            content, reasoning = split("", last=True)
            if content or reasoning:
                await send({**base, "choices": [choice(content, None, [], True, reasoning)]})
            if called:
                deltas = [{"index": i, **c} for i, c in enumerate(called)]
                await send({**base, "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None,
                                                 "logprobs": None}]})
            await send({**base, "choices": [choice("", "tool_calls" if called else _FINISH[reason], [], True)]})
            if include_usage:
                await send({**base, "choices": [], "usage": usage(count)})
        except DriverError as exc:
            await send({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        except ConnectionError:  # the client went away: free the session on every node, quietly
            await gen.aclose()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def chat(request: web.Request) -> web.StreamResponse:
        return await completion(request, True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await completion(request, False)

    async def models(_: web.Request) -> web.Response:
        catalog = await service.catalog()
        now = int(time.time())
        names = sorted({n for entry in catalog.values() for n in entry.get("names") or []})
        return web.json_response({"object": "list", "data": [_model_entry(n, now) for n in names]})

    async def model(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await loaded.resolve(name)
        except ModelNotFound as exc:
            return _error(404, str(exc), code="model_not_found")
        return web.json_response(_model_entry(name, int(time.time())))

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{name:.+}", model)


def _logprobs(m: Model, tokens: list[Token], chat: bool) -> dict[str, Any]:
    texts = [m.tokenizer.decode([t.id], skip_special_tokens=False) for t in tokens]
    if chat:
        return {"content": [{"token": text, "logprob": float(t.logprob), "bytes": list(text.encode()),
                             "top_logprobs": []} for t, text in zip(tokens, texts, strict=True)]}
    return {"tokens": texts, "token_logprobs": [float(t.logprob) for t in tokens], "top_logprobs": None,
            "text_offset": []}
