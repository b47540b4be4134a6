"""Model endpoints of the HTTP API, in Ollama's shapes: pull, tags, delete, and the files for export.

``POST /api/pull`` streams NDJSON progress lines like Ollama's (``status``,
``digest``, ``total``, ``completed``; a last ``{"status": "success"}`` or an
``{"error": ...}`` line) unless the request says ``"stream": false``. ``model``
may be a local directory (imported), ``hf:org/repo`` or a name or id in the
cluster; ``name``, ``piece_size`` and ``in_place`` are enjambre's additions.
``GET /api/models/{name}/files/{path}`` streams one of a model's files, verified
piece by piece, which is how ``nodectl pull --export`` writes the originals.
``DELETE /api/delete`` of a name the model shares with others (a copy) removes only
that name (ModelService.remove).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from node.api.guard import error_response
from node.store.pieces import StoreError
from node.swarm.service import ModelService
from protocol.manifest import ManifestError

__all__ = ["add_model_routes", "model_details", "ollama_time", "tags_view"]

_MIN_PIECE, _MAX_PIECE = 16 * 1024, 64 * 2**20


def ollama_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def model_details(summary: dict[str, Any]) -> dict[str, Any]:
    """Ollama's ``details`` object from a manifest summary (/api/tags and /api/show)."""
    family = summary.get("model_type")
    return {
        "format": summary.get("format", "safetensors"), "family": family or "",
        "families": [family] if family else None, "parameter_size": _params(summary.get("parameters")),
        "quantization_level": str(summary.get("quantization") or summary.get("torch_dtype") or ""),
    }


def tags_view(catalog: dict[str, dict[str, Any]], self_id: str) -> dict[str, Any]:
    """Ollama's /api/tags shape, with enjambre's cluster facts beside it."""
    models = []
    for model_id, entry in sorted(catalog.items(), key=lambda kv: (kv[1]["names"] or [kv[0]])[0]):
        summary = entry.get("summary") or {}
        pieces = entry.get("pieces") or 0
        holders = entry.get("holders") or {}
        params = summary.get("parameters")
        for name in entry["names"] or [model_id[:12]]:
            models.append({
                "name": name, "model": name, "modified_at": ollama_time(entry.get("added_at") or time.time()), "size": entry["size"],
                "digest": model_id, "details": model_details(summary),
                "architecture": summary.get("architecture"), "parameters": params,
                "copies": sum(1 for n in holders.values() if pieces and n >= pieces),
                "holders": len(holders), "local_share": (holders.get(self_id, 0) / pieces) if pieces else 0.0,
            })
    return {"models": models}


def _params(count: Any) -> str:
    if not isinstance(count, int) or count <= 0:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def add_model_routes(app: web.Application, service: ModelService, self_id: str) -> None:
    async def pull(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object")
        # Ollama's clients send {"model": ...} (older ones {"name": ...}); with both, name renames.
        source = body.get("model") or body.get("name")
        if not isinstance(source, str) or not source.strip():
            return error_response(400, 'say what to pull: {"model": "DIR | hf:org/repo | name"}')
        name = body.get("name") if body.get("model") else None
        piece_size, in_place = body.get("piece_size"), body.get("in_place", False)
        if name is not None and not isinstance(name, str):
            return error_response(400, "name must be a string")
        if piece_size is not None and (not isinstance(piece_size, int) or not _MIN_PIECE <= piece_size <= _MAX_PIECE):
            return error_response(400, f"piece_size must be an integer from {_MIN_PIECE} to {_MAX_PIECE}")
        if not isinstance(in_place, bool):
            return error_response(400, "in_place must be true or false")
        layers = body.get("layers")
        if layers is not None and (not isinstance(layers, list) or len(layers) != 2
                                   or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            return error_response(400, "layers must be [start, end]")
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=1024)

        def progress(event: dict[str, Any]) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # progress is advisory: never block the pull
                events.put_nowait(event)

        async def run() -> dict[str, Any]:
            try:
                return await service.pull(source.strip(), name=name, piece_size=piece_size, in_place=in_place,
                                          layers=tuple(layers) if layers else None, progress=progress)
            finally:
                await events.put(None)

        task = asyncio.ensure_future(run())
        if body.get("stream", True) is False:
            while await events.get() is not None:
                pass
            try:
                result = await task
            except StoreError as exc:
                return error_response(400, str(exc))
            return web.json_response({"status": "success", **result})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            while (event := await events.get()) is not None:
                await response.write(json.dumps(event).encode() + b"\n")
            result = await task
            await response.write(json.dumps({"status": "success", **result}).encode() + b"\n")
        except StoreError as exc:
            await response.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        finally:
            task.cancel()
        await response.write_eof()
        return response

    async def tags(_: web.Request) -> web.Response:
        return web.json_response(tags_view(await service.catalog(), self_id))

    async def delete(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the body must be a JSON object")
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(name, str):
            return error_response(400, 'say which model: {"model": "name"}')
        try:
            return web.json_response(await service.remove(name))
        except StoreError as exc:
            return error_response(404, str(exc))

    def _manifest(name: str) -> Any:
        model_id = service.store.resolve(name)
        if model_id is None:
            raise web.HTTPNotFound(reason=f"no model {name!r} on this node")
        return service.store.manifest(model_id)

    async def files(request: web.Request) -> web.Response:
        manifest = _manifest(request.match_info["name"])
        return web.json_response({"id": manifest.model_id,
                                  "files": [{"path": f.path, "size": f.size} for f in manifest.files]})

    async def file(request: web.Request) -> web.StreamResponse:
        manifest = _manifest(request.match_info["name"])
        path = request.match_info["path"]
        try:
            entry = manifest.files[manifest.file_index(path)]
        except ManifestError:
            return error_response(404, f"model {manifest.model_id[:12]} has no file {path[:200]!r}")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(entry.size)})
        await response.prepare(request)
        chunks = service.store.file_chunks(manifest, path)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            await response.write(chunk)
        await response.write_eof()
        return response

    app.router.add_post("/api/pull", pull)
    app.router.add_get("/api/tags", tags)
    app.router.add_delete("/api/delete", delete)
    app.router.add_get("/api/models/{name}/files", files)
    app.router.add_get("/api/models/{name}/files/{path:.+}", file)
