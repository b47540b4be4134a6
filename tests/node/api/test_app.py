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
        resp = await client.post("/api/cluster/ping/not-hex!")
        assert resp.status == 400 and "hex" in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/ffff")
        assert resp.status == 404 and "no node" in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/dead")
        assert resp.status == 502 and "did not answer" in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/b0b0")
        assert resp.status == 500 and "boom" in (await resp.json())["error"]
        resp = await client.post("/api/cluster/ping/ABCD")
        assert resp.status == 200 and (await resp.json())["id"] == "abcd"
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.content_type == "text/plain"
        assert "x 1" in await resp.text()
        assert (await (await client.get("/api/version")).json())["version"]
    finally:
        await client.close()
