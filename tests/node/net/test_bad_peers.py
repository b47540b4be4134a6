"""Transport against bad peers: failed TLS, garbage, oversized/truncated frames, silence.

Each case checks that the bad connection is closed (with an Error frame where
the peer can still read one) and that the listener keeps serving a good node.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import msgpack
import numpy as np
import pytest
from structlog.testing import capture_logs

from node.identity import NodeKey
from node.net.tls import client_ssl_context
from node.net.transport import Transport
from protocol.framing import encode_frame
from protocol.messages import Error, Ping, Pong, Request, Response, encode_message
from tests.helpers.transport import (
    HOST,
    RawPeer,
    echo,
    new_cluster,
    no_cert_context,
    running,
    self_signed_context,
)

pytestmark = pytest.mark.timeout(60)


async def _good_client_works(cluster: Any, server: Transport) -> None:
    async with running(cluster, "good", listen=False) as good:
        conn = await good.connect(HOST, server.port or 0)
        assert await conn.request("echo", "still here") == "still here"


async def _try_tls(port: int, ctx: ssl.SSLContext) -> None:
    """Connect with ``ctx`` and read until the server drops us."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        async with asyncio.timeout(5):
            while await reader.read(1024):
                pass
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("kind", ["no_cert", "self_signed", "other_cluster"])
async def test_failed_tls_handshake_is_logged_once_and_listener_keeps_serving(kind: str) -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        server.on_request("echo", echo)
        ctx = {
            "no_cert": no_cert_context,
            "self_signed": lambda: self_signed_context(NodeKey.generate()),
            "other_cluster": lambda: client_ssl_context(new_cluster(), NodeKey.generate()),
        }[kind]()
        with capture_logs() as logs:
            await _try_tls(server.port or 0, ctx)
            for _ in range(100):
                if server.counters["handshake_failures"]:
                    break
                await asyncio.sleep(0.02)
        failures = [e for e in logs if e["event"] == "peer_connection_failed"]
        assert len(failures) == 1, logs
        assert failures[0]["peer"] == "127.0.0.1" and "TLS handshake" in failures[0]["last_error"]
        assert failures[0]["log_level"] == "warning"
        assert server.counters["handshake_failures"] == 1
        assert not server.connections
        await _good_client_works(cluster, server)


async def test_outbound_connect_to_other_cluster_fails_clearly() -> None:
    async with running(new_cluster(), "server") as server, running(new_cluster(), "client",
                                                                    listen=False) as client:
        with pytest.raises(Exception, match="different cluster secret"):
            await client.connect(HOST, server.port or 0)
        assert client.counters["handshake_failures"] == 1


async def _expect_error_and_close(peer: RawPeer, code: str) -> None:
    messages = await peer.recv_until_closed()
    errors = [m for m in messages if isinstance(m, Error)]
    assert errors and errors[-1].code == code, messages


@pytest.mark.parametrize("after_hello", [False, True])
async def test_garbage_bytes(after_hello: bool) -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        server.on_request("echo", echo)
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            if after_hello:
                peer.hello()
            peer.send_raw(b"\x00\x00\x00\x10" + b"\xc1" * 16)  # a frame of invalid msgpack
            await _expect_error_and_close(peer, "decode_error")
        finally:
            await peer.close()
        assert server.counters["protocol_errors"] == 1
        await _good_client_works(cluster, server)


async def test_4gib_header_closes_without_buffering() -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        server.on_request("echo", echo)
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.hello()
            peer.send_raw(b"\xff\xff\xff\xff" + b"x" * 1000)
            await _expect_error_and_close(peer, "frame_too_large")
        finally:
            await peer.close()
        await _good_client_works(cluster, server)


async def test_frame_over_configured_limit() -> None:
    cluster = new_cluster()
    async with running(cluster, "server", max_frame_size=4096) as server:
        server.on_request("echo", echo)
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.hello()
            peer.send(Request(1, "echo", b"x" * 5000))
            await _expect_error_and_close(peer, "frame_too_large")
        finally:
            await peer.close()


async def test_wrong_shape_msgpack_closes_connection() -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        server.on_request("echo", echo)
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.hello()
            peer.send_raw(encode_frame(msgpack.packb({"t": "req", "request_id": "one", "method": 5})))
            await _expect_error_and_close(peer, "decode_error")
        finally:
            await peer.close()
        await _good_client_works(cluster, server)


async def test_message_before_hello_is_refused() -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.send(Request(1, "echo", None))
            await _expect_error_and_close(peer, "expected_hello")
        finally:
            await peer.close()


async def test_hello_claiming_another_id_is_refused() -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.key = NodeKey.generate()  # hello names a key the certificate does not hold
            peer.hello()
            await _expect_error_and_close(peer, "identity_mismatch")
        finally:
            await peer.close()


async def test_raw_peer_with_old_version_gets_error() -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        server.on_request("echo", echo)
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.hello(version=99)
            await _expect_error_and_close(peer, "protocol_version")
        finally:
            await peer.close()
        await _good_client_works(cluster, server)


async def test_unknown_message_type_gets_error_but_connection_survives() -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        server.on_request("echo", echo)
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.hello()
            assert (await peer.recv()).__class__.__name__ == "Hello"
            peer.send_raw(encode_frame(msgpack.packb({"t": "teleport", "request_id": 7})))
            reply = await peer.recv()
            assert isinstance(reply, Error) and reply.code == "unknown_message_type"
            assert reply.request_id == 7
            peer.send(Ping(42))
            assert await peer.recv() == Pong(42)
            peer.send(Request(8, "echo", "ok"))
            assert await peer.recv() == Response(8, "ok")
        finally:
            await peer.close()


async def test_truncated_frame_at_close_is_detected() -> None:
    cluster = new_cluster()
    async with running(cluster, "server") as server:
        server.on_request("echo", echo)
        peer = await RawPeer.connect(cluster, server.port or 0)
        with capture_logs() as logs:
            peer.hello()
            assert (await peer.recv()).__class__.__name__ == "Hello"
            peer.send_raw(b"\x00\x00\x01\x00" + b"partial")  # announces 256 bytes, sends 7
            await peer.writer.drain()
            await asyncio.sleep(0.05)
            await peer.close()
            for _ in range(100):
                if server.counters["protocol_errors"]:
                    break
                await asyncio.sleep(0.02)
        assert server.counters["protocol_errors"] == 1
        codes = [e.get("code") for e in logs if e["event"] == "peer_protocol_error"]
        assert codes == ["truncated_frame"]
        assert not server.connections
        await _good_client_works(cluster, server)


async def test_keepalive_closes_a_silent_peer() -> None:
    cluster = new_cluster()
    async with running(cluster, "server", keepalive_interval=0.1) as server:
        peer = await RawPeer.connect(cluster, server.port or 0)
        try:
            peer.hello()
            # read (so TLS works) but never answer the pings
            messages = await peer.recv_until_closed(within=5)
        finally:
            await peer.close()
        assert any(isinstance(m, Ping) for m in messages)
        assert server.counters["keepalive_timeouts"] == 1
        assert not server.connections


async def test_keepalive_keeps_a_responsive_peer() -> None:
    cluster = new_cluster()
    # Intervals long enough that a loaded 2-core CI machine does not miss a beat.
    async with running(cluster, "a", keepalive_interval=0.2) as a, running(
        cluster, "b", keepalive_interval=0.2
    ) as b:
        b.on_request("echo", echo)
        conn = await a.connect(HOST, b.port or 0)
        await asyncio.sleep(1.2)  # six intervals of silence from the application
        assert not conn.closed
        assert await conn.request("echo", 1) == 1
        assert a.counters["keepalive_timeouts"] == 0 and b.counters["keepalive_timeouts"] == 0



def test_bad_peers_on_uvloop() -> None:
    """The same defences on uvloop, whose TLS implementation is separate code."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        cluster = new_cluster()
        async with running(cluster, "server") as server:
            server.on_request("echo", echo)
            await _try_tls(server.port or 0, client_ssl_context(new_cluster(), NodeKey.generate()))
            peer = await RawPeer.connect(cluster, server.port or 0)
            try:
                peer.hello()
                peer.send_raw(b"\xff\xff\xff\xff")
                await _expect_error_and_close(peer, "frame_too_large")
            finally:
                await peer.close()
            await _good_client_works(cluster, server)
            assert server.counters["handshake_failures"] == 1

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_silent_tcp_client_times_out_in_handshake() -> None:
    cluster = new_cluster()
    async with running(cluster, "server", handshake_timeout=0.3) as server:
        server.on_request("echo", echo)
        reader, writer = await asyncio.open_connection(HOST, server.port or 0)  # plain TCP, no TLS
        try:
            with capture_logs() as logs:
                assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hangs up
            failures = [e for e in logs if e["event"] == "peer_connection_failed"]
            assert len(failures) == 1 and failures[0]["peer"] == "127.0.0.1"
        finally:
            writer.close()
        await _good_client_works(cluster, server)


async def test_port_in_use_gives_clear_error() -> None:
    from node.net.errors import TransportError

    cluster = new_cluster()
    async with running(cluster, "first") as first, running(cluster, "second", listen=False) as second:
        with pytest.raises(TransportError, match="pick another port"):
            await second.start(HOST, first.port or 0)


async def test_frames_in_flight_share_one_memory_budget() -> None:
    from node.net.transport import TransportLimits

    cluster = new_cluster()
    limits = TransportLimits(inbound_budget=2 * 2**20)
    async with running(cluster, "server", limits=limits) as server:
        server.on_request("echo", echo)
        payload = encode_message(Request(1, "echo", np.zeros(4 * 2**20, np.uint8)))
        frame = encode_frame(payload)
        first, second = await RawPeer.connect(cluster, server.port or 0), await RawPeer.connect(cluster, server.port or 0)
        for peer in (first, second):
            peer.hello()
            assert (await peer.recv()) is not None
        first.send_raw(frame[: 3 * 2**20])  # holds most of the budget
        await asyncio.sleep(0.2)
        second.send_raw(frame[: 3 * 2**20])  # over it: this connection stops being read
        for _ in range(100):
            if server.counters["budget_pauses"]:
                break
            await asyncio.sleep(0.02)
        assert server.counters["budget_pauses"] >= 1
        first.send_raw(frame[3 * 2**20 :])
        second.send_raw(frame[3 * 2**20 :])
        for peer in (first, second):  # both complete: the budget frees as frames are delivered
            reply = await peer.recv(within=10)
            assert isinstance(reply, Response) and reply.body.nbytes == 4 * 2**20
            await peer.close()
