"""Round trips to the other members, measured by this node and published in its record.

The planner leaves out a node whose round trip to the others exceeds
``engine.max_rtt_ms`` (a laptop on a far Wi-Fi access point would slow every token of a
pipeline it joins). Each node times one small request (``node.info``) over its
pooled mutual-TLS connection to up to ``MAX_PEERS`` members every refresh, keeps the
last ``SAMPLES`` times per peer and publishes their median, in milliseconds.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from node.net.errors import TransportError
from node.net.transport import Transport

__all__ = ["MAX_PEERS", "RttTable", "rtt_problem"]

MAX_PEERS = 32
SAMPLES = 5
MAX_RTT_MS = 60_000.0


class RttTable:
    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}

    def add(self, node_id: str, ms: float) -> None:
        self._samples.setdefault(node_id, deque(maxlen=SAMPLES)).append(ms)

    def forget_except(self, keep: set[str]) -> None:
        for node_id in list(self._samples):
            if node_id not in keep:
                del self._samples[node_id]

    def medians(self) -> dict[str, float]:
        return {nid: round(statistics.median(s), 3) for nid, s in sorted(self._samples.items())[:MAX_PEERS]}

    async def measure(self, transport: Transport, members: Mapping[str, Mapping[str, Any]], self_id: str,
                      *, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """One round of timings to the ready members (the first MAX_PEERS by id)."""
        peers = sorted(nid for nid, rec in members.items() if nid != self_id and rec.get("state") == "ready")
        peers = peers[:MAX_PEERS]
        self.forget_except(set(peers))
        for nid in peers:
            rec = members[nid]
            try:
                conn = await transport.connect(str(rec["addresses"][0]), int(rec["peer_port"]), expect_node_id=nid)
                start = time.perf_counter()
                await conn.request("node.info", None, timeout=timeout)
            except (TransportError, OSError, TimeoutError, KeyError, ValueError):
                continue  # an unreachable peer has no round trip to report
            self.add(nid, (time.perf_counter() - start) * 1000)


def rtt_problem(value: Any) -> str | None:
    """None if a record's ``rtt_ms`` is absent or {node id: finite ms} of at most MAX_PEERS."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_PEERS:
        return "bad_rtt_ms"
    for key, ms in value.items():
        if not isinstance(key, str) or len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            return "bad_rtt_ms"
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= MAX_RTT_MS:
            return "bad_rtt_ms"
    return None
