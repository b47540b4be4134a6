"""The HTTP API in memory: bearer token, JSON errors, metrics content."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from node.api.app import build_app
from node.cluster.ping import PeerNotFound, PeerUnreachable


class FakeNode:
    def __init__(self) -> None:
        self.pinged: list[str] = []

    async def cluster_status(self) -> dict[str, Any]:
        return {"self": "ab" * 32, "nodes": []}

    async def ping_peer(self, node_id: str) -> dict[str, Any]:
        self.pinged.append(node_id)
        if node_id == "dead":
            raise PeerUnreachable("node dead did not answer")
        if node_id == "b0b0":
            raise RuntimeError("boom")
        if node_id != "abcd":
            raise PeerNotFound(f"no node with id {node_id}")
        return {"id": node_id, "rtt_ms": 1.0}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "state": "ready"}

    def metrics_text(self) -> bytes:
        return b"# TYPE x gauge\nx 1\n"


async def _client(token: str | None) -> TestClient[Any, Any]:
    client = TestClient(TestServer(build_app(FakeNode(), token=token), host="127.0.0.1"))
    await client.start_server()
    return client


async def test_token_is_required_when_set() -> None:
    client = await _client("s3cret-token")
    try:
        assert (await client.get("/healthz")).status == 200  # liveness stays open
        resp = await client.get("/api/cluster/status")
        assert resp.status == 401 and "bearer token" in (await resp.json())["error"]
        resp = await client.get("/api/cluster/status", headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
        resp = await client.get("/api/cluster/status", headers={"Authorization": "Bearer s3cret-token"})
        assert resp.status == 200 and (await resp.json())["self"] == "ab" * 32
    finally:
        await client.close()


async def test_errors_are_json_and_ids_are_checked() -> None:
    client = await _client(None)
    try:
        resp = await client.get("/api/missing")
        assert resp.status == 404 and "error" in await resp.json()
        resp = await client.post("/api/cluster/ping/not-hex!", json={})
        assert resp.status == 400 and "hex" in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/ffff", json={})
        assert resp.status == 404 and "no node" in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/dead", json={})
        assert resp.status == 502 and "did not answer" in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/b0b0", json={})
        # the exception's text stays in the log
        assert resp.status == 500 and "boom" not in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/ABCD", json={})
        assert resp.status == 200 and (await resp.json())["id"] == "abcd"
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.content_type == "text/plain"
        assert "x 1" in await resp.text()
        assert (await (await client.get("/api/version")).json())["version"]
    finally:
        await client.close()


async def _guarded(origins: tuple[str, ...] = ()) -> TestClient[Any, Any]:
    app = build_app(FakeNode(), api_host="127.0.0.1", allowed_origins=origins)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_dns_rebinding_host_is_refused() -> None:
    client = await _guarded()
    try:
        for host in ("rebind.attacker.example:7422", "attacker.example", "", "127.0.0.1.nip.io:7422"):
            resp = await client.get("/api/cluster/status", headers={"Host": host})
            assert resp.status == 403, host
            assert "Host" in (await resp.json())["error"]
        for host in ("127.0.0.1:7422", "localhost:7422", "[::1]:7422", "192.168.1.20", "LOCALHOST"):
            assert (await client.get("/api/cluster/status", headers={"Host": host})).status == 200, host
        resp = await client.get("/metrics", headers={"Host": "evil.example"})
        assert resp.status == 403
    finally:
        await client.close()


async def test_foreign_pages_and_simple_posts_are_refused() -> None:
    client = await _guarded()
    try:
        resp = await client.get("/api/cluster/status", headers={"Origin": "http://evil.example"})
        assert resp.status == 403 and "api.allowed_origins" in (await resp.json())["error"]
        assert "Access-Control-Allow-Origin" not in resp.headers
        # A cross-site form / fetch with text/plain needs no preflight: refused by its type.
        resp = await client.post("/api/cluster/ping/abcd", data="x", headers={"Content-Type": "text/plain"})
        assert resp.status == 415
        # No Content-Type at all is JSON, as Ollama reads it (litellm, curl -d) — but not from a page,
        # which names itself in Origin (a Blob body has no type and needs no preflight).
        same = f"http://127.0.0.1:{client.port}"
        resp = await client.post("/api/cluster/ping/abcd", data=b"{}", skip_auto_headers=("Content-Type",),
                                 headers={"Origin": same})
        assert resp.status == 415
        resp = await client.post("/api/cluster/ping/abcd", data=b"{}", skip_auto_headers=("Content-Type",))
        assert resp.status != 415
        resp = await client.post("/api/cluster/ping/abcd", data=b"{}", skip_auto_headers=("Content-Type",),
                                 headers={"Origin": "http://evil.example"})
        assert resp.status == 403
        # The same origin (a page the node serves itself) is fine, and gets no CORS headers.
        resp = await client.get("/api/cluster/status", headers={"Origin": same})
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
        resp = await client.options("/api/cluster/status", headers={"Origin": "http://evil.example"})
        assert resp.status == 403
    finally:
        await client.close()


async def test_listed_origins_get_cors() -> None:
    client = await _guarded(("http://192.168.1.30:3000",))
    try:
        headers = {"Origin": "http://192.168.1.30:3000"}
        pre = await client.options("/api/cluster/ping/abcd", headers={
            **headers, "Access-Control-Request-Method": "POST"})
        assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == headers["Origin"]
        resp = await client.post("/api/cluster/ping/abcd", json={}, headers=headers)
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == headers["Origin"]
    finally:
        await client.close()
