"""The local HTTP API: cluster endpoints, Prometheus metrics, health.

Bound to 127.0.0.1 unless configured; when exposed beyond loopback every request
but the health check needs the bearer token. Errors are JSON objects
``{"error": "..."}`` like Ollama's, never HTML tracebacks.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from node import __version__
from node.cluster.ping import PeerNotFound, PeerUnreachable
from node.system.metrics import CONTENT_TYPE

log = structlog.get_logger("enjambre.api")

JSON = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class NodeView(Protocol):
    """What the API needs from the daemon."""

    async def cluster_status(self) -> JSON: ...

    async def ping_peer(self, node_id: str) -> JSON: ...

    def health(self) -> JSON: ...

    def metrics_text(self) -> bytes: ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _auth_middleware(token: str | None) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token (set ENJAMBRE_TOKEN or --token)")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, exc.reason or "request failed")
            raise
        except Exception as exc:  # never an HTML traceback to an API client
            log.exception("api handler failed", path=request.path)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    return middleware


def build_app(node: NodeView, *, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware(token)], client_max_size=1 << 20)

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def health(_: web.Request) -> web.Response:
        return web.json_response(node.health())

    async def status(_: web.Request) -> web.Response:
        return web.json_response(await node.cluster_status())

    async def ping(request: web.Request) -> web.Response:
        node_id = request.match_info["node_id"].lower()
        if not (4 <= len(node_id) <= 64) or any(c not in "0123456789abcdef" for c in node_id):
            return _error(400, "node id must be 4 to 64 hex digits (see `nodectl status`)")
        try:
            return web.json_response(await node.ping_peer(node_id))
        except PeerNotFound as exc:
            return _error(404, str(exc))
        except PeerUnreachable as exc:
            return _error(502, str(exc))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=node.metrics_text(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", health)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/cluster/status", status)
    app.router.add_post("/api/cluster/ping/{node_id}", ping)
    app.router.add_get("/metrics", metrics)
    return app
