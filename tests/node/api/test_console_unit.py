"""The web console's routes in memory: the page and its files, their headers, traversal,
the token (the page loads without it, the data stream needs it), foreign pages, and the
bound on open event streams."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from node.api.app import build_app
from node.api.console import MAX_STREAMS, STATIC_DIR, load_assets
from tests.helpers.nodeview import OneNode

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[TestClient[Any, Any]]:
    token = getattr(request, "param", None)
    c = TestClient(TestServer(build_app(OneNode(name="<script>alert(1)</script>"), token=token), host="127.0.0.1"))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


async def raw_status(port: int, target: str) -> int:
    """The status of a GET sent byte for byte (a client library would tidy the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()


async def first_event(resp: ClientResponse) -> dict[str, Any]:
    data = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
    assert data.startswith(b"data: ")
    event: dict[str, Any] = json.loads(data[6:])
    return event


async def test_root_is_the_page_for_browsers_and_text_for_clients(client: TestClient[Any, Any]) -> None:
    page = await client.get("/", headers=BROWSER)
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/console/console.js" defer></script>' in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "no inline scripts: the CSP forbids them"
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}):
        resp = await client.get("/", headers=headers)
        assert resp.status == 200 and resp.content_type == "text/plain", headers
        assert await resp.text() == "enjambre is running"


async def test_static_files_have_their_types(client: TestClient[Any, Any]) -> None:
    want = {"index.html": "text/html", "console.js": "text/javascript", "console.css": "text/css",
            "icon.svg": "image/svg+xml"}
    assert set(want) <= set(load_assets())
    for name, content_type in want.items():
        resp = await client.get(f"/console/{name}")
        assert resp.status == 200 and resp.content_type == content_type, name
        assert await resp.read() == (STATIC_DIR / name).read_bytes()
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and "Content-Security-Policy" in resp.headers


@pytest.mark.parametrize("target", [
    "/console/../app.py", "/console/..%2Fapp.py", "/console/%2e%2e%2fapp.py", "/console/%2E%2E/app.py",
    "/console/..%5Capp.py", "/console/static/../../console.py", "/console/%2e%2e%2f%2e%2e%2fguard.py",
    "/console//etc/passwd", "/console/nope.js", "/console/", "/console/.", "/console/index.html%00",
])
async def test_nothing_outside_the_static_files_is_served(client: TestClient[Any, Any], target: str) -> None:
    assert await raw_status(client.port, target) in (400, 404), target
    # ...and no such path slips past the token either
    assert (await client.get("/console/nope.js")).status == 404


@pytest.mark.parametrize("client", [TOKEN], indirect=True)
async def test_the_page_loads_without_the_token_but_data_needs_it(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/", headers=BROWSER)).status == 200
    for name in load_assets():  # every file the page needs loads before it has the token
        assert (await client.get(f"/console/{name}")).status == 200, name
    for target in ("/console/../api/console/events", "/console/..%2Fapi%2Fconsole%2Fevents",
                   "/console/x/../../api/cluster/status", "/api/console/events"):
        assert await raw_status(client.port, target) in (401, 404), target
    resp = await client.get("/api/console/events")
    assert resp.status == 401 and "bearer token" in (await resp.json())["error"]
    resp = await client.get("/api/console/events", headers=AUTH)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    event = await first_event(resp)
    assert set(event) == {"status", "models", "tags"}
    assert event["status"]["nodes"][0]["name"] == "<script>alert(1)</script>"  # the page inserts it as text
    resp.close()


@pytest.mark.parametrize("client", [TOKEN], indirect=True)
async def test_foreign_pages_are_refused(client: TestClient[Any, Any]) -> None:
    evil = {"Origin": "http://evil.example"}
    for path in ("/", "/console/console.js", "/api/console/events"):
        resp = await client.get(path, headers={**evil, **AUTH, **BROWSER})
        assert resp.status == 403, path
    same = {"Origin": f"http://127.0.0.1:{client.port}"}
    resp = await client.get("/api/console/events", headers={**same, **AUTH})
    assert resp.status == 200
    resp.close()
    resp = await client.get("/", headers={**BROWSER, "Host": "rebind.attacker.example"})
    assert resp.status == 403


async def test_event_streams_are_bounded_and_end_with_their_client(client: TestClient[Any, Any]) -> None:
    streams = [await client.get("/api/console/events") for _ in range(MAX_STREAMS)]
    try:
        assert all(s.status == 200 for s in streams)
        await asyncio.gather(*(first_event(s) for s in streams))
        extra = await client.get("/api/console/events")
        assert extra.status == 503 and "console streams" in (await extra.json())["error"]
        streams.pop().close()  # a tab closes: its stream ends and frees its place
        for _ in range(50):
            again = await client.get("/api/console/events")
            if again.status == 200:
                break
            await asyncio.sleep(0.1)
        assert again.status == 200
        streams.append(again)
    finally:
        for s in streams:
            s.close()


async def test_open_streams_end_when_the_node_stops(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/api/console/events")
    await first_event(resp)
    await client.server.app.shutdown()  # what stopping the daemon's runner does first
    rest = await asyncio.wait_for(resp.content.read(), 10)
    assert rest == b"" or rest.startswith(b"data: ")
    assert resp.content.at_eof()


class BrokenNode(OneNode):
    async def cluster_status(self) -> dict[str, Any]:
        raise RuntimeError("the directory is unreachable")


async def test_a_failed_snapshot_keeps_the_stream_open() -> None:
    c = TestClient(TestServer(build_app(BrokenNode()), host="127.0.0.1"))
    await c.start_server()
    try:
        resp = await c.get("/api/console/events")
        assert resp.status == 200
        assert await first_event(resp) == {"status": {}, "models": [], "tags": []}
        resp.close()
    finally:
        await c.close()
