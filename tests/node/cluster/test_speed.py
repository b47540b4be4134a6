"""Speed probes (node/cluster/speed.py) over real encrypted transports: an honest member is
measured, one that answers without doing the product is caught and barred from plans, one that
does not answer is planned as the slowest, an overclaim is bounded by the measurement, and a
member answers each peer's probes at most once per 10 s."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from node.cluster.directory import status_view
from node.cluster.speed import (
    SLACK,
    ProbeError,
    ProbeServer,
    Speeds,
    answer,
    check,
    parse_probe,
)
from node.net.errors import RemoteError, RequestRefused
from node.pipeline.trust import offers
from tests.helpers.transport import HOST, new_cluster, running

N = 128  # small: the tests' probes cost little


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_freivalds_catches_any_wrong_product() -> None:
    c = answer(7, N)
    assert check(7, N, c)
    assert not check(8, N, c)  # another seed's product
    for bad in (c[:, :-1], c.astype(np.float64), np.zeros_like(c), c.tolist(), None):
        assert not check(7, N, bad)
    off = c.copy()
    off[5, 9] += 0.5  # one entry wrong
    assert not check(7, N, off)
    nan = c.copy()
    nan[0, 0] = np.nan
    assert not check(7, N, nan)


@pytest.mark.parametrize(("body", "needle"), [
    ([1], "a map"), ({"seed": -1, "n": N}, "seed"), ({"seed": True, "n": N}, "seed"),
    ({"seed": 1, "n": 10_000}, "n must be"), ({"seed": 1, "n": 2.5}, "n must be"), ({"seed": 1}, "n must be"),
])
def test_probes_are_bounded_before_any_work(body: Any, needle: str) -> None:
    with pytest.raises(ProbeError, match=needle):
        parse_probe(body)


async def test_probes_over_real_transports() -> None:
    cluster = new_cluster()
    server = ProbeServer()

    async def honest(conn: Any, body: Any) -> Any:
        try:
            return await server.handle(str(conn.node_id), body)
        except ProbeError as exc:
            raise RequestRefused("bad_probe", str(exc)) from None

    async def liar(_conn: Any, body: Any) -> Any:  # answers at once, without the product
        return {"c": np.random.default_rng().random((body["n"], body["n"]), np.float32)}

    async with running(cluster, "driver") as driver, running(cluster, "good") as good, \
            running(cluster, "bad") as bad:
        good.on_request("cluster.probe", honest)
        bad.on_request("cluster.probe", liar)
        to_good = await driver.connect(HOST, good.port or 0)
        to_bad = await driver.connect(HOST, bad.port or 0)
        speeds = Speeds()
        await speeds.measure("g" * 64, lambda b: to_good.request("cluster.probe", b, timeout=30), n=N)
        assert speeds.fresh("g" * 64) and speeds.tflops()["g" * 64] > 0
        with pytest.raises(ProbeError, match="wrongly"):
            await speeds.measure("b" * 64, lambda b: to_bad.request("cluster.probe", b, timeout=30), n=N)
        assert speeds.barred() == {"b" * 64}
        # the member answers one probe per peer per 10 s: the second is refused (and so silent)
        with pytest.raises(RemoteError, match="one probe per peer"):
            await to_good.request("cluster.probe", {"seed": 1, "n": N}, timeout=30)
        assert await speeds.measure("q" * 64, lambda b: to_good.request("cluster.probe", b, timeout=30), n=N) is None
        assert speeds.believed("q" * 64, 5.0) == 0.0


def test_what_planners_believe_and_status_shows() -> None:
    clock = Clock()
    speeds = Speeds(clock=clock)
    speeds.calibrate(0.2, n=N)  # this node claims 0.2 TFLOPS; its own probe sets the scale
    assert speeds.calibrated() and speeds.scale > 0
    honest, boaster, quiet, liar = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    probe_units = 0.2 / speeds.scale  # what a machine like this one measures
    speeds.measured[honest] = (probe_units, clock.now)
    speeds.measured[boaster] = (probe_units, clock.now)
    speeds.silent[quiet] = clock.now
    speeds.liars[liar] = clock.now + 600
    assert speeds.believed(honest, 0.2) == pytest.approx(0.2)  # an honest claim stands
    assert speeds.believed(boaster, 64.0) == pytest.approx(SLACK * 0.2)  # an overclaim is bounded
    assert speeds.believed(quiet, 64.0) == 0.0
    record = {"state": "ready", "memory_allowed": 2**30, "memory_total": 2**31, "cpu_count": 256, "tflops": 64.0}
    records = {honest: {**record, "tflops": 0.2, "name": "honest"}, boaster: {**record, "name": "boaster"},
               quiet: {**record, "name": "quiet"}, liar: {**record, "name": "liar"}}
    got = {o.name: o.tflops for o in offers(records, "m" * 64, believed=speeds.believed, barred=speeds.barred())}
    assert got == {"honest": pytest.approx(0.2), "boaster": pytest.approx(SLACK * 0.2), "quiet": 0.0}
    view = status_view(records, self_id=honest, cluster_id="x", now=0.0, speeds=speeds)
    doubts = {n["name"]: n.get("doubtful", []) for n in view["nodes"]}
    assert any("a probe measured about 0.2" in d for d in doubts["boaster"])
    assert "did not answer a speed probe" in doubts["quiet"]
    measured = {n["name"]: n.get("measured_tflops") for n in view["nodes"]}
    assert measured["boaster"] == pytest.approx(0.2, rel=1e-3) and measured["quiet"] is None
    assert any("wrongly" in d for d in doubts["liar"]) and not doubts["honest"]
    clock.now += 601  # measurements and bars expire: probed again before the next plan
    assert not speeds.fresh(honest) and not speeds.barred() and not speeds.calibrated()

