"""Attacks on the DHT of real daemons by a member with the secret (it mints keys at will).

Each test reproduces a finding of the hardening review against two daemons on
127.0.0.1 and asserts the limit the fix promises. Bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kademlia.utils import digest

from node.cluster.directory import member_key
from node.identity import NodeKey
from node.testing.localcluster import LocalCluster, LocalNode
from protocol.dht import DhtRequest, DhtResponse, Drop
from protocol.records import make_record
from tests.helpers.attacker import DhtSpeaker, cluster_keys, metric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cache = tmp_path_factory.mktemp("xdg-cache")
    c = LocalCluster(tmp_path_factory.mktemp("attacks-dht"),
                     env={"XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"})
    try:
        c.launch(2)
        c.wait_converged(timeout=60)
        yield c
    finally:
        c.close()


def dht(node: LocalNode) -> tuple[str, int]:
    return ("127.0.0.1", int(node.runtime["dht_port"]))


def status_seconds(node: LocalNode) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"http://{node.api}/api/cluster/status", timeout=10) as resp:
        assert resp.status == 200
    return time.perf_counter() - start


def test_unverified_senders_get_at_most_four_times_what_they_send(pair: LocalCluster) -> None:
    victim = pair.nodes[0]

    async def attack() -> None:
        keys = cluster_keys(pair)
        for name, args in [
            ("ping", []),
            ("find_node", [os.urandom(20)]),
            ("find_value", [digest(member_key(victim.node_id))]),  # a key with records
            ("store", [digest("x"), b"not a record", 60.0]),
        ]:
            speaker = await DhtSpeaker.open(keys)  # a fresh identity that never answers pings
            try:
                speaker.request(dht(victim), name, *args)
                got = await speaker.drain(1.0)
                assert got, name  # it is answered, but briefly
                assert speaker.bytes_received <= 4 * speaker.bytes_sent, (name, speaker.bytes_received)
            finally:
                speaker.close()

    asyncio.run(attack())


def test_a_cookie_gets_the_records_and_a_verified_contact_gets_a_bounded_welcome(pair: LocalCluster) -> None:
    victim = pair.nodes[0]

    async def scenario() -> None:
        keys = cluster_keys(pair)
        speaker = await DhtSpeaker.open(keys)
        try:
            key = digest(member_key(victim.node_id))
            speaker.request(dht(victim), "find_value", key)
            short = [m for m, _, _ in await speaker.drain(0.5) if isinstance(m, DhtResponse)]
            assert short and "cookie" in short[0].result and "records" not in short[0].result
            speaker.request(dht(victim), "find_value", key, short[0].result["cookie"])
            full = [m for m, _, _ in await speaker.drain(0.5) if isinstance(m, DhtResponse)]
            assert full and full[0].result["records"], "the cookie proves the address: full answer"
        finally:
            speaker.close()
        # The victim holds many records (each fresh identity may store its own)...
        seeders = [await DhtSpeaker.open(keys) for _ in range(4)]
        for i in range(400):
            seeder = seeders[i % 4]
            seeder.key = NodeKey.generate()
            name = f"seed/{i}"
            record = make_record(name, i, public_key=seeder.key.public_bytes, sign=seeder.key.sign, seq=1,
                                 ttl=60, issued_at=time.time())
            seeder.request(dht(victim), "store", digest(name), record.encoded, 60.0)
            if i % 50 == 0:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        for seeder in seeders:
            seeder.close()
        # ...and an identity that answers our ping becomes a contact, handed a bounded few.
        contact = await DhtSpeaker.open(keys, answer_pings=True)
        try:
            contact.request(dht(victim), "ping")
            got = await contact.drain(1.5)
            stores = [m for m, _, _ in got if isinstance(m, DhtRequest) and m.name == "store"]
            assert any(isinstance(m, DhtRequest) and m.name == "ping" for m, _, _ in got)  # verified
            assert 0 < len(stores) <= 64
        finally:
            contact.close()

    asyncio.run(scenario())


def test_status_stays_fast_while_fresh_identities_ping(pair: LocalCluster) -> None:
    victim = pair.nodes[0]
    baseline = min(status_seconds(victim) for _ in range(3))

    async def attack() -> list[float]:
        keys = cluster_keys(pair)
        speakers = [await DhtSpeaker.open(keys) for _ in range(100)]
        timings: list[float] = []
        try:
            for i, speaker in enumerate(speakers):  # 20 fresh identities a second for 5 s
                speaker.request(dht(victim), "ping")
                if i % 5 == 0:
                    timings.append(await asyncio.to_thread(status_seconds, victim))
                await asyncio.sleep(0.05)
        finally:
            for speaker in speakers:
                speaker.close()
        return timings

    timings = asyncio.run(attack())
    assert max(timings) < 1.0, (baseline, timings)
    assert metric(victim, "enjambre_dht_verifications_total") >= 100


def test_a_poisoned_member_record_is_skipped_on_every_node(pair: LocalCluster) -> None:
    keys = cluster_keys(pair)
    mallory = NodeKey.generate()
    poison = make_record("members/0", {"ts": "x"}, public_key=mallory.public_bytes, sign=mallory.sign,
                         seq=1, ttl=60, issued_at=time.time())

    async def publish() -> None:
        speaker = await DhtSpeaker.open(keys, key=mallory)
        try:
            for node in pair.nodes:  # its own record: taken even from an unverified sender
                speaker.request(dht(node), "store", digest("members/0"), poison.encoded, 60.0)
            stored = [m for m, _, _ in await speaker.drain(0.5) if isinstance(m, DhtResponse)]
            assert [m.result for m in stored] == [True, True]
        finally:
            speaker.close()

    asyncio.run(publish())
    for node in pair.nodes:
        status = pair.status(node)  # 200, not 500
        assert {n["id"] for n in status["nodes"]} == {n.node_id for n in pair.nodes}
        assert metric(node, "enjambre_cluster_members_invalid_total", reason="wrong_id") >= 1


def test_fake_publishers_cannot_lock_a_node_out_of_its_shard_nor_fill_the_store(pair: LocalCluster) -> None:
    victim, other = pair.nodes
    shard = member_key(other.node_id)
    keys = cluster_keys(pair)

    async def flood() -> None:
        speakers = [await DhtSpeaker.open(keys) for _ in range(6)]
        try:
            sent = 0
            for i in range(1100):  # more fake publishers than a key holds (1024)
                key = NodeKey.generate()
                record = make_record(shard, {"fake": i, "pad": "x" * 4000}, public_key=key.public_bytes,
                                     sign=key.sign, seq=1, ttl=60, issued_at=time.time())
                speaker = speakers[i % len(speakers)]
                speaker.key = key  # each record comes from its own publisher
                speaker.request(dht(victim), "store", digest(shard), record.encoded, 60.0)
                sent += 1
                if sent % 20 == 0:
                    await asyncio.sleep(0.03)  # within the socket buffers and the per-source rate
            await asyncio.sleep(0.5)
        finally:
            for speaker in speakers:
                speaker.close()

    held_before = metric(victim, "enjambre_dht_records_held")
    asyncio.run(flood())
    stored = metric(victim, "enjambre_dht_records_stored_total")
    assert stored > 500, stored  # the flood arrived
    # All from one address: the source quota (4 MiB) and the shard's publisher cap held.
    assert metric(victim, "enjambre_dht_records_rejected_total", reason="source_quota") > 0
    assert metric(victim, "enjambre_dht_records_held") - held_before < 1100
    # The real node is still listed, on the attacked node too.
    time.sleep(2.0)  # a republish round
    assert other.node_id in {n["id"] for n in pair.status(victim)["nodes"]}


def test_a_datagram_sealed_for_one_node_is_refused_by_another(pair: LocalCluster) -> None:
    a, b = pair.nodes
    keys = cluster_keys(pair)

    async def replay() -> None:
        speaker = await DhtSpeaker.open(keys)
        try:
            # Sealed for a, delivered to b (a captured datagram replayed elsewhere).
            before = metric(b, "enjambre_dht_dropped_total", reason="bad_seal")
            speaker.request(dht(b), "ping", sealed_for=dht(a))
            assert [m for m, _, _ in await speaker.drain(0.5) if not isinstance(m, Drop)] == []
            assert metric(b, "enjambre_dht_dropped_total", reason="bad_seal") == before + 1
            speaker.request(dht(a), "ping")  # control: sealed for a, sent to a, answered
            assert any(isinstance(m, DhtResponse) for m, _, _ in await speaker.drain(0.5))
        finally:
            speaker.close()

    asyncio.run(replay())


def test_forged_beacons_fill_bounded_tables_and_are_forgotten(tmp_path: Path, shared_cache: Path) -> None:
    from node.net.discovery import Beacon

    with LocalCluster(tmp_path / "beacon", env={"XDG_CACHE_HOME": str(shared_cache), "PYTHONUNBUFFERED": "1",
                                                 "ENJAMBRE_BENCH_SECONDS": "0.2"}) as cluster:
        port = _free_udp_port()
        node = cluster.add_node(config={"network": {"discovery": True, "beacon_port": port,
                                                    "beacon_interval": 1.0}})
        cluster.start(node)
        keys = cluster_keys(cluster)

        async def forge() -> None:
            # Multicast on loopback only, and no further than this host (TTL 0).
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
            try:
                for i in range(3000):
                    forger = Beacon(keys, key=NodeKey.generate(), dht_host="127.0.0.1", dht_port=20000 + i,
                                    on_peer=lambda *_: None)
                    sock.sendto(forger.beacon_datagram(), ("239.255.74.20", port))
                    if i % 300 == 0:
                        await asyncio.sleep(0.05)
            finally:
                sock.close()

        asyncio.run(forge())
        time.sleep(1.0)
        assert metric(node, "enjambre_beacon_peers_seen_total") > 1000  # the beacons arrived
        assert metric(node, "enjambre_dht_discovered_refused_total") > 0  # past 256, refused
        attempts = metric(node, "enjambre_dht_bootstrap_attempts_total")
        assert attempts <= 256 * 3 + 50  # not 12,000: at most a few tries each
        deadline = time.monotonic() + 20
        while metric(node, "enjambre_dht_discovered_forgotten_total") < 256 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert metric(node, "enjambre_dht_discovered_forgotten_total") >= 256


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
