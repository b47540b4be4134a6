"""A member's compute speed as the driver that plans with it measures it: a claim counts only
as far as a verified probe confirms it.

The prober sends ``cluster.probe`` with a fresh seed and a size n; the member builds A and B
(n x n float32) from the seed and answers C = A @ B. The prober checks C with Freivalds'
test (A(Br) against Cr for random vectors r: O(n²) work where the product costs O(n³)), so a
member cannot answer without doing the product, and times the round trip: measured TFLOPS =
2n³ / seconds. The time includes the link and the member's other work, so a member can be
measured slower than it is, never faster. A member whose answer is wrong is a liar for the
planner for ``LIAR_S``; a measured member is planned with at most ``SLACK`` times what it
measured, converted to claim units by the driver's own probe of itself (``calibrate``: the
probe is numpy's product and crosses the link, the claims are XLA's, so a probe bounds a
claim, it does not replace it); one that does not answer is planned as the slowest (speed
0: still used where its memory is needed, never for its claim). A member answers a given peer's probes
at most once per ``PER_PEER_S`` seconds (a probe costs it ~0.3 GFLOP of work), off the loop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from node.cluster.claims import capped

__all__ = ["PROBE_N", "ProbeError", "ProbeServer", "Speeds", "answer", "check", "parse_probe", "probe_members"]

log = structlog.get_logger("enjambre.speed")

PROBE_N = 1024  # 2.1 GFLOP, a 4 MiB answer
MIN_N, MAX_N = 64, 1024
FRESH_S = 600.0  # how long a measurement stands
LIAR_S = 600.0  # how long a wrong answer keeps a member out of plans
PER_PEER_S = 10.0
SLACK = 8.0  # a measured member's claim counts up to this many times its measurement
MAX_TRACKED = 4096  # members and peers a table remembers
MAX_PROBES = 32  # members probed before one plan (~0.1 s each)


class ProbeError(ValueError):
    """A probe or its answer breaks the rules; the text is safe to send back."""


def _matrices(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)  # uniform: a few ms for n = 1024, next to the product's tens
    return (rng.random((n, n), np.float32) - 0.5, rng.random((n, n), np.float32) - 0.5)


def parse_probe(body: Any) -> tuple[int, int]:
    """(seed, n) of a ``cluster.probe`` body."""
    if not isinstance(body, dict):
        raise ProbeError("a probe is a map")
    seed, n = body.get("seed"), body.get("n")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ProbeError("seed must be an integer from 0 to 2^63 - 1")
    if not isinstance(n, int) or isinstance(n, bool) or not MIN_N <= n <= MAX_N:
        raise ProbeError(f"n must be an integer from {MIN_N} to {MAX_N}")
    return seed, n


def answer(seed: int, n: int) -> np.ndarray:
    """What an honest member computes (blocking: call it in a thread)."""
    a, b = _matrices(seed, n)
    return a @ b


def check(seed: int, n: int, c: Any) -> bool:
    """Whether ``c`` is A @ B for this seed (Freivalds, two random vectors)."""
    if not isinstance(c, np.ndarray) or c.shape != (n, n) or c.dtype != np.float32 or not np.isfinite(c).all():
        return False
    a, b = _matrices(seed, n)
    r = np.random.default_rng().random((n, 2), np.float32) - 0.5
    want = a @ (b @ r)
    # float32 products of n terms: errors grow like sqrt(n) times the terms' scale.
    return bool(np.allclose(c @ r, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max() + 1.0)))


class ProbeServer:
    """The member's side: answers each peer's probes at most once per ``PER_PEER_S``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}

    async def handle(self, peer: str, body: Any) -> dict[str, Any]:
        seed, n = parse_probe(body)
        now = self._clock()
        if now - self._last.get(peer, -PER_PEER_S) < PER_PEER_S:
            raise ProbeError(f"one probe per peer every {PER_PEER_S:g} s")
        self._last.pop(peer, None)
        self._last[peer] = now
        while len(self._last) > MAX_TRACKED:
            del self._last[next(iter(self._last))]
        return {"c": await asyncio.to_thread(answer, seed, n)}


@dataclass
class Speeds:
    """A driver's measurements: node id -> (TFLOPS, when); members caught answering wrong."""

    clock: Callable[[], float] = time.monotonic
    measured: dict[str, tuple[float, float]] = field(default_factory=dict)
    liars: dict[str, float] = field(default_factory=dict)
    silent: dict[str, float] = field(default_factory=dict)  # did not answer a probe (when)
    scale: float = 0.0  # claim units per probe unit (calibrate); 0: not calibrated
    calibrated_at: float = 0.0

    def fresh(self, node_id: str) -> bool:
        got = self.measured.get(node_id)
        now = self.clock()
        return (got is not None and now - got[1] < FRESH_S) or now - self.silent.get(node_id, -FRESH_S) < FRESH_S

    def calibrate(self, own_claim: float, n: int = PROBE_N) -> None:
        """Time the probe here, with no link: its ratio to this node's own claim turns other
        members' probe times into the units claims are in (the probe is numpy's product, the
        claims XLA's, and a machine's BLAS may be faster or slower than its XLA)."""
        t0 = time.perf_counter()
        answer(int(np.random.default_rng().integers(0, 2**63)), n)
        here = 2 * n**3 / max(time.perf_counter() - t0, 1e-6) / 1e12
        self.scale = own_claim / here if own_claim > 0 else 0.0
        self.calibrated_at = self.clock()

    def believed(self, node_id: str, claim: float) -> float:
        """The TFLOPS a planner uses for a member's (capped) claim: at most ``SLACK`` times
        its measurement in claim units, 0 when it did not answer its last probe."""
        if node_id in self.silent:
            return 0.0
        got = self.measured.get(node_id)
        if got is not None and self.scale > 0:
            return min(claim, SLACK * self.scale * got[0])
        return claim

    def tflops(self) -> dict[str, float]:
        """node id -> its last measurement, in probe units."""
        return {nid: v for nid, (v, _at) in self.measured.items()}

    def seen(self, node_id: str) -> float | None:
        """A member's last measurement in claim units (what ``nodectl status`` shows)."""
        got = self.measured.get(node_id)
        return None if got is None or self.scale <= 0 else self.scale * got[0]

    def calibrated(self) -> bool:
        return self.scale > 0 and self.clock() - self.calibrated_at < FRESH_S

    def doubts(self, node_id: str, claim: float) -> list[str]:
        """What ``nodectl status`` says of a member's speed claim, from this node's probes."""
        if node_id in self.barred():
            return ["answered a speed probe wrongly (left out of plans)"]
        got = self.measured.get(node_id)
        if got is not None and self.scale > 0 and claim > SLACK * self.scale * got[0]:
            return [f"claims {claim:g} TFLOPS; a probe measured about {self.scale * got[0]:.3g}"]
        if node_id in self.silent:
            return ["did not answer a speed probe"]
        return []

    def barred(self) -> set[str]:
        now = self.clock()
        return {nid for nid, until in self.liars.items() if until > now}

    def _keep(self, table: dict[str, Any], node_id: str, value: Any) -> None:
        table.pop(node_id, None)
        table[node_id] = value
        while len(table) > MAX_TRACKED:
            del table[next(iter(table))]

    async def measure(self, node_id: str, ask: Callable[[dict[str, Any]], Awaitable[Any]],
                      n: int = PROBE_N) -> float | None:
        """Probe one member through ``ask`` (a request to it); its TFLOPS, or None when it did
        not answer (``ask`` raised); ProbeError when it answered wrong (barred for ``LIAR_S``)."""
        seed = int(np.random.default_rng().integers(0, 2**63))
        t0 = self.clock()
        try:
            reply = await ask({"seed": seed, "n": n})
        except Exception:
            self._keep(self.silent, node_id, self.clock())
            return None
        seconds = max(self.clock() - t0, 1e-6)
        c = reply.get("c") if isinstance(reply, Mapping) else None
        if not await asyncio.to_thread(check, seed, n, c):
            self._keep(self.liars, node_id, self.clock() + LIAR_S)
            raise ProbeError(f"node {node_id[:12]} answered a speed probe wrongly")
        value = 2 * n**3 / seconds / 1e12
        self.silent.pop(node_id, None)
        self._keep(self.measured, node_id, (value, self.clock()))
        return value


async def probe_members(speeds: Speeds, records: Mapping[str, Mapping[str, Any]], self_id: str,
                        request: Callable[[str, dict[str, Any]], Awaitable[Any]]) -> None:
    """Before a plan: calibrate on this node, then probe the ready members not measured
    lately, one after another (probes run together would measure each other)."""
    own = records.get(self_id)
    if own is not None and not speeds.calibrated():
        await asyncio.to_thread(speeds.calibrate, capped(own)[1])
    barred = speeds.barred()
    todo = [nid for nid, r in records.items() if nid != self_id and r.get("state") == "ready"
            and nid not in barred and not speeds.fresh(nid)][:MAX_PROBES]
    for nid in todo:
        try:
            await speeds.measure(nid, functools.partial(request, nid))
        except ProbeError as exc:  # barred from plans for a while
            log.warning("speed_probe_failed", node=nid[:12], error=str(exc))
