"""Transport: two real nodes over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from node.net.addresses import PeerAddressRefused
from node.net.connection import Connection
from node.net.errors import (
    ConnectFailed,
    ConnectionClosed,
    HandshakeError,
    ProtocolVersionMismatch,
    RemoteError,
    RequestRefused,
    RequestTimeout,
)
from tests.helpers.transport import HOST, echo, new_cluster, running

pytestmark = pytest.mark.timeout(60)



async def test_hello_request_response_notify() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        got: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def on_token(conn: Connection, body: Any) -> None:
            await got.put((conn.node_id, body))

        b.on_request("echo", echo)
        b.on_notify("token", on_token)
        assert b.port
        conn = await a.connect(HOST, b.port)
        # identity comes from the certificate; hello carries the rest
        assert conn.node_id == b.key.node_id
        assert conn.peer is not None
        assert conn.hello is not None and conn.hello.name == "b" and conn.hello.software_version == "test"
        act = np.arange(4096, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(1, 4096)
        reply = await conn.request("echo", {"h": act, "n": [1, "x", None]})
        assert reply["n"] == [1, "x", None]
        assert reply["h"].dtype == act.dtype and (reply["h"] == act).all()
        await conn.notify("token", {"text": "hola"})
        sender, body = await asyncio.wait_for(got.get(), 5)
        assert sender == a.key.node_id and body == {"text": "hola"}
        assert a.counters["requests_sent"] == 1 and b.counters["requests_received"] == 1
        assert a.counters["bytes_sent"] > 8192 and b.counters["bytes_received"] == a.counters["bytes_sent"]


async def test_large_tensor_round_trip() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        b.on_request("echo", echo)
        conn = await a.connect(HOST, b.port or 0)
        big = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
        out = await conn.request("echo", [big, big[:3]])
        np.testing.assert_array_equal(out[0], big)
        np.testing.assert_array_equal(out[1], big[:3])


async def test_notifications_arrive_in_order() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        seen: list[int] = []
        done = asyncio.Event()

        async def on_n(conn: Connection, body: Any) -> None:
            await asyncio.sleep(0.001 * (body % 3))  # uneven handler times
            seen.append(body)
            if body == 49:
                done.set()

        b.on_notify("n", on_n)
        conn = await a.connect(HOST, b.port or 0)
        for i in range(50):
            await conn.notify("n", i)
        await asyncio.wait_for(done.wait(), 10)
        assert seen == list(range(50))


async def test_connection_is_reused_in_both_directions() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        a.on_request("echo", echo)
        b.on_request("echo", echo)
        first = await a.connect(HOST, b.port or 0)
        again = await a.connect(HOST, b.port or 0)
        by_id = await a.connect(HOST, b.port or 0, expect_node_id=b.key.node_id)
        assert first is again is by_id
        await first.request("echo", 1)  # b has seen the hello by now
        back = await b.connect(HOST, a.port or 0, expect_node_id=a.key.node_id)
        assert back is b.connections[a.key.node_id]
        assert not back.outbound  # the connection a opened
        assert await back.request("echo", "from b") == "from b"
        assert a.counters["connections_opened"] == 1 and b.counters["connections_opened"] == 1


async def test_simultaneous_connects_settle_on_one_connection() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        a.on_request("echo", echo)
        b.on_request("echo", echo)
        ab, ba = await asyncio.gather(a.connect(HOST, b.port or 0), b.connect(HOST, a.port or 0))
        assert await ab.request("echo", 1) == 1
        assert await ba.request("echo", 2) == 2
        for _ in range(100):
            if len(a._all) == 1 and len(b._all) == 1:
                break
            await asyncio.sleep(0.02)
        # both sides keep the same one: opened by the smaller node id
        kept_a, kept_b = a.connections[b.key.node_id], b.connections[a.key.node_id]
        assert kept_a.outbound == (a.key.node_id < b.key.node_id)
        assert kept_b.outbound == (b.key.node_id < a.key.node_id)
        assert len(a._all) == 1 and len(b._all) == 1
        assert await kept_a.request("echo", 3) == 3 and await kept_b.request("echo", 4) == 4


async def test_request_timeout_keeps_connection() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        async def slow(conn: Connection, body: Any) -> Any:
            await asyncio.sleep(body)
            return "late"

        b.on_request("slow", slow)
        conn = await a.connect(HOST, b.port or 0)
        with pytest.raises(RequestTimeout, match=r"no answer within 0\.1 s"):
            await conn.request("slow", 1.0, timeout=0.1)
        assert a.counters["request_timeouts"] == 1
        assert await conn.request("slow", 0, timeout=5) == "late"


async def test_default_request_timeout() -> None:
    cluster = new_cluster()
    async with running(cluster, "a", request_timeout=0.1) as a, running(cluster, "b") as b:
        async def never(conn: Connection, body: Any) -> Any:
            await asyncio.sleep(10)

        b.on_request("never", never)
        conn = await a.connect(HOST, b.port or 0)
        with pytest.raises(RequestTimeout):
            await conn.request("never", None)


async def test_handler_error_and_unknown_method_are_error_replies() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        async def boom(conn: Connection, body: Any) -> Any:
            raise ValueError("secret internals")

        async def refuse(conn: Connection, body: Any) -> Any:
            raise RequestRefused("bad_range", "layers 3-9 are not loaded here")

        async def unsendable(conn: Connection, body: Any) -> Any:
            return {1, 2}

        b.on_request("boom", boom)
        b.on_request("refuse", refuse)
        b.on_request("echo", echo)
        b.on_request("unsendable", unsendable)
        conn = await a.connect(HOST, b.port or 0)
        with pytest.raises(RemoteError) as err:
            await conn.request("boom", None)
        # the detail stays in b's log; a learns only that it failed
        assert err.value.code == "handler_error" and "secret" not in err.value.message
        with pytest.raises(RemoteError) as err:
            await conn.request("refuse", None)
        assert err.value.code == "bad_range" and err.value.message == "layers 3-9 are not loaded here"
        with pytest.raises(RemoteError) as err:
            await conn.request("nope", None)
        assert err.value.code == "unknown_method" and "nope" in err.value.message
        with pytest.raises(RemoteError) as err:
            await conn.request("unsendable", None)
        assert err.value.code == "encode_error"
        assert await conn.request("echo", 5) == 5  # connection survives
        assert b.counters["handler_errors"] == 1


async def test_protocol_version_mismatch() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b", protocol_version=2) as b, \
            running(cluster, "c", protocol_version=2) as c:
        b.on_request("echo", echo)
        with pytest.raises(ProtocolVersionMismatch, match=r"version 1.*version 2"):
            await a.connect(HOST, b.port or 0)
        assert b.key.node_id not in a.connections
        # b keeps serving peers that speak its version
        conn = await c.connect(HOST, b.port or 0)
        assert await conn.request("echo", "ok") == "ok"


async def test_expected_node_id_is_checked() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        with pytest.raises(HandshakeError, match="not the expected"):
            await a.connect(HOST, b.port or 0, expect_node_id="00" * 32)
        assert not a.connections


async def test_connect_to_self_is_refused() -> None:
    async with running(new_cluster(), "a") as a:
        with pytest.raises(HandshakeError, match="itself"):
            await a.connect(HOST, a.port or 0)


async def test_public_and_named_addresses_are_refused_before_connecting() -> None:
    async with running(new_cluster(), "a", listen=False) as a:
        with pytest.raises(PeerAddressRefused, match="allow_public"):
            await a.connect("8.8.8.8", 7000)
        with pytest.raises(PeerAddressRefused, match="not an IP address"):
            await a.connect("example.com", 7000)
        assert a.counters["bytes_sent"] == 0


async def test_unreachable_peer_gives_clear_error() -> None:
    async with running(new_cluster(), "a") as a:
        port = a.port
        await a.close()
    async with running(new_cluster(), "b", listen=False) as b:
        with pytest.raises(ConnectFailed, match=r"cannot reach node at 127\.0\.0\.1"):
            await b.connect(HOST, port or 0)


async def test_clean_close_fails_pending_requests() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        started = asyncio.Event()

        async def hang(conn: Connection, body: Any) -> Any:
            started.set()
            await asyncio.sleep(30)

        b.on_request("hang", hang)
        conn = await a.connect(HOST, b.port or 0)
        pending = asyncio.create_task(conn.request("hang", None))
        await asyncio.wait_for(started.wait(), 5)
        await conn.close()
        with pytest.raises(ConnectionClosed):
            await pending
        assert conn.closed and b.key.node_id not in a.connections
        with pytest.raises(ConnectionClosed):
            await conn.request("hang", None)
        for _ in range(100):  # b notices too
            if a.key.node_id not in b.connections:
                break
            await asyncio.sleep(0.02)
        assert a.key.node_id not in b.connections


async def test_backpressure_blocks_a_fast_sender() -> None:
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b", inbound_backlog=2) as b:
        release = asyncio.Event()
        count = 0

        async def slow(conn: Connection, body: Any) -> None:
            nonlocal count
            await release.wait()
            count += 1

        b.on_notify("bulk", slow)
        conn = await a.connect(HOST, b.port or 0)
        chunk = np.zeros(2**20, np.uint8)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(64):
                await conn.notify("bulk", chunk)
                sent += 1

        task = asyncio.create_task(flood())
        await asyncio.sleep(1.0)
        assert not task.done() and sent < 64  # the sender waits for the slow receiver
        release.set()
        await asyncio.wait_for(task, 30)
        for _ in range(200):
            if count == 64:
                break
            await asyncio.sleep(0.02)
        assert count == 64


async def test_outgoing_message_over_the_frame_limit_is_refused_locally() -> None:
    cluster = new_cluster()
    async with running(cluster, "a", max_frame_size=1 << 20) as a, running(cluster, "b") as b:
        b.on_request("echo", echo)
        conn = await a.connect(HOST, b.port or 0)
        from protocol.errors import FrameTooLarge

        with pytest.raises(FrameTooLarge, match="outgoing"):
            await conn.request("echo", np.zeros(2 << 20, np.uint8))
        assert await conn.request("echo", 1) == 1


async def test_handlers_run_inside_a_task() -> None:
    """A handler may use asyncio.timeout(), which needs asyncio.current_task()."""
    cluster = new_cluster()
    async with running(cluster, "a") as a, running(cluster, "b") as b:
        seen: list[asyncio.Task[Any] | None] = []

        async def timed(conn: Connection, body: Any) -> Any:
            seen.append(asyncio.current_task())
            async with asyncio.timeout(5):
                await asyncio.sleep(0)
                return body * 2

        b.on_request("timed", timed)
        conn = await a.connect(HOST, b.port or 0)
        assert await conn.request("timed", 21) == 42
        assert await asyncio.gather(*(conn.request("timed", i) for i in range(5))) == [0, 2, 4, 6, 8]
        assert len(seen) == 6 and all(task is not None for task in seen)


def test_main_paths_on_uvloop() -> None:
    """The daemon runs on uvloop, whose TLS and transports are separate code."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        cluster = new_cluster()
        async with running(cluster, "a") as a, running(cluster, "b") as b:
            got = asyncio.Event()

            async def boom(conn: Connection, body: Any) -> Any:
                raise RuntimeError("nope")

            async def on_n(conn: Connection, body: Any) -> None:
                got.set()

            b.on_request("echo", echo)
            b.on_request("boom", boom)
            b.on_notify("n", on_n)
            conn = await a.connect(HOST, b.port or 0)
            big = np.arange(3 * 2**20, dtype=np.float32)
            np.testing.assert_array_equal((await conn.request("echo", {"x": big}))["x"], big)
            small = np.ones((1, 4096), ml_dtypes.bfloat16)
            assert (await conn.request("echo", small) == small).all()
            with pytest.raises(RemoteError):
                await conn.request("boom", None)
            await conn.notify("n", None)
            await asyncio.wait_for(got.wait(), 5)
            back = await b.connect(HOST, a.port or 0, expect_node_id=a.key.node_id)
            assert back is b.connections[a.key.node_id]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
