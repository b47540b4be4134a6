"""The round-trip table: the lowest of the recent samples, bounded, forgetting departed
peers; a refresh keeps the quickest of its spaced requests, so a busy loop is not a far link."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, cast

from node.cluster.rtt import MAX_PEERS, ROUNDS, SAMPLES, RttTable, rtt_problem
from node.net.errors import TransportError
from node.net.transport import Transport

A, B, C, D = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def test_the_lowest_of_the_last_samples_is_published() -> None:
    t = RttTable()
    for ms in [0.5, 2.0, 3.0, 2.5, 99.8, 2.0, 4.0, 2.2, 1.8]:  # the first falls out of the last SAMPLES
        t.add(A, ms)
    assert SAMPLES == 8 and t.lowest() == {A: 1.8}
    assert rtt_problem(t.lowest()) is None


def test_a_lagging_sample_does_not_raise_the_published_figure() -> None:
    t = RttTable()
    t.add(A, 1.2)
    before = t.lowest()
    t.add(A, 99.8)  # the loop was busy for 100 ms while this one was timed
    assert t.lowest() == before == {A: 1.2}


def test_bounded_and_forgets_departed_peers() -> None:
    t = RttTable()
    ids = [f"{i:064x}" for i in range(MAX_PEERS + 8)]
    for nid in ids:
        t.add(nid, 1.0)
    assert len(t.lowest()) == MAX_PEERS and rtt_problem(t.lowest()) is None
    t.forget_except(set(ids[:2]))
    assert set(t.lowest()) == set(ids[:2])


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeConn:
    def __init__(self, clock: FakeClock, times_ms: Iterator[float]) -> None:
        self.clock, self.times_ms = clock, times_ms

    async def request(self, method: str, body: Any, *, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        assert method == "node.info"
        self.clock.now += next(self.times_ms) / 1000
        return {}


class FakeTransport:
    """Each peer answers in the times (ms) the test chose; a missing peer refuses to connect."""

    def __init__(self, clock: FakeClock, times_ms: dict[str, list[float]]) -> None:
        self.conns = {nid: FakeConn(clock, iter(ms)) for nid, ms in times_ms.items()}
        self.asked: list[str] = []

    async def connect(self, host: str, port: int, *, expect_node_id: str) -> FakeConn:
        self.asked.append(expect_node_id)
        if expect_node_id not in self.conns:
            raise TransportError("connection refused")
        return self.conns[expect_node_id]


def _members(*ids: str) -> dict[str, dict[str, Any]]:
    return {nid: {"state": "ready", "addresses": ["127.0.0.1"], "peer_port": 7420} for nid in ids}


def test_a_refresh_keeps_the_quickest_of_its_rounds_and_skips_the_unreachable() -> None:
    clock = FakeClock()
    # A's first answer waited 100 ms behind a busy loop; B's last did.
    transport = FakeTransport(clock, {A: [100.0, 2.0, 3.0], B: [4.0, 5.0, 100.0]})
    t = RttTable()
    members = {**_members(A, B, C, "f" * 64), D: {"state": "joining"}}
    asyncio.run(t.measure(cast(Transport, transport), members, "f" * 64, spacing=0, clock=clock))
    assert t.lowest() == {A: 2.0, B: 4.0}
    # Each reachable peer is asked ROUNDS times, C (refused) once, this node and the joining D never.
    assert transport.asked.count(A) == transport.asked.count(B) == ROUNDS
    assert transport.asked.count(C) == 1 and "f" * 64 not in transport.asked and D not in transport.asked
