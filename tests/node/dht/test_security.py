"""Hostile traffic against DHTNode on 127.0.0.1: nothing forged, replayed or foreign is accepted."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from kademlia.node import Node
from kademlia.utils import digest

from node.cluster.directory import publish_member, read_members
from node.dht.errors import DHTError
from node.dht.node import DHTNode
from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from protocol.dht import DATAGRAM_DOMAIN, receiver_tag
from protocol.records import make_record
from protocol.seal import seal, sign_envelope

pytestmark = pytest.mark.timeout(60)


def new_cluster() -> ClusterKeys:
    return ClusterKeys.from_secret(parse_secret(generate_secret()))


class RawPeer(asyncio.DatagramProtocol):
    """A hand-driven UDP endpoint on 127.0.0.1 that speaks (or abuses) the wire format."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait(data)

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, ("127.0.0.1", port))

    async def expect_nothing(self, wait: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.received.get(), wait)


# The port crafted datagrams are sealed for (node a of the pair) unless a test says.
TARGET: dict[str, int] = {}


def craft(
    cluster: ClusterKeys,
    key: NodeKey,
    message: list[Any],
    *,
    now: float | None = None,
    signer: NodeKey | None = None,
    to: int | None = None,
) -> bytes:
    now = time.time() if now is None else now
    body = msgpack.packb(message, use_bin_type=True)
    envelope = sign_envelope(
        key.public_bytes, (signer or key).sign, body, domain=DATAGRAM_DOMAIN, timestamp=now
    )
    receiver = receiver_tag("127.0.0.1", to if to is not None else TARGET["port"])
    return seal(cluster.dht_key, envelope, now=now, receiver=receiver)


def ping(cluster: ClusterKeys, key: NodeKey, **kw: Any) -> bytes:
    return craft(cluster, key, [0, os.urandom(20), "ping", [key.dht_id]], **kw)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[ClusterKeys, DHTNode, DHTNode, RawPeer]]:
    cluster = new_cluster()
    a = await DHTNode.create(NodeKey.generate(), cluster, host="127.0.0.1", port=0, rpc_timeout=0.5)
    b = await DHTNode.create(NodeKey.generate(), cluster, host="127.0.0.1", port=0, rpc_timeout=0.5)
    transport, raw = await asyncio.get_running_loop().create_datagram_endpoint(
        RawPeer, local_addr=("127.0.0.1", 0)
    )
    TARGET["port"] = a.port
    try:
        assert await b.bootstrap([("127.0.0.1", a.port)]) == 1
        yield cluster, a, b, raw
    finally:
        transport.close()
        await a.stop()
        await b.stop()


async def still_works(a: DHTNode, b: DHTNode) -> None:
    key = f"alive/{os.urandom(4).hex()}"
    await a.put(key, "yes", ttl=60)
    assert (await b.get(key))[a.node_id].value == "yes"


async def test_valid_crafted_ping_is_answered(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    # Control: the hand-made wire format is right, so the refusals below mean something.
    cluster, a, _, raw = pair
    raw.send(ping(cluster, NodeKey.generate()), a.port)
    reply = await asyncio.wait_for(raw.received.get(), 2)
    assert reply.startswith(b"E1")


async def test_foreign_cluster_node_never_joins(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    _, a, b, _ = pair
    await a.put("secret/plan", "classified", ttl=60)
    await publish_member(a, {"gpu": True}, ttl=60)
    intruder = await DHTNode.create(
        NodeKey.generate(), new_cluster(), host="127.0.0.1", port=0, rpc_timeout=0.3
    )
    try:
        assert await intruder.bootstrap([("127.0.0.1", a.port)]) == 0
        intruder.add_bootstrap_peer("127.0.0.1", b.port)
        await asyncio.sleep(0.5)
        assert await intruder.get("secret/plan") == {}
        assert await read_members(intruder) == {}
        assert intruder.peers_known() == 0
        assert await intruder.put("evil", "x", ttl=60) == 1  # only itself
        assert a.counters.get("dropped", "bad_seal") >= 1
        assert a.peers_known() == 1 and b.peers_known() == 1
        assert await b.get("evil") == {}
        await still_works(a, b)
    finally:
        await intruder.stop()


async def test_garbage_and_forged_seals_dropped(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    cluster, a, b, raw = pair
    raw.send(b"\x00" * 40, a.port)
    raw.send(os.urandom(1000), a.port)
    raw.send(b"E1", a.port)  # too short to be sealed
    raw.send(ping(new_cluster(), NodeKey.generate()), a.port)
    forged = bytearray(ping(cluster, NodeKey.generate()))
    forged[20] ^= 0xFF
    raw.send(bytes(forged), a.port)
    await raw.expect_nothing()
    m = a.counters
    assert m.get("dropped", "garbage") == 3
    assert m.get("dropped", "bad_seal") == 2
    await still_works(a, b)


async def test_replayed_datagram_dropped(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    _cluster, a, b, raw = pair
    captured: list[bytes] = []
    original = b.protocol.transport.sendto

    def tap(data: bytes, addr: Any = None) -> None:
        captured.append(data)
        original(data, addr)

    b.protocol.transport.sendto = tap
    await b.put("replay/k", "v1", ttl=60)
    b.protocol.transport.sendto = original
    assert captured
    before = a.counters.get("dropped", "replay")
    for datagram in captured:
        raw.send(datagram, a.port)
    await raw.expect_nothing()
    assert a.counters.get("dropped", "replay") - before == len(captured)
    await still_works(a, b)


async def test_stale_datagram_dropped(pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer]) -> None:
    cluster, a, _, raw = pair
    raw.send(ping(cluster, NodeKey.generate(), now=time.time() - 120), a.port)
    raw.send(ping(cluster, NodeKey.generate(), now=time.time() + 120), a.port)
    await raw.expect_nothing()
    assert a.counters.get("dropped", "stale") == 2


async def test_sender_id_must_match_key(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    cluster, a, b, raw = pair
    mallory = NodeKey.generate()
    # Claims b's DHT id while signing with its own key.
    raw.send(craft(cluster, mallory, [0, os.urandom(20), "ping", [b.node.id]]), a.port)
    # Envelope claims b's public key but mallory signs.
    raw.send(
        craft(
            cluster,
            NodeKey.generate(),
            [0, os.urandom(20), "ping", [mallory.dht_id]],
            signer=mallory,
        ),
        a.port,
    )
    await raw.expect_nothing()
    assert a.counters.get("dropped", "id_mismatch") == 1
    assert a.counters.get("dropped", "signature") == 1
    assert a.peers_known() == 1


async def test_response_from_wrong_id_fails_call(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    # A node answering at an address with another key must not be taken for the id asked.
    cluster, a, b, raw = pair
    assert raw.transport is not None
    raw_port = raw.transport.get_extra_info("sockname")[1]
    call = asyncio.ensure_future(a.protocol.call_ping(Node(b.node.id, "127.0.0.1", raw_port)))
    await asyncio.wait_for(raw.received.get(), 2)
    # The impostor is an insider (knows the secret) with a key other than b's.
    insider = NodeKey.generate()
    msg_id = next(iter(a.protocol._outstanding))
    raw.send(craft(cluster, insider, [1, msg_id, insider.dht_id]), a.port)
    ok, _ = await asyncio.wait_for(call, 2)
    assert not ok
    assert a.counters.get("dropped", "id_mismatch") == 1


async def test_bad_records_refused_by_store(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    cluster, a, _b, raw = pair
    mallory = NodeKey.generate()
    dkey = digest("victim")

    def store(record_bytes: bytes, dk: bytes = dkey, remaining: float = 60.0) -> bytes:
        return craft(
            cluster,
            mallory,
            [0, os.urandom(20), "store", [mallory.dht_id, dk, record_bytes, remaining]],
        )

    # Signed by the wrong key (claims a's key).
    wrong_sig = make_record(
        "victim", "x", public_key=a.key.public_bytes, sign=mallory.sign, seq=2**40, ttl=60, issued_at=time.time()
    )
    # Valid record but stored under a different key's digest.
    misfiled = make_record(
        "other", "x", public_key=mallory.public_bytes, sign=mallory.sign, seq=1, ttl=60, issued_at=time.time()
    )
    for datagram in (store(wrong_sig.encoded), store(misfiled.encoded), store(b"not a record")):
        raw.send(datagram, a.port)
        reply = await asyncio.wait_for(raw.received.get(), 2)
        assert reply  # answered False
    m = a.counters
    assert m.get("records_rejected", "signature") == 1
    assert m.get("records_rejected", "wrong_key") == 1
    assert m.get("records_rejected", "malformed") == 1
    assert len(a.storage) == 0


async def test_older_seq_does_not_replace_newer(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    cluster, a, b, raw = pair
    await b.put("state", "new", ttl=60)
    newest = next(r for _, r in a.storage)
    old = make_record(
        "state", "old", public_key=b.key.public_bytes, sign=b.key.sign, seq=newest.seq - 1, ttl=60, issued_at=time.time()
    )
    # Replayed by someone else (an old record captured earlier).
    mallory = NodeKey.generate()
    raw.send(
        craft(
            cluster,
            mallory,
            [0, os.urandom(20), "store", [mallory.dht_id, digest("state"), old.encoded, 60.0]],
        ),
        a.port,
    )
    await asyncio.wait_for(raw.received.get(), 2)
    # From an unverified sender only its own records are taken...
    assert a.counters.get("records_rejected", "unverified_sender") == 1
    # ...and from a contact, the older seq loses.
    assert not a.protocol.accept_record(digest("state"), old.encoded, 60.0)
    assert a.counters.get("records_rejected", "older_seq") == 1
    assert (await a.get("state"))[b.node_id].value == "new"
    assert (await b.get("state"))[b.node_id].value == "new"


async def test_oversize_request_never_sent(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    _, a, b, _ = pair
    with pytest.raises(DHTError, match="limit"):
        a.protocol.store(("127.0.0.1", b.port), a.node.id, digest("k"), b"z" * 9000, 10.0)


async def test_malformed_inner_messages_dropped(
    pair: tuple[ClusterKeys, DHTNode, DHTNode, RawPeer],
) -> None:
    cluster, a, b, raw = pair
    k = NodeKey.generate()
    bad = [
        [0, os.urandom(20), "ping"],
        [0, b"short", "ping", [k.dht_id]],
        [0, os.urandom(20), "shutdown", [k.dht_id]],
        [0, os.urandom(20), "find_node", [k.dht_id, b"x"]],
        [7, os.urandom(20), None],
        [1, os.urandom(20), "unsolicited"],
    ]
    for message in bad:
        raw.send(craft(cluster, k, message), a.port)
    raw.send(seal(cluster.dht_key, b"\xc1not msgpack", now=time.time(), receiver=receiver_tag("127.0.0.1", a.port)), a.port)
    await raw.expect_nothing()
    m = a.counters
    assert m.get("dropped", "malformed") == 6
    assert m.get("dropped", "unsolicited") == 1
    await still_works(a, b)
