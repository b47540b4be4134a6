"""Clocks that differ: the offset each node estimates, and sequence numbers that survive a jump."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from node.dht.node import DHTNode
from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from node.system.clock import ClockOffsets


def new_cluster() -> ClusterKeys:
    return ClusterKeys.from_secret(parse_secret(generate_secret()))


async def test_a_node_whose_clock_is_off_learns_it_from_the_datagrams_it_drops() -> None:
    cluster = new_cluster()
    good_offsets, skewed_offsets = ClockOffsets(), ClockOffsets()
    good = await DHTNode.create(NodeKey.generate(), cluster, host="127.0.0.1", port=0, rpc_timeout=0.3,
                                clock_offsets=good_offsets)
    skewed = await DHTNode.create(NodeKey.generate(), cluster, host="127.0.0.1", port=0, rpc_timeout=0.3,
                                  clock_offsets=skewed_offsets, wall_clock=lambda: time.time() + 90)
    try:
        # Beyond ±60 s every datagram is dropped both ways...
        assert await skewed.bootstrap([("127.0.0.1", good.port)]) == 0
        assert await good.bootstrap([("127.0.0.1", skewed.port)]) == 0
        await asyncio.sleep(0.1)
        assert good.counters.get("dropped", "stale") >= 1
        # ...but its authentic timestamp still tells each side by how much.
        behind = skewed_offsets.offset(time.time() + 90)
        ahead = good_offsets.offset(time.time())
        assert behind is not None and abs(behind + 90) < 5
        assert ahead is not None and abs(ahead - 90) < 5
    finally:
        await good.stop()
        await skewed.stop()


def test_offsets_are_the_median_of_recent_peers() -> None:
    offsets = ClockOffsets(max_peers=3, window=60)
    assert offsets.offset(0) is None
    offsets.observe("a", 110.0, 100.0)
    offsets.observe("b", 100.5, 100.0)
    offsets.observe("c", 99.0, 100.0)
    assert offsets.offset(100.0) == 0.5
    offsets.observe("d", 200.0, 100.0)  # bounded: "a" is forgotten
    assert offsets.peers(100.0) == 3 and offsets.offset(100.0) == 0.5
    assert offsets.offset(1000.0) is None  # nobody heard from recently


async def test_sequence_numbers_survive_a_clock_that_ran_ahead(tmp_path: Path) -> None:
    cluster = new_cluster()
    key = NodeKey.generate()
    seq_file = tmp_path / "dht.seq"
    ahead = await DHTNode.create(key, cluster, host="127.0.0.1", port=0, seq_file=seq_file,
                                 wall_clock=lambda: time.time() + 3600)
    try:
        await ahead.put("state", "while the clock ran an hour ahead", ttl=60)
        first = ahead._own["state"].seq
    finally:
        await ahead.stop()
    # The clock is corrected and the node restarts: its records must still win.
    again = await DHTNode.create(key, cluster, host="127.0.0.1", port=0, seq_file=seq_file)
    try:
        await again.put("state", "after the fix", ttl=60)
        assert again._own["state"].seq > first
        assert int(seq_file.read_text()) == again._own["state"].seq
    finally:
        await again.stop()
