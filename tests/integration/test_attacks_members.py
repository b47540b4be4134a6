"""What one member holding the secret can claim about names and itself, against real daemons.

An insider here mints its own key and speaks the sealed DHT by hand (tests/helpers/attacker.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kademlia.utils import digest

from node.identity import NodeKey
from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.tinymodel import make_tiny_model
from protocol.dht import DhtResponse
from protocol.records import make_record
from tests.helpers.attacker import DhtSpeaker, cluster_keys

pytestmark = pytest.mark.slow

ENV = {"PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"}


def nodectl(node: LocalNode, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ENJAMBRE_CONFIG": str(node.config)})
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tiny = make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", layers=2, hidden=32, intermediate=64,
                           vocab_size=320)
    c = LocalCluster(tmp_path_factory.mktemp("members"), env=ENV)
    try:
        c.launch(2)
        c.wait_converged(timeout=60)
        nodectl(c.nodes[0], "pull", str(tiny), "--piece-size", "16KiB")
        yield c
    finally:
        c.close()


def show(node: LocalNode, name: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://{node.api}/api/show", data=json.dumps({"model": name}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_name_issued_in_the_future_does_not_take_a_models_name(cluster: LocalCluster) -> None:
    """An insider publishes ``name/tiny`` for another model, issued 110 s ahead (the newest
    record once won on every node that had not imported the model). A node that knew the
    name keeps its model and logs the conflict once; a node that sees both claims at once
    answers with both digests instead of guessing."""
    other = cluster.nodes[1]
    cluster.wait_until(lambda: show(other, "tiny")[0] == 200, 60, "the name spread")
    keys = cluster_keys(cluster)
    mallory = NodeKey.generate()
    fake = "f" * 64
    record = make_record("name/tiny:latest", {"id": fake}, public_key=mallory.public_bytes, sign=mallory.sign,
                         seq=1, ttl=300, issued_at=time.time() + 110)

    async def publish(nodes: list[LocalNode]) -> list[Any]:
        speaker = await DhtSpeaker.open(keys, key=mallory)
        try:
            for node in nodes:
                speaker.request(("127.0.0.1", int(node.runtime["dht_port"])), "store",
                                digest("name/tiny:latest"), record.encoded, 300.0)
            return [m.result for m, _, _ in await speaker.drain(1.0) if isinstance(m, DhtResponse)]
        finally:
            speaker.close()

    assert asyncio.run(publish(cluster.nodes)) == [True, True]
    start = time.monotonic()
    status, body = show(other, "tiny")
    assert status == 200 and time.monotonic() - start < 30, body  # its model, not the insider's
    conflicts = [line for line in other.log_path.read_text().splitlines() if '"name_conflict"' in line]
    assert len(conflicts) == 1 and fake[:12] in conflicts[0]
    show(other, "tiny")
    assert sum('"name_conflict"' in line for line in other.log_path.read_text().splitlines()) == 1  # once
    # A node joining now knew neither: the name is ambiguous, and the answer says so.
    late = cluster.add_node()
    cluster.start(late)
    cluster.wait_converged(timeout=60)
    asyncio.run(publish([late]))
    cluster.wait_until(lambda: "different models" in show(late, "tiny")[1].get("error", ""), 60,
                       "the late node seeing both claims")
    status, body = show(late, "tiny")
    assert status == 404 and "2 different models" in body["error"] and fake[:12] in body["error"], body
