"""Round trips to the other members, measured by this node and published in its record.

The planner leaves out a node whose round trip to the others exceeds
``engine.max_rtt_ms`` (a laptop on a far Wi-Fi access point would slow every token of a
pipeline it joins). Each node times one small request (``node.info``) over its
pooled mutual-TLS connection to up to ``MAX_PEERS`` members every refresh.

The time is taken on the event loop, so it includes how late each loop got round to
the request and its answer: on a busy machine two loopback nodes once measured 99.8 ms.
The link's delay is the floor under those times, not their middle, so each refresh
takes ``ROUNDS`` requests per peer ``SPACING_S`` apart and keeps the quickest, and the
record publishes the lowest of the last ``SAMPLES`` refreshes. How busy this node's own
loop is goes in the record separately (``loop_lag_ms``, from ``node.system.looplag``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from node.net.errors import TransportError
from node.net.transport import Transport

__all__ = ["MAX_PEERS", "ROUNDS", "SAMPLES", "SPACING_S", "RttTable", "rtt_problem"]

MAX_PEERS = 32
SAMPLES = 8  # refreshes remembered per peer: a slower link shows after at most 8 (80 s at the default 10 s)
ROUNDS = 3  # requests per peer per refresh
SPACING_S = 0.25  # between rounds, longer than one busy moment (a decode step, a GC pause)
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

    def lowest(self) -> dict[str, float]:
        """{node id: the lowest of its recent samples, ms}: what the record publishes."""
        return {nid: round(min(s), 3) for nid, s in sorted(self._samples.items())[:MAX_PEERS]}

    async def measure(self, transport: Transport, members: Mapping[str, Mapping[str, Any]], self_id: str,
                      *, timeout: float = 2.0, rounds: int = ROUNDS,  # noqa: ASYNC109
                      spacing: float = SPACING_S, clock: Callable[[], float] = time.perf_counter) -> None:
        """One refresh: ``rounds`` timed requests to each ready member (the first MAX_PEERS
        by id), one peer after another so they do not queue behind each other, rounds
        ``spacing`` seconds apart; the quickest of each peer's is added to the table."""
        peers = sorted(nid for nid, rec in members.items() if nid != self_id and rec.get("state") == "ready")
        peers = peers[:MAX_PEERS]
        self.forget_except(set(peers))
        best: dict[str, float] = {}
        for round_ in range(rounds):
            if round_:
                await asyncio.sleep(spacing)
            for nid in peers if round_ == 0 else list(best):  # an unreachable peer is not asked again
                rec = members[nid]
                try:
                    conn = await transport.connect(str(rec["addresses"][0]), int(rec["peer_port"]),
                                                   expect_node_id=nid)
                    start = clock()
                    await conn.request("node.info", None, timeout=timeout)
                except (TransportError, OSError, TimeoutError, KeyError, ValueError):
                    continue  # an unreachable peer has no round trip to report
                ms = (clock() - start) * 1000
                best[nid] = min(ms, best.get(nid, ms))
        for nid, ms in best.items():
            self.add(nid, ms)


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
