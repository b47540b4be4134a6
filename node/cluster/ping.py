"""``nodectl ping``: find a member by id prefix in the directory and time a round trip to it.

The connection is the same mutual-TLS stream the pipeline uses, so the time is the
real cost of one small request between the two nodes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from node.net.addresses import format_hostport
from node.net.errors import TransportError
from node.net.transport import Transport

__all__ = ["PeerNotFound", "PeerUnreachable", "ping_member"]


class PeerNotFound(LookupError):
    """The node id is not in the cluster directory."""


class PeerUnreachable(ConnectionError):
    """The node is in the directory but did not answer over the transport."""


async def ping_member(
    transport: Transport, members: Mapping[str, Mapping[str, Any]], node_id: str, *, timeout: float = 5.0  # noqa: ASYNC109
) -> dict[str, Any]:
    """Connect to the member whose id starts with ``node_id`` and time a ``node.info`` request."""
    matches = [nid for nid in members if nid.startswith(node_id)]
    if len(matches) != 1:
        raise PeerNotFound(
            f"no node with id {node_id}" if not matches else f"id prefix {node_id} is ambiguous"
        )
    target = matches[0]
    value = members[target]
    host, port = value["addresses"][0], int(value["peer_port"])
    where = format_hostport(host, port)
    start = time.perf_counter()
    try:
        conn = await asyncio.wait_for(transport.connect(host, port, expect_node_id=target), timeout)
        connected = time.perf_counter()
        info = await conn.request("node.info", None, timeout=timeout)
    except (TransportError, OSError, TimeoutError) as exc:
        raise PeerUnreachable(
            f"node {target[:12]} at {where} did not answer ({exc or type(exc).__name__})"
        ) from None
    done = time.perf_counter()
    return {
        "id": target, "name": info.get("name") if isinstance(info, dict) else None, "address": where,
        "connect_ms": round((connected - start) * 1000, 3), "rtt_ms": round((done - connected) * 1000, 3),
    }
