"""The checks every HTTP request passes before any endpoint sees it: Host, Origin, body type, token.

A web page open in a browser on this machine can reach the API on 127.0.0.1.
Three rules keep it out (Ollama had exactly this hole, CVE-2024-28224):

* **Host.** DNS rebinding points an attacker's name at 127.0.0.1, so the browser
  sends ``Host: rebind.attacker.example``. Only IP literals, ``localhost``, the
  configured ``api.host`` and this machine's own name are accepted; anything else
  is 403.
* **Origin.** A browser names the page that makes a request. A request from
  another page is 403 unless that origin is listed in ``api.allowed_origins``;
  only listed origins get CORS headers (and preflight answers).
* **Body type.** A cross-site form or ``fetch`` with ``text/plain`` needs no
  preflight, so every POST must say ``Content-Type: application/json``; 415 else.
  A POST with no Content-Type at all is read as JSON, as Ollama does (litellm and
  ``curl -d`` send none), but only without an Origin: a browser names the page on
  every POST, and a page's body without a type (a Blob) stays refused.

Then the bearer token, when one is configured: every path but ``/healthz`` and the web
console's page and files (``/``, ``/console/<name>``), which carry no data; the page asks
for the token and sends it on its data requests (node/api/console.py).
Errors are JSON objects like Ollama's (OpenAI's shape under ``/v1/``), never HTML; an
unexpected exception gives a generic 500 and its detail goes to the log only.
"""

from __future__ import annotations

import hmac
import re
import socket
from collections.abc import Awaitable, Callable, Iterable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from node.net.addresses import is_ip

__all__ = ["RequestGuard", "error_response", "refusal"]

log = structlog.get_logger("enjambre.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UNGUARDED = frozenset({"/healthz", "/"})
# One plain file name under /console/ (the console's static files): no data behind it.
_UNGUARDED_ASSET = re.compile(r"/console/[a-z]+\.[a-z]+")


def _json_body(request: web.Request, origin: str | None) -> bool:
    if "Content-Type" not in request.headers:
        return origin is None
    return request.content_type == "application/json"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def refusal(request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
            ) -> web.Response:
    """An error in the shape of the API the request is for: OpenAI's under /v1/, else Ollama's."""
    if request.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": None}},
                                 status=status, headers=headers)
    return error_response(status, message, headers)


def _unguarded(path: str) -> bool:
    return path in _UNGUARDED or _UNGUARDED_ASSET.fullmatch(path) is not None


def _host_name(header: str) -> str:
    """The host part of a Host header ("[::1]:7422" -> "::1", "Example:80" -> "example")."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class RequestGuard:
    """Host, Origin, content type and token checks as one aiohttp middleware."""

    def __init__(self, *, api_host: str, token: str | None, allowed_origins: Iterable[str] = ()) -> None:
        name = socket.gethostname().lower()
        self.hosts = {"localhost", api_host.lower(), name, f"{name}.local"}
        self.origins = {o.lower().rstrip("/") for o in allowed_origins}
        self.token = token

    def host_ok(self, header: str | None) -> bool:
        if not header:
            return False
        host = _host_name(header)
        return is_ip(host) or host in self.hosts

    def origin_ok(self, origin: str, host_header: str) -> bool:
        origin = origin.lower().rstrip("/")
        return origin in self.origins or origin == f"http://{host_header.strip().lower()}"

    @property
    def middleware(self) -> Middleware:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            refusal = self._check(request)
            if refusal is not None:
                return refusal
            cors = self._cors_headers(request)
            if request.method == "OPTIONS" and cors:  # a preflight from a listed origin
                return web.Response(status=204, headers=cors)
            response = await self._run(request, handler)
            response.headers.update(cors)
            return response

        return guard

    def _check(self, request: web.Request) -> web.Response | None:
        host = request.headers.get("Host", "")
        if not self.host_ok(host):
            log.warning("api_host_refused", host=host[:100], path=request.path[:100])
            return refusal(request, 403, "this API answers only to its own address (Host header refused)")
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_ok(origin, host):
            log.warning("api_origin_refused", origin=origin[:100], path=request.path[:100])
            return refusal(
                request, 403, "requests from other web pages are refused; list the page's origin in "
                "api.allowed_origins to allow it"
            )
        if request.method == "OPTIONS":
            return None if origin is not None else refusal(request, 405, "OPTIONS is for CORS preflights")
        if request.method in _BODY_METHODS and not _json_body(request, origin):
            return refusal(request, 415, "send the request body as JSON (Content-Type: application/json)")
        if self.token is not None and not _unguarded(request.path):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return refusal(
                    request, 401, "missing or wrong bearer token (set ENJAMBRE_TOKEN or the config's api.token_file)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None

    def _cors_headers(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is None or origin.lower().rstrip("/") not in self.origins:
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Vary": "Origin",
        }

    async def _run(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return refusal(request, exc.status, exc.reason or "request failed")
            raise
        except Exception:  # never an HTML traceback, nor our internals, to an API client
            log.exception("api handler failed", path=request.path)
            return refusal(request, 500, "internal error (the node's log has the details)")
