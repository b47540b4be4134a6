"""The web console every node serves: the page at ``/``, its files at ``/console/{file}``,
and the live snapshot it draws at ``GET /api/console/events``.

The page is plain HTML, CSS and JavaScript shipped in ``node/api/static`` (no CDN, no
build step). ``/`` answers a browser (``Accept: text/html``) with the page and any other
client with the plain text Ollama's clients probe for.

The page and its files carry no data, so node/api/guard.py lets them through without the
bearer token: a browser must be able to load the page before it can ask for the token.
They still pass the Host and Origin checks. Everything the page shows comes from data
endpoints that do need the token, the event stream included; the page keeps the token in
``localStorage`` and sends it on every request. The page's headers forbid inline scripts,
framing and content sniffing, so a peer that names itself ``<script>`` stays text.

The event stream sends ``data: {"status", "models", "tags"}`` about once a second: the
cluster status, the ``/api/ps`` entries of the loaded models and the ``/api/tags`` models.
One snapshot is shared by every open stream, and at most ``MAX_STREAMS`` are open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web

from node.api.guard import error_response
from node.api.models import tags_view
from node.pipeline.models import LoadedModels
from node.pipeline.views import ps_entries
from node.swarm.service import ModelService

__all__ = ["MAX_STREAMS", "STATIC_DIR", "add_console_routes"]

log = structlog.get_logger("enjambre.api")

STATIC_DIR = Path(__file__).parent / "static"
MAX_STREAMS = 16
RUNNING_TEXT = "enjambre is running"

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# Same-origin everything, nothing inline, never framed: the page is the only code it runs.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class StatusSource(Protocol):
    """The one thing the console needs from the daemon besides the models and the driver."""

    async def cluster_status(self) -> dict[str, Any]: ...


def load_assets(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The files the console serves, by name: only plain files of a known type, read once."""
    return {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in sorted(directory.iterdir())
            if p.is_file() and p.suffix in _TYPES}


def wants_html(accept: str) -> bool:
    return "text/html" in accept.lower()


class Snapshots:
    """The console's snapshot, computed at most once per ``interval`` whoever asks."""

    def __init__(self, node: StatusSource, models: ModelService | None, loaded: LoadedModels | None,
                 interval: float) -> None:
        self.node, self.models, self.loaded, self.interval = node, models, loaded, interval
        self._lock = asyncio.Lock()
        self._at = -float("inf")
        self._data = b""

    async def get(self) -> bytes:
        async with self._lock:
            if time.monotonic() - self._at >= self.interval:
                try:
                    self._data = json.dumps(await self._build(), separators=(",", ":")).encode()
                except Exception:  # a failed look-up (the DHT's catalog) must not end every stream
                    log.warning("console_snapshot_failed", exc_info=True)
                    self._data = self._data or b'{"status":{},"models":[],"tags":[]}'
                self._at = time.monotonic()
            return self._data

    async def _build(self) -> dict[str, Any]:
        loaded = await ps_entries(self.loaded) if self.loaded is not None else []
        tags: list[dict[str, Any]] = []
        if self.models is not None:
            tags = tags_view(await self.models.catalog(), self.models.dht.node_id)["models"]
        return {"status": await self.node.cluster_status(), "models": loaded, "tags": tags}


def add_console_routes(app: web.Application, node: StatusSource, *, models: ModelService | None = None,
                       loaded: LoadedModels | None = None, interval: float = 1.0,
                       max_streams: int = MAX_STREAMS) -> None:
    assets = load_assets()
    snapshots = Snapshots(node, models, loaded, interval)
    stopping = asyncio.Event()  # set when the app shuts down: open streams end, never stall it
    open_streams = 0

    async def root(request: web.Request) -> web.Response:
        if not wants_html(request.headers.get("Accept", "")):
            return web.Response(text=RUNNING_TEXT, content_type="text/plain")
        return _asset(assets, "index.html")

    async def static(request: web.Request) -> web.Response:
        return _asset(assets, request.match_info["file"])

    async def events(request: web.Request) -> web.StreamResponse:
        nonlocal open_streams
        if open_streams >= max_streams:
            return error_response(503, f"this node already serves {max_streams} console streams; "
                                       "close another console tab and retry")
        open_streams += 1
        try:
            return await _stream(request, snapshots, interval, stopping)
        finally:
            open_streams -= 1

    async def stop_streams(_: web.Application) -> None:
        stopping.set()

    app.on_shutdown.append(stop_streams)
    app.router.add_get("/", root)
    app.router.add_get("/console/{file}", static)
    app.router.add_get("/api/console/events", events)


def _asset(assets: dict[str, tuple[bytes, str]], name: str) -> web.Response:
    if name not in assets:  # names only, never paths: nothing outside the directory exists here
        return error_response(404, f"the console has no file {name[:64]!r}")
    body, content_type = assets[name]
    return web.Response(body=body, headers={"Content-Type": content_type, **_PAGE_HEADERS})


async def _stream(request: web.Request, snapshots: Snapshots, interval: float,
                  stopping: asyncio.Event) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        while not stopping.is_set() and request.transport is not None and not request.transport.is_closing():
            await response.write(b"data: " + await snapshots.get() + b"\n\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
        await response.write_eof()
    except ConnectionError:  # the client went away mid-write
        pass
    return response
