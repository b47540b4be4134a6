"""Attacks on the peer port of real daemons: memory bombs, slow readers, half-open floods.

"Insider" attacks hold the cluster secret (they pass TLS and may send a Hello);
the half-open flood is an outsider's. Each test asserts the limit the hardening
promises, against a daemon started for this module, on 127.0.0.x only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator

import pytest

from node.identity import NodeKey
from node.net.tls import client_ssl_context
from node.testing.localcluster import LocalCluster, LocalNode
from protocol.codec import pack
from protocol.framing import encode_frame, frame_header
from protocol.messages import Error, Hello, Ping, encode_message
from tests.helpers.attacker import cluster_keys, metric, rss
from tests.helpers.transport import RawPeer

pytestmark = pytest.mark.slow
MiB = 2**20


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cache = tmp_path_factory.mktemp("xdg-cache")
    c = LocalCluster(tmp_path_factory.mktemp("attacks-transport"),
                     env={"XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"})
    try:
        c.launch(2)
        c.wait_converged(timeout=60)
        yield c
    finally:
        c.close()


def peer_port(node: LocalNode) -> int:
    return int(node.runtime["peer_port"])


async def introduced(pair: LocalCluster, node: LocalNode) -> RawPeer:
    """An insider's raw connection past TLS and the Hello exchange."""
    peer = await RawPeer.connect(cluster_keys(pair), peer_port(node))
    peer.hello()
    assert isinstance(await peer.recv(), Hello)
    return peer


def lag_over(node: LocalNode, seconds: float) -> float:
    """How many loop-lag samples of the daemon were over ``seconds`` so far."""
    total = metric(node, "enjambre_event_loop_lag_seconds_count")
    return total - metric(node, "enjambre_event_loop_lag_seconds_bucket", le=str(seconds))


def test_announcing_giant_frames_costs_the_node_nothing(pair: LocalCluster) -> None:
    victim = pair.nodes[0]
    before = rss(victim)

    async def attack() -> None:
        keys = cluster_keys(pair)
        strangers = []
        for _ in range(8):  # before the Hello: only a small first frame is allowed at all
            peer = await RawPeer.connect(keys, peer_port(victim))
            peer.send_raw(frame_header(64 * MiB - 1) + b"x")
            strangers.append(peer)
        for peer in strangers:
            replies = await peer.recv_until_closed()
            assert any(isinstance(m, Error) and m.code == "frame_too_large" for m in replies)
            await peer.close()
        members = []
        for _ in range(8):  # after the Hello: announced, never sent
            peer = await introduced(pair, victim)
            peer.send_raw(frame_header(64 * MiB - 1) + b"x")
            members.append(peer)
        await asyncio.sleep(1.0)
        growth = rss(victim) - before
        assert growth < 64 * MiB, growth
        for peer in members:
            await peer.close()

    asyncio.run(attack())


def test_an_object_bomb_is_refused_without_stalling_the_loop(pair: LocalCluster) -> None:
    victim = pair.nodes[0]
    lagged = lag_over(victim, 0.1)
    before = rss(victim)

    async def attack() -> None:
        peer = await introduced(pair, victim)
        count = 16 * MiB - 64
        bomb = b"\x84\xa1t\xa3req\xaarequest_id\x01\xa6method\xa1x\xa4body\xdd" + struct.pack(">I", count)
        peer.send_raw(encode_frame(bomb + b"\x90" * count))
        replies = await peer.recv_until_closed(within=20)
        assert any(isinstance(m, Error) and m.code == "decode_error" for m in replies), replies
        await peer.close()

    asyncio.run(attack())
    time.sleep(0.3)
    assert lag_over(victim, 0.1) == lagged  # no sample of the daemon's loop lag went over 100 ms
    assert rss(victim) - before < 96 * MiB  # the frame itself (16 MiB) and TLS buffers, not 1.2 GB
    assert pair.status(victim)["nodes"]  # still serving


def test_a_pinger_that_never_reads_is_dropped(pair: LocalCluster) -> None:
    victim = pair.nodes[0]
    before = rss(victim)
    dropped = metric(victim, "enjambre_transport_dropped_peers_total", reason="slow_reader")

    async def attack() -> int:
        keys = cluster_keys(pair)
        key = NodeKey.generate()
        sock = socket.create_connection(("127.0.0.1", peer_port(victim)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and we never read
        _reader, writer = await asyncio.open_connection(sock=sock, ssl=client_ssl_context(keys, key),
                                                       server_hostname="")
        writer.write(encode_frame(encode_message(Hello(1, key.node_id, "pinger", "test"))))
        batch = b"".join(encode_frame(encode_message(Ping(i))) for i in range(40_000))
        sent = 0
        try:
            async with asyncio.timeout(60):
                while sent < 400 * MiB:
                    writer.write(batch)
                    await writer.drain()
                    sent += len(batch)
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            writer.transport.abort()
        return sent

    sent = asyncio.run(attack())
    assert sent < 400 * MiB  # the node hung up on us
    assert metric(victim, "enjambre_transport_dropped_peers_total", reason="slow_reader") == dropped + 1
    assert rss(victim) - before < 64 * MiB


def test_peer_chosen_strings_are_clipped(pair: LocalCluster) -> None:
    victim = pair.nodes[0]

    async def attack() -> None:
        peer = await introduced(pair, victim)
        peer.send_raw(encode_frame(pack({"t": "x" * 100_000, "request_id": 7})))
        reply = await peer.recv()
        assert isinstance(reply, Error) and reply.code == "unknown_message_type"
        assert len(reply.message) < 400 and reply.request_id == 7
        await peer.close()

    asyncio.run(attack())
    time.sleep(0.3)
    longest = max(len(line) for line in victim.log_path.read_bytes().splitlines())
    assert longest < 4096


def test_a_half_open_flood_does_not_keep_a_member_out(pair: LocalCluster) -> None:
    victim, member = pair.nodes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    before = rss(victim)
    held: list[socket.socket] = []
    try:
        for _ in range(1000):  # an outsider on another address, TCP only, never a TLS hello
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.2", 0))
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", peer_port(victim)))
            held.append(s)
        time.sleep(1.0)
        start = time.perf_counter()
        req = urllib.request.Request(f"http://{member.api}/api/cluster/ping/{victim.node_id[:12]}", data=b"{}",
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
        took = time.perf_counter() - start
        assert answer["id"] == victim.node_id
        assert answer["connect_ms"] + answer["rtt_ms"] < 500, answer
        assert took < 1.0
        assert rss(victim) - before < 32 * MiB
        refused = sum(metric(victim, "enjambre_transport_refused_connections_total", reason=r)
                      for r in ("rate", "handshakes", "connections"))
        # Closed at once, before any TLS work (the rest wait in the kernel's backlog).
        assert refused >= 500, refused
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
