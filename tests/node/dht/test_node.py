"""DHTNode over real UDP sockets on 127.0.0.1: joining, records, directory, expiry, bootstrap."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from node.cluster.directory import member_key, publish_member, read_members
from node.dht.errors import DHTError
from node.dht.node import DHTNode
from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from node.net.addresses import PeerAddressRefused
from protocol.records import MAX_RECORD_BYTES, RecordError

pytestmark = pytest.mark.timeout(60)


class Clock:
    """Monotonic clock that tests can push forward to expire records without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def new_cluster() -> ClusterKeys:
    return ClusterKeys.from_secret(parse_secret(generate_secret()))


async def start(
    cluster: ClusterKeys, clock: Callable[[], float] = time.monotonic, **kw: Any
) -> DHTNode:
    kw.setdefault("rpc_timeout", 0.5)
    return await DHTNode.create(
        NodeKey.generate(), cluster, host="127.0.0.1", port=0, clock=clock, **kw
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cluster() -> ClusterKeys:
    return new_cluster()


@pytest.fixture
async def swarm(cluster: ClusterKeys, clock: Clock) -> AsyncIterator[list[DHTNode]]:
    nodes: list[DHTNode] = []
    try:
        for _ in range(8):
            nodes.append(await start(cluster, clock))
        for node in nodes[1:]:
            assert await node.bootstrap([("127.0.0.1", nodes[0].port)]) == 1
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def test_put_get_across_nodes(swarm: list[DHTNode]) -> None:
    stored = await swarm[3].put("model/tiny", {"id": "abc", "layers": 4}, ttl=60)
    assert stored >= 2
    for reader in (swarm[0], swarm[7], swarm[3]):
        records = await reader.get("model/tiny")
        assert list(records) == [swarm[3].node_id]
        record = records[swarm[3].node_id]
        assert record.value == {"id": "abc", "layers": 4}
        assert record.publisher == swarm[3].node_id
    assert await swarm[1].get("missing") == {}
    assert swarm[0].peers_known() == 7
    counters = swarm[0].counters
    assert swarm[0].peers_known() == 7
    assert counters["bytes_sent"] > 0 and counters["bytes_received"] > 0
    assert counters["requests_received"] > 0 and counters["dropped"] == 0


async def test_several_publishers_merge_and_newest_seq_wins(swarm: list[DHTNode]) -> None:
    for i, node in enumerate(swarm[:5]):
        await node.put("holders/m1", {"pieces": i}, ttl=60)
    await swarm[2].put("holders/m1", {"pieces": 99}, ttl=60)
    records = await swarm[7].get("holders/m1")
    assert {p: r.value["pieces"] for p, r in records.items()} == {
        swarm[0].node_id: 0,
        swarm[1].node_id: 1,
        swarm[2].node_id: 99,
        swarm[3].node_id: 3,
        swarm[4].node_id: 4,
    }
    assert not records.truncated


async def test_directory_lists_all_members(swarm: list[DHTNode]) -> None:
    for node in swarm:
        await publish_member(node, {"name": node.node_id[:8]}, ttl=60)
    members = await read_members(swarm[5])
    assert set(members) == {n.node_id for n in swarm}
    assert all(r.value == {"name": p[:8]} for p, r in members.items())
    assert member_key("a" * 64) == "members/a"


async def test_delete_hides_own_record(swarm: list[DHTNode]) -> None:
    await swarm[1].put("k", "v1", ttl=60)
    await swarm[2].put("k", "v2", ttl=60)
    await swarm[1].delete("k")
    records = await swarm[6].get("k")
    assert set(records) == {swarm[2].node_id}


async def test_leave_withdraws_all_own_records(swarm: list[DHTNode]) -> None:
    await publish_member(swarm[2], {"up": True}, ttl=60)
    await swarm[2].put("holders/x", 1, ttl=60)
    await publish_member(swarm[3], {"up": True}, ttl=60)
    await swarm[2].leave()
    assert swarm[2].node_id not in await read_members(swarm[0])
    assert swarm[3].node_id in await read_members(swarm[0])
    assert await swarm[0].get("holders/x") == {}


async def test_expiry_removes_stopped_nodes_record_and_republish_does_not_revive(
    swarm: list[DHTNode], clock: Clock
) -> None:
    leaver = swarm[4]
    await publish_member(leaver, {"alive": True}, ttl=30)
    await publish_member(swarm[3], {"alive": True}, ttl=300)
    assert leaver.node_id in await read_members(swarm[0])
    await leaver.stop()
    clock.offset += 31
    # The hourly refresh on every holder must not re-store other nodes' records.
    for node in swarm:
        if node is not leaver:
            await node._refresh_table()
    members = await read_members(swarm[0])
    assert leaver.node_id not in members
    assert swarm[3].node_id in members
    held = [r.publisher for node in swarm if node is not leaver for _, r in node.storage]
    assert leaver.node_id not in held
    assert swarm[3].node_id in held


async def test_republish_keeps_original_expiry(swarm: list[DHTNode], clock: Clock) -> None:
    await swarm[1].put("short", 1, ttl=20)
    clock.offset += 15
    await swarm[1]._refresh_table()  # republishes its own record, remaining ~5 s
    clock.offset += 6
    assert await swarm[0].get("short") == {}


async def test_oversize_value_refused(swarm: list[DHTNode]) -> None:
    with pytest.raises(RecordError, match="over the DHT limit"):
        await swarm[0].put("big", b"x" * 9000, ttl=60)
    with pytest.raises(RecordError, match="ttl"):
        await swarm[0].put("k", 1, ttl=0)


async def test_largest_allowed_value_round_trips(swarm: list[DHTNode]) -> None:
    value = b"v" * (MAX_RECORD_BYTES - 300)
    assert await swarm[1].put("max", value, ttl=60) >= 2
    records = await swarm[6].get("max")
    assert records[swarm[1].node_id].value == value


async def test_find_value_truncates_and_reader_is_told(swarm: list[DHTNode]) -> None:
    for node in swarm:
        await node.put("fat", b"y" * 3000, ttl=60)
    records = await swarm[0].get("fat")
    assert records.truncated
    assert 2 <= len(records) <= 8
    assert all(r.value == b"y" * 3000 for r in records.values())
    assert sum(n.counters.get("truncated_responses") for n in swarm) > 0


async def test_bootstrap_refuses_public_address(cluster: ClusterKeys) -> None:
    node = await start(cluster)
    try:
        with pytest.raises(PeerAddressRefused, match="allow_public"):
            await node.bootstrap([("8.8.8.8", 7000)])
        with pytest.raises(DHTError, match="port"):
            await node.bootstrap([("127.0.0.1", 0)])
        node.add_bootstrap_peer("8.8.8.8", 7000)
        assert node.counters["refused_address"] == 1
        assert node.counters.get("requests_sent") == 0
    finally:
        await node.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_bootstrap_peer_is_retried_not_dropped(cluster: ClusterKeys) -> None:
    port = free_udp_port()
    late: DHTNode | None = None
    node = await start(cluster, bootstrap_backoff=(0.1, 0.4))
    try:
        assert await node.bootstrap([("127.0.0.1", port)]) == 0
        await asyncio.sleep(1.0)  # several failed retries
        assert node.counters["bootstrap_failures"] >= 2
        late = await DHTNode.create(NodeKey.generate(), cluster, host="127.0.0.1", port=port)
        for _ in range(50):
            if node.peers_known() == 1:
                break
            await asyncio.sleep(0.1)
        assert node.peers_known() == 1
        await late.put("hello", "from late", ttl=60)
        assert (await node.get("hello"))[late.node_id].value == "from late"
    finally:
        await node.stop()
        if late is not None:
            await late.stop()


async def test_peers_from_beacons_are_bounded_and_forgotten_when_they_never_answer(
    cluster: ClusterKeys,
) -> None:
    from node.dht.bootstrap import FORGET_AFTER, MAX_DISCOVERED

    node = await start(cluster, rpc_timeout=0.1, bootstrap_backoff=(0.05, 0.2))
    try:
        for i in range(MAX_DISCOVERED + 44):  # forged beacons: addresses where nobody answers
            node.add_bootstrap_peer("127.0.0.1", 20000 + i)
        assert node.counters["discovered_refused"] == 44
        for _ in range(100):
            if node.counters["discovered_forgotten"] == MAX_DISCOVERED:
                break
            await asyncio.sleep(0.1)
        assert node.counters["discovered_forgotten"] == MAX_DISCOVERED
        assert node.counters["bootstrap_failures"] >= MAX_DISCOVERED * FORGET_AFTER
        node.add_bootstrap_peer("127.0.0.1", 30000)  # room again
        assert node.counters["discovered_refused"] == 44
    finally:
        await node.stop()


async def test_listen_error_is_clear(cluster: ClusterKeys) -> None:
    node = await start(cluster)
    try:
        with pytest.raises(DHTError, match="cannot listen"):
            await DHTNode.create(NodeKey.generate(), cluster, host="127.0.0.1", port=node.port)
    finally:
        await node.stop()


async def test_a_node_found_dead_is_skipped_by_lookups_until_it_speaks(cluster: ClusterKeys) -> None:
    """After a node dies the others' lookups wait rpc_timeout on it, round after round, while
    any node still names it: every directory read right after a death took seconds. A node
    whose port refused a connection is forgotten and skipped for a while."""
    nodes = [await start(cluster, rpc_timeout=1.0) for _ in range(3)]
    try:
        for node in nodes[1:]:
            assert await node.bootstrap([("127.0.0.1", nodes[0].port)]) == 1
        await nodes[1].put("k", "v", ttl=60)
        dead = nodes[2]
        await dead.stop()
        a = nodes[0]
        a.forget(dead.node_id)
        t0 = time.monotonic()
        got = await a.get("k")
        assert got and time.monotonic() - t0 < 0.9  # never waited on the dead node
        # A live node that was wrongly forgotten is welcome again as soon as it speaks.
        a.forget(nodes[1].node_id)
        await nodes[1].put("k2", "v2", ttl=60)
        assert (await a.get("k2"))
    finally:
        for node in nodes:
            await node.stop()
