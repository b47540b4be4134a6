"""A stand-in for the daemon behind the HTTP API (node/api/app.py's NodeView): a cluster of
one node whose record the test chooses (a hostile name, say)."""

from __future__ import annotations

from typing import Any


class OneNode:
    def __init__(self, **record: Any) -> None:
        self.record = {"id": "ab" * 32, "state": "ready", "self": True, **record}

    async def cluster_status(self) -> dict[str, Any]:
        return {"self": "ab" * 32, "cluster": "cd" * 8, "nodes": [self.record]}

    async def ping_peer(self, node_id: str) -> dict[str, Any]:
        return {"id": node_id}

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def metrics_text(self) -> bytes:
        return b""
