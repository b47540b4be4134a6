"""Ollama's ``POST /api/show`` and ``POST /api/copy``: what a model is, and another name for it.

``/api/show`` {model} (older clients: {name}; ``verbose`` is accepted, there are no
token lists to add) answers Ollama's shape: ``modelfile``, ``parameters``,
``template``, ``details`` (as /api/tags), ``model_info`` (GGUF-style keys from
config.json), ``capabilities`` (``tools`` and ``thinking`` where the chat template has them), ``license`` (when the model has a LICENSE file) and
``modified_at``. It reads the model's small files (config.json, tokenizer_config.json,
generation_config.json, chat_template.jinja, a LICENSE) verified from the store; the
pieces of them this node lacks are fetched from their holders first, as loading a
model does, so any node can answer for any model of the cluster.

``/api/copy`` {source, destination} gives the model another name
(``ModelService.copy``): 200 with an empty body, 404 for an unknown source, 400 for
a bad or taken destination. ``DELETE /api/delete`` of such a name removes only it.

``show_view`` is the pure part: files in, Ollama's answer out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from node.api.generate import BadRequest, read_json
from node.api.guard import error_response
from node.api.models import model_details, ollama_time
from node.api.tools import template_knows_tools
from node.engine.config import is_bert
from node.pipeline.models import LoadedModels
from node.pipeline.views import ps_entries
from node.store.models import normalize_name
from node.store.pieces import StoreError
from node.swarm.service import BadModelName, ModelService, ModelUnknown
from protocol.manifest import Manifest

__all__ = ["add_show_routes", "show_view"]

SMALL_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
LICENSE_FILES = ("license", "license.txt", "license.md")  # compared lower-cased
MAX_SMALL = 8 * 2**20  # a tokenizer_config.json with every added token is a few hundred KiB
MAX_LICENSE = 256 * 1024

# config.json key -> the key after "<architecture>." in Ollama's model_info (GGUF names).
_MODEL_INFO = (
    ("max_position_embeddings", "context_length"),
    ("hidden_size", "embedding_length"),
    ("num_hidden_layers", "block_count"),
    ("intermediate_size", "feed_forward_length"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
    ("head_dim", "attention.key_length"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("rope_theta", "rope.freq_base"),
    ("vocab_size", "vocab_size"),
)


# ---------------------------------------------------------------------------- the pure part


def _json_object(data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config writes a token as its text or as {"content": text, ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    return [i for i in items if isinstance(i, int) and not isinstance(i, bool)]


def stop_strings(files: Mapping[str, bytes]) -> list[str]:
    """The texts of the tokens generation stops on: the end-of-turn token and the
    generation_config (else config.json) eos ids, named through added_tokens_decoder."""
    tcfg = _json_object(files.get("tokenizer_config.json"))
    ids = _ids(_json_object(files.get("generation_config.json")).get("eos_token_id")) \
        or _ids(_json_object(files.get("config.json")).get("eos_token_id"))
    decoder = tcfg.get("added_tokens_decoder")
    decoder = decoder if isinstance(decoder, dict) else {}
    named = [_token_text(decoder.get(str(i))) for i in ids]
    return list(dict.fromkeys(s for s in (_token_text(tcfg.get("eos_token")), *named) if s))


def chat_template(files: Mapping[str, bytes]) -> str:
    template = _json_object(files.get("tokenizer_config.json")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if isinstance(template, str):
        return template
    jinja = files.get("chat_template.jinja")
    return jinja.decode("utf-8", "replace") if jinja is not None else ""


def model_info(config: dict[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's model_info keys from config.json (a multimodal model's text_config wins)."""
    text = config.get("text_config")
    merged = {**config, **text} if isinstance(text, dict) else config
    arch = str(merged.get("model_type") or summary.get("model_type") or "unknown")
    info: dict[str, Any] = {"general.architecture": arch}
    if isinstance(summary.get("parameters"), int):
        info["general.parameter_count"] = summary["parameters"]
    for key, ollama_key in _MODEL_INFO:
        value = merged.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            info[f"{arch}.{ollama_key}"] = value
    return info


def _parameters_text(stops: list[str], num_ctx: int | None = None) -> str:
    lines = [f"{'num_ctx':<30} {num_ctx}"] if num_ctx else []
    return "\n".join(lines + [f"{'stop':<30} {json.dumps(s)}" for s in stops])


def _modelfile(name: str, template: str, stops: list[str], license_text: str | None) -> str:
    lines = [
        '# Modelfile generated by "nodectl show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {name}",
        "",
        f"FROM {name}",
    ]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if license_text:
        lines.append(f'LICENSE """{license_text}"""')
    return "\n".join(lines) + "\n"


def license_path(manifest: Manifest) -> str | None:
    return next((f.path for f in manifest.files if f.path.lower() in LICENSE_FILES), None)


def show_view(name: str, manifest: Manifest, files: Mapping[str, bytes], *, modified: float,
              stops: list[str] | None = None, loaded_context: int | None = None) -> dict[str, Any]:
    """Ollama's /api/show answer. ``files``: path -> bytes of the small files read;
    ``stops``: the loaded tokenizer's stop texts, when the model is loaded here;
    ``loaded_context``: the context it is loaded with, when it is loaded in the cluster
    (``num_ctx`` in the parameters, and ``context_length`` beside model_info's maximum)."""
    template = chat_template(files)
    stops = stop_strings(files) if stops is None else stops
    path = license_path(manifest)
    license_text = files[path].decode("utf-8", "replace") if path is not None and path in files else None
    capabilities = ["completion"] + (["tools"] if template_knows_tools(template) else []) \
        + (["thinking"] if "<think>" in template else [])
    if is_bert(_json_object(files.get("config.json"))):
        capabilities = ["embedding"]  # as Ollama lists its bert models: no generation
    view: dict[str, Any] = {
        "modelfile": _modelfile(name, template, stops, license_text),
        "parameters": _parameters_text(stops, loaded_context),
        "template": template,
        "details": {"parent_model": "", **model_details(dict(manifest.summary))},
        "model_info": model_info(_json_object(files.get("config.json")), manifest.summary),
        "capabilities": capabilities,
        "modified_at": ollama_time(modified),
    }
    if license_text is not None:
        view["license"] = license_text
    if loaded_context:
        view["context_length"] = loaded_context
    return view


# ---------------------------------------------------------------------------- I/O


async def read_small_files(service: ModelService, manifest: Manifest) -> dict[str, bytes]:
    """The model's small files /api/show needs (a LICENSE's first MAX_LICENSE bytes),
    fetching the pieces this node lacks; StoreError when no holder can send them."""
    wanted = {f.path: f.size for f in manifest.files if f.path in SMALL_FILES and f.size <= MAX_SMALL}
    path = license_path(manifest)
    if path is not None:
        wanted[path] = min(manifest.files[manifest.file_index(path)].size, MAX_LICENSE)
    await service.ensure(manifest, manifest.pieces_for_ranges((p, 0, n) for p, n in wanted.items()))
    return {p: await asyncio.to_thread(service.store.read_range, manifest, p, 0, n) for p, n in wanted.items()}


def _loaded_stops(loaded: LoadedModels | None, model_id: str) -> list[str] | None:
    """The loaded tokenizer's stop tokens: exactly what this daemon stops on."""
    m = loaded.table.get(model_id) if loaded is not None else None
    if m is None:
        return None
    return [m.tokenizer.decode([i], skip_special_tokens=False) for i in sorted(m.tokenizer.stop_token_ids)]


def add_show_routes(app: web.Application, service: ModelService, loaded: LoadedModels | None) -> None:
    async def show(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except BadRequest as exc:
            return error_response(400, str(exc))
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name.strip():
            return error_response(400, 'say which model: {"model": "name"}')
        if not isinstance(body.get("verbose", False), bool):
            return error_response(400, "verbose must be true or false")
        model_id = None
        try:
            model_id = await service.find(name)
        except ModelUnknown as exc:  # e.g. a name two models claim: the answer says which
            return error_response(404, str(exc))
        except Exception:  # a DHT that cannot answer means "not found" here
            pass
        if model_id is None:
            return error_response(404, f"model {name[:200]!r} not found")
        try:
            manifest = await service.manifest(model_id)
            files = await read_small_files(service, manifest)
        except StoreError as exc:
            return error_response(503, f"cannot read the files of model {name[:200]!r}: {exc}")
        shown = _shown_name(service, name, model_id)
        modified = service.store.added_at(model_id) or time.time()
        context = None
        if loaded is not None:
            with contextlib.suppress(Exception):  # the directory unreadable: show the model's own figures
                context = next((e["context_length"] for e in await ps_entries(loaded) if e["digest"] == model_id),
                               None)
        return web.json_response(show_view(shown, manifest, files, modified=modified,
                                           stops=_loaded_stops(loaded, model_id), loaded_context=context))

    async def copy(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except BadRequest as exc:
            return error_response(400, str(exc))
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not source.strip() or not isinstance(destination, str):
            return error_response(400, 'say what to copy where: {"source": "name", "destination": "new-name"}')
        try:
            await service.copy(source, destination)
        except ModelUnknown as exc:
            return error_response(404, str(exc))
        except BadModelName as exc:
            return error_response(400, str(exc))
        except StoreError as exc:
            return error_response(503, f"cannot copy {source[:200]!r}: {exc}")
        return web.Response(status=200)

    app.router.add_post("/api/show", show)
    app.router.add_post("/api/copy", copy)


def _shown_name(service: ModelService, asked: str, model_id: str) -> str:
    """The name a modelfile's FROM gives: the one asked for, or the model's first for an id."""
    text = asked.strip().lower()
    if model_id.startswith(text):
        names = service.store.names_of(model_id)
        return names[0] if names else model_id
    try:
        return normalize_name(text)
    except ValueError:
        return text
