"""Generation endpoints in Ollama's shapes: generate, chat, load, ps, unload.

``POST /api/generate`` and ``POST /api/chat`` stream NDJSON (one line per piece of
text; the last with ``done``, ``done_reason`` and Ollama's counters and durations in
nanoseconds) unless ``"stream": false``. ``options``: temperature, top_k, top_p, min_p,
repeat_penalty, seed, num_predict, num_ctx, stop. An error before the first line is an
HTTP error with a JSON body (404 unknown model, 400 bad request or a prompt longer
than the context, 503 when the queue is full); after it, an ``{"error": ...}`` line.
``POST /api/load`` {model} plans and loads (NDJSON progress per node), ``GET /api/ps``
lists loaded models with their plan, ``POST /api/unload`` {model} unloads.

Also as Ollama: an empty prompt (or no messages) only loads the model (``done_reason``
"load"; with ``keep_alive`` 0 it unloads instead), ``keep_alive`` (seconds or "5m",
"1h"; negative: forever) sets how long the model stays loaded idle, ``raw`` skips the
chat template, ``system`` gives /api/generate a system message, unknown options are
ignored (Ollama warns and ignores them too) while known ones with a wrong type are
400; ``logprobs`` gives each token's log-probability (``top_logprobs`` is refused). ``think`` (true, or "low"/"medium"/"high") sends a reasoning model's
``<think>`` block to ``thinking`` (``message.thinking`` in chat) and the answer to
``content``; ``think: false`` asks the template not to think and drops any reasoning.
The chat template renders in a capped process (node/api/templates.py): one that goes past
its budget is a 400 that names the model, and the model's next requests fail at once.
``tools`` on /api/chat reach the model's chat template and its calls come back as
``message.tool_calls`` (node/api/tools.py); a model whose template has no tools is a 400.
``format`` ("json" or a JSON schema) holds the answer to it: the tail samples only what
the schema allows (node/api/formats.py); a schema that cannot be followed is a 400.
Refused with a clear 400 because enjambre cannot do them yet: ``images``, ``template``
overrides, ``suffix`` and ``context``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from node.api.formats import FormatError, check, ollama_format
from node.api.guard import error_response
from node.api.templates import RenderError, TemplateRenderer
from node.api.thinking import ThinkSplitter, opens_thinking, split_piece
from node.api.tools import (
    CallParser,
    ToolCall,
    ToolError,
    chat_messages,
    parse_tools,
    style_of,
    template_knows_tools,
)
from node.config_schema import WEIGHT_FORMATS
from node.pipeline.models import (
    DriverError,
    GenerationError,
    LoadedModels,
    Model,
    ModelNotFound,
    QueueFull,
)
from node.pipeline.planner import Pin
from node.pipeline.session import Request, Sessions
from node.pipeline.views import ps_entries
from protocol.pipeline import PipelineMessageError, SamplingSpec, parse_sampling

__all__ = ["add_generate_routes", "error_for", "parse_keep_alive", "parse_options", "read_body", "read_json",
           "refuse_embedding_model"]

# Ollama's defaults.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1}
MAX_STOP = 8
PIN_WAIT = 10.0  # seconds /api/load waits for a pinned node missing from the directory
MAX_PROMPT_CHARS = 4 * 2**20
# Shorter texts tokenize in well under a millisecond; a thread costs more than that.
_ENCODE_ON_LOOP_CHARS = 16 * 2**10


class BadRequest(ValueError):
    pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_options(options: Any) -> tuple[SamplingSpec, int, int | None, list[str]]:
    """Ollama's options -> (sampling, num_predict (-1: to the context), num_ctx, stop)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object")
    merged = {**DEFAULTS, **options}
    seed = merged.get("seed")
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed < 0):
        seed = secrets.randbits(31)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BadRequest("options.seed must be an integer")
    try:
        sampling = parse_sampling({
            "temperature": merged["temperature"], "top_k": merged["top_k"], "top_p": merged["top_p"],
            "min_p": merged["min_p"], "repetition_penalty": merged["repeat_penalty"], "seed": seed % (1 << 31),
        })
    except PipelineMessageError as exc:
        raise BadRequest(f"options: {exc}") from None
    num_predict = merged.get("num_predict", -1)
    if not isinstance(num_predict, int) or isinstance(num_predict, bool) or num_predict < -2:
        raise BadRequest("options.num_predict must be an integer (-1: until the context is full)")
    num_ctx = merged.get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1):
        raise BadRequest("options.num_ctx must be a positive integer")
    stop = merged.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= 256
                                                                      for s in stop):
        raise BadRequest(f"options.stop must be a list of at most {MAX_STOP} non-empty strings")
    return sampling, num_predict, num_ctx, stop


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
NOT_SUPPORTED = {
    "images": "images are not supported: enjambre serves text-only models",
    "template": "template overrides are not supported: the model's own chat template is used "
                "(send raw: true with a prompt you formatted yourself)",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "context": "context (the deprecated token list of /api/generate) is not supported; "
               "send the conversation to /api/chat as messages",
}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive -> seconds idle before unloading (inf: never; None: not given).
    A number is seconds; a string is a Go duration ("5m", "1h30m", "300ms") or a number;
    negative means forever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest('keep_alive must be a duration like "5m", or seconds')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and len(value) <= 64:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise BadRequest(f'keep_alive {value!r} is not a duration like "5m", "1h" or "-1"') from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise BadRequest('keep_alive must be a duration like "5m", or seconds')
    if math.isnan(seconds):
        raise BadRequest("keep_alive must be a number")
    return math.inf if seconds < 0 else seconds


def parse_think(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if value in ("low", "medium", "high"):
        return True
    raise BadRequest('think must be true, false, "low", "medium" or "high"')


def _logprobs_wanted(body: dict[str, Any]) -> bool:
    logprobs, top = body.get("logprobs", False), body.get("top_logprobs")
    if not isinstance(logprobs, bool):
        raise BadRequest("logprobs must be true or false")
    if top not in (None, 0):
        raise BadRequest("top_logprobs is not supported (logprobs: true gives the chosen tokens')")
    return logprobs


def _logprob_entry(m: Model, token: Any) -> dict[str, Any]:
    text = m.tokenizer.decode([token.id], skip_special_tokens=False)
    return {"token": text, "logprob": float(token.logprob), "bytes": list(text.encode())}


def refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """A clear 400 for the request fields enjambre cannot honour (never silently ignored)."""
    fields = ("template",) if chat else ("images", "template", "suffix", "context")
    for key in fields:
        if body.get(key) not in (None, "", [], {}):
            raise BadRequest(NOT_SUPPORTED[key])


async def constrained(build: Callable[[], str | None], what: str) -> str | None:
    """The grammar a request's answer must follow (formats.py), checked in a thread (a big
    schema takes a while to compile); BadRequest saying why when it cannot be followed."""
    def make() -> str | None:
        grammar = build()
        return None if grammar is None else check(grammar, what)

    try:
        return await asyncio.to_thread(make)
    except FormatError as exc:
        raise BadRequest(str(exc)) from None


def refuse_embedding_model(m: Model) -> None:
    """An encoder (BERT) only embeds: a generation request for it is a 400 saying so."""
    if getattr(m.config, "is_encoder", False):
        raise BadRequest(f"model {m.name!r} is an embedding model: it cannot generate text "
                         "(use /api/embed or /v1/embeddings)")


def request_tools(m: Model, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tools a chat request offers (tools.py), refused for a model whose template has none."""
    try:
        tools = parse_tools(body.get("tools"))
    except ToolError as exc:
        raise BadRequest(str(exc)) from None
    if tools and not template_knows_tools(m.tokenizer.chat_template):
        raise BadRequest(f"model {m.name!r} does not support tools: its chat template has no place for them")
    return tools


async def _prompt_ids(m: Model, body: dict[str, Any], chat: bool, renderer: TemplateRenderer,
                      think: bool | None = None, tools: list[dict[str, Any]] | None = None) -> tuple[list[int], str]:
    """(token ids, the prompt's text) of a request; ``think`` reaches the chat template
    as ``enable_thinking`` (Qwen3's and DeepSeek-R1's name for it). The template runs in
    ``renderer``'s process and a long text is tokenized in a thread: neither holds the loop."""
    from node.engine.tokenizer import TokenizerError  # loaded with the model, never at start-up

    try:
        text, special = await _render(m, body, chat, think, renderer, tools)
        if len(text) <= _ENCODE_ON_LOOP_CHARS:
            return m.tokenizer.encode(text, add_special_tokens=special), text
        return await asyncio.to_thread(m.tokenizer.encode, text, special), text
    except (TokenizerError, RenderError) as exc:
        raise BadRequest(str(exc)) from None


async def _render(m: Model, body: dict[str, Any], chat: bool, think: bool | None,
                  renderer: TemplateRenderer, tools: list[dict[str, Any]] | None = None) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer adds its special tokens: only for plain text)."""
    tok = m.tokenizer
    extra: dict[str, Any] = {} if think is None else {"enable_thinking": think}
    if tools:
        extra["tools"] = tools
    if chat:
        try:
            messages = chat_messages(body.get("messages"), max_chars=MAX_PROMPT_CHARS)
        except ToolError as exc:
            raise BadRequest(str(exc)) from None
        if tok.chat_template is None:
            return "\n".join(x["content"] for x in messages), True
        return await renderer.render(m.name, tok.chat_template, tok.chat_variables(messages, **extra)), False
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest("prompt must be a string")
    if system is not None and not isinstance(system, str):
        raise BadRequest("system must be a string")
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise BadRequest("raw must be true or false")
    if raw or tok.chat_template is None:
        return prompt, True
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return await renderer.render(m.name, tok.chat_template, tok.chat_variables(messages, **extra)), False


async def read_json(request: web.Request) -> dict[str, Any]:
    """A request's body as a JSON object (BadRequest when it is not one)."""
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def read_body(request: web.Request, no_model: str = 'say which model: {"model": "name"}') -> dict[str, Any]:
    """A request's JSON object, which names a model (BadRequest saying what is wrong)."""
    body = await read_json(request)
    if not isinstance(body.get("model"), str) or not body["model"].strip():
        raise BadRequest(no_model)
    return body


def error_for(exc: DriverError) -> tuple[int, str]:
    """The HTTP status of a driver error: 404 unknown model, 503 busy or not ready, 500 broken."""
    if isinstance(exc, ModelNotFound):
        return 404, str(exc)
    if isinstance(exc, GenerationError):
        return 500, str(exc)
    return 503, str(exc)


def add_generate_routes(app: web.Application, loaded: LoadedModels, sessions: Sessions,
                        renderer: TemplateRenderer) -> None:
    async def run(request: web.Request, chat: bool) -> web.StreamResponse:
        t_start = time.monotonic()
        try:
            body = await read_body(request)
            sampling, num_predict, num_ctx, stop = parse_options(body.get("options"))
            stream = body.get("stream", True)
            if not isinstance(stream, bool):
                raise BadRequest("stream must be true or false")
            think, keep_alive = parse_think(body.get("think")), parse_keep_alive(body.get("keep_alive"))
            want_logprobs = _logprobs_wanted(body)
            refuse_unsupported(body, chat)
            was_loaded = await loaded.resolve(body["model"]) in loaded.table
            empty = not (body.get("messages") if chat else body.get("prompt"))
            if empty and keep_alive == 0 and not was_loaded:
                return load_only(body["model"], chat, "unload", 0)
            m = await loaded.get(body["model"], keep_alive=keep_alive)
            refuse_embedding_model(m)
            load_ns = 0 if was_loaded else int((time.monotonic() - t_start) * 1e9)
            if empty:
                unloaded = keep_alive == 0 and await release_if_idle(m)
                return load_only(body["model"], chat, "unload" if unloaded else "load", load_ns)
            tools = request_tools(m, body) if chat else []
            grammar = await constrained(lambda: ollama_format(body.get("format")), "format")
            prompt, prompt_text = await _prompt_ids(m, body, chat, renderer, think, tools)
            context = min(m.max_context, num_ctx or m.max_context)
            if len(prompt) + 1 > context:
                raise BadRequest(f"the prompt has {len(prompt)} tokens; the context holds {context}")
            limit = context - len(prompt) if num_predict < 0 else min(num_predict, context - len(prompt))
            gen = sessions.open(m, Request(tuple(prompt), sampling, limit, tuple(stop), grammar))
            t_prompt = time.monotonic()
            await gen.start()  # errors before any output are HTTP errors
        except BadRequest as exc:
            return error_response(400, str(exc))
        except QueueFull as exc:
            return error_response(503, str(exc))
        except DriverError as exc:
            return error_response(*error_for(exc))
        t_first = time.monotonic()
        name = body["model"]
        splitter = ThinkSplitter(thinking=opens_thinking(prompt_text)) if think is not None else None
        calls = CallParser(style_of(m.tokenizer.chat_template), {t["function"]["name"] for t in tools}) \
            if tools else None
        sent = 0

        def line(text: str, thinking: str = "") -> dict[str, Any]:
            nonlocal sent
            extra: dict[str, Any] = {}
            if want_logprobs:
                extra["logprobs"] = [_logprob_entry(m, t) for t in gen.tokens[sent:]]
                sent = len(gen.tokens)
            if chat:
                message = {"role": "assistant", "content": text}
                if thinking:
                    message["thinking"] = thinking
                piece: dict[str, Any] = {"message": message}
            else:
                piece = {"response": text, **({"thinking": thinking} if thinking else {})}
            return {"model": name, "created_at": _now(), **piece, **extra, "done": False}

        def split(text: str, last: bool = False) -> tuple[str, str]:
            """(answer, reasoning) of a piece; ``think: false`` drops the reasoning; a tool call
            being written is held back (``called`` says what it was at the end)."""
            content, thinking = split_piece(splitter, text, last)
            if calls is not None:
                content = calls.feed(content)
                if last:
                    rest, found = calls.finish()
                    content += rest
                    called.extend(found)
            return content, thinking if think else ""

        called: list[ToolCall] = []

        reason, count = "stop", 0
        if not stream:
            text = ""
            try:
                async for piece in gen.pieces():
                    text += piece.text
                    count, reason = piece.count, piece.reason
            except DriverError as exc:
                return error_response(500, str(exc))
            final = {**line(*split(text, last=True)), "done": True}
            if called:
                final["message"]["tool_calls"] = _ollama_calls(called)
        else:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            try:
                async for piece in gen.pieces():
                    count, reason = piece.count, piece.reason
                    await response.write(json.dumps(line(*split(piece.text))).encode() + b"\n")
            except DriverError as exc:
                await response.write(json.dumps({"error": str(exc)}).encode() + b"\n")
                await response.write_eof()
                return response
            except ConnectionError:  # the client went away: free the session on every node, quietly
                await gen.aclose()
                return response
            final = {**line(*split("", last=True)), "done": True}
            if called:  # as Ollama streams them: a piece with the calls, then the end
                calls_line = line("")
                calls_line["message"]["tool_calls"] = _ollama_calls(called)
                await response.write(json.dumps(calls_line).encode() + b"\n")
        t_end = time.monotonic()
        final.update({
            "done_reason": reason, "total_duration": int((t_end - t_start) * 1e9), "load_duration": load_ns,
            "prompt_eval_count": len(prompt), "prompt_eval_duration": int((t_first - t_prompt) * 1e9),
            "eval_count": count, "eval_duration": int((t_end - t_first) * 1e9),
            "nodes": [s.node_id for s in m.plan.stages],
        })
        if keep_alive == 0:
            await release_if_idle(m)
        if not stream:
            return web.json_response(final)
        await response.write(json.dumps(final).encode() + b"\n")
        await response.write_eof()
        return response

    async def release_if_idle(m: Model) -> bool:
        """keep_alive 0: this node lets go of the model (other entry nodes keep theirs)."""
        if m.sessions or loaded.table.get(m.model_id) is not m:
            return False
        await loaded.release(m)
        return True

    def load_only(name: str, chat: bool, reason: str, load_ns: int) -> web.Response:
        """Ollama's answer to an empty prompt: the model loaded, or unloaded (keep_alive 0)."""
        piece = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        return web.json_response({"model": name, "created_at": _now(), **piece, "done": True,
                                  "done_reason": reason, "load_duration": load_ns})

    async def generate(request: web.Request) -> web.StreamResponse:
        return await run(request, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await run(request, chat=True)

    async def load(request: web.Request) -> web.StreamResponse:
        try:
            body = await read_body(request)
            weights = body.get("weights")
            if weights is not None and weights not in WEIGHT_FORMATS:
                raise BadRequest(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
            pins = await _pins(body.get("pins"), loaded)
            await loaded.resolve(body["model"])
        except BadRequest as exc:
            return error_response(400, str(exc))
        except ModelNotFound as exc:
            return error_response(404, str(exc))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=256)

        def progress(event: dict[str, Any]) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # progress is advisory
                events.put_nowait(event)

        async def load_it() -> Model:
            try:
                return await loaded.get(body["model"], progress=progress, weights=weights, pins=pins)
            finally:
                await events.put(None)

        task = asyncio.ensure_future(load_it())
        try:
            while (event := await events.get()) is not None:  # each node's progress as it comes
                await response.write(json.dumps(event).encode() + b"\n")
            m = await task
            entry = next((e for e in await ps_entries(loaded) if e["digest"] == m.model_id), None)
            await response.write(json.dumps({**(entry or {"name": m.name, "plan": []}), "status": "success"}).encode()
                                 + b"\n")
        except DriverError as exc:
            await response.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        await response.write_eof()
        return response

    async def ps(_: web.Request) -> web.Response:
        return web.json_response({"models": await ps_entries(loaded)})

    async def unload(request: web.Request) -> web.Response:
        try:
            body = await read_body(request)
            done = await loaded.stop(body["model"])
        except BadRequest as exc:
            return error_response(400, str(exc))
        except ModelNotFound as exc:
            return error_response(404, str(exc))
        if not done:
            return error_response(404, f"model {body['model']!r} is not loaded")
        return web.json_response({"status": "success"})

    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/load", load)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/unload", unload)


def _ollama_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _find_nodes(texts: list[str], members: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each node name or id prefix in ``texts`` that names a member -> its node id."""
    by_name = {str(r.get("name")): nid for nid, r in members.items()}
    out = {}
    for text in texts:
        node = by_name.get(text) or next((n for n in members if n.startswith(text.lower())), None)
        if node is not None:
            out[text] = node
    return out


async def _pins(value: Any, loaded: LoadedModels) -> tuple[Pin, ...]:
    """``pins`` of /api/load: [{"node": name or id, "layers": [start, end]}] (layers optional)
    places a model by hand, as the planner's pins: a pinned node always serves, a pinned
    range is served exactly there."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 64:
        raise BadRequest('pins must be a list of {"node": NAME, "layers": [START, END]}')
    if not all(isinstance(pin, dict) and isinstance(pin.get("node"), str) for pin in value):
        raise BadRequest('each pin needs "node": a node name or id')
    # A member whose record is late (a lossy link, a busy machine) is waited for a moment.
    give_up = time.monotonic() + PIN_WAIT
    while True:
        found = _find_nodes([pin["node"] for pin in value], await loaded.members())
        missing = [pin["node"] for pin in value if pin["node"] not in found]
        if not missing:
            break
        if time.monotonic() > give_up:
            raise BadRequest(f"pins: no node called {missing[0][:64]!r} in the cluster (see nodectl status)")
        await asyncio.sleep(1.0)
    out = []
    for pin in value:
        node = found[pin["node"]]
        layers = pin.get("layers")
        if layers is None:
            out.append(Pin(node))
            continue
        if (not isinstance(layers, list) or len(layers) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)):
            raise BadRequest("a pin's layers must be [start, end]")
        out.append(Pin(node, layers[0], layers[1]))
    return tuple(out)
