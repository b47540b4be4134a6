"""The local HTTP API: cluster endpoints, Prometheus metrics, health.

Bound to 127.0.0.1 unless configured. Every request passes node/api/guard.py first
(Host, Origin, JSON bodies, the bearer token when the API leaves loopback), so
every endpoint added here is protected the same way. Errors are JSON objects
``{"error": "..."}`` like Ollama's, never HTML tracebacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from aiohttp import web

from node import __version__
from node.api.console import add_console_routes
from node.api.embed import add_embed_routes
from node.api.generate import add_generate_routes
from node.api.guard import RequestGuard, error_response
from node.api.models import add_model_routes
from node.api.openai import add_openai_routes
from node.api.show import add_show_routes
from node.api.templates import TemplateRenderer
from node.cluster.ping import PeerNotFound, PeerUnreachable
from node.pipeline.models import LoadedModels
from node.pipeline.session import Sessions
from node.swarm.service import ModelService
from node.system.metrics import CONTENT_TYPE

JSON = dict[str, Any]


class NodeView(Protocol):
    """What the API needs from the daemon."""

    async def cluster_status(self) -> JSON: ...

    async def ping_peer(self, node_id: str) -> JSON: ...

    def health(self) -> JSON: ...

    def metrics_text(self) -> bytes: ...


def build_app(
    node: NodeView, *, models: ModelService | None = None, loaded: LoadedModels | None = None,
    sessions: Sessions | None = None,
    token: str | None = None,
    api_host: str = "127.0.0.1", allowed_origins: Iterable[str] = (),
) -> web.Application:
    guard = RequestGuard(api_host=api_host, token=token, allowed_origins=allowed_origins)
    app = web.Application(middlewares=[guard.middleware], client_max_size=1 << 20)

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def health(_: web.Request) -> web.Response:
        return web.json_response(node.health())

    async def status(_: web.Request) -> web.Response:
        return web.json_response(await node.cluster_status())

    async def ping(request: web.Request) -> web.Response:
        node_id = request.match_info["node_id"].lower()
        if not (4 <= len(node_id) <= 64) or any(c not in "0123456789abcdef" for c in node_id):
            return error_response(400, "node id must be 4 to 64 hex digits (see `nodectl status`)")
        try:
            return web.json_response(await node.ping_peer(node_id))
        except PeerNotFound as exc:
            return error_response(404, str(exc))
        except PeerUnreachable as exc:
            return error_response(502, str(exc))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=node.metrics_text(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", health)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/cluster/status", status)
    app.router.add_post("/api/cluster/ping/{node_id}", ping)
    app.router.add_get("/metrics", metrics)
    add_console_routes(app, node, models=models, loaded=loaded)
    if models is not None:
        add_model_routes(app, models, models.dht.node_id)
        add_show_routes(app, models, loaded)
    if models is not None and loaded is not None and sessions is not None:
        renderer = TemplateRenderer()

        async def stop_renderer(_: web.Application) -> None:
            await renderer.close()

        app.on_cleanup.append(stop_renderer)
        add_generate_routes(app, loaded, sessions, renderer)
        add_openai_routes(app, loaded, sessions, models, renderer)
        add_embed_routes(app, loaded, sessions)
    return app
