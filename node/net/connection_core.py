"""The sending half and lifecycle of a peer connection.

ConnectionCore holds a connection's state and does everything but dispatch
inbound messages (node/connection.py adds that): the public send API
(requests with ids and timeouts, notifications, close), writing frames,
flow control, saying Hello once TLS is up, keepalive pings, failing with an
Error frame on bad input, and retiring a duplicate connection.

Copies are avoided on the hot path: a message is written as frame header plus
the encoder's buffers (large arrays as views of their own memory) with
``writelines``; small frames are joined into one TLS record.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog

from node.identity import IdentityError, PeerIdentity, peer_identity
from node.net.errors import (
    ConnectionClosed,
    HandshakeError,
    RemoteError,
    RequestTimeout,
)
from protocol.errors import FrameTooLarge
from protocol.framing import frame_header
from protocol.messages import (
    Error,
    Hello,
    Message,
    Notify,
    Ping,
    Request,
    encode_message_parts,
)

if TYPE_CHECKING:
    from node.net.transport import Transport

__all__ = ["CLOSE_TIMEOUT", "FEATURES", "ConnectionCore", "format_address"]

# The transport's logger: connection events have always been logged under it.
log = structlog.get_logger("node.net.transport")

FEATURES: tuple[str, ...] = ("tensor-ext-1",)
CLOSE_TIMEOUT = 2.0
_WRITE_HIGH_WATER = 4 * 2**20
# Frames up to this size are joined into one buffer before writing: each
# buffer handed to TLS becomes its own record (and its own AEAD call), which
# costs more than copying a small payload once.
_JOIN_BELOW = 256 * 1024


def format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


class ConnectionCore:
    """State, sending and lifecycle of a peer connection (Connection adds the inbound side)."""

    def __init__(
        self, owner: Transport, *, outbound: bool, remote_address: Any, expect_node_id: str | None = None
    ) -> None:
        self._owner = owner
        self._expect_node_id = expect_node_id
        self._loop = asyncio.get_running_loop()
        self.outbound = outbound
        self.remote_address = remote_address
        self.peer: PeerIdentity | None = None
        self.hello: Hello | None = None
        self._tr: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._hello_fut: asyncio.Future[Hello] = self._loop.create_future()
        self._closed = asyncio.Event()
        self._close_reason = "closed"
        self._failed = False
        self._deferred_error: tuple[str, str] | None = None  # failed before TLS handed us the transport
        self._retired = False
        self._write_paused = False
        self._drain_waiters: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._notify_queue: deque[Notify] = deque()
        self._notify_task: asyncio.Task[None] | None = None
        self._running_handlers = 0
        self._reading_paused = False
        self._keepalive_task: asyncio.Task[None] | None = None
        self.last_received = self._loop.time()
        #: The last connection-level Error the peer sent (it usually closes right after).
        self.last_peer_error: RemoteError | None = None

    # ------------------------------------------------------------------ public API

    @property
    def node_id(self) -> str:
        """The peer's node id, from its verified certificate."""
        assert self.peer is not None, "connection not established yet"
        return self.peer.node_id

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # A per-call timeout is part of the API (callers know their deadline).
    async def request(
        self, method: str, body: Any = None, timeout: float | None = None  # noqa: ASYNC109
    ) -> Any:
        """Send a request and wait for its response body; RemoteError if the peer failed it."""
        if self._retired:
            replacement = self._owner.connections.get(self.node_id)
            if replacement is not None and replacement is not self and not replacement.closed:
                return await replacement.request(method, body, timeout)
        self._check_open()
        limit = self._owner.request_timeout if timeout is None else timeout
        if self._write_paused:  # the peer is not reading: wait for room before adding more
            try:
                async with asyncio.timeout(limit):
                    await self._drain()
            except TimeoutError:
                self._owner.stats.request_timeouts += 1
                raise RequestTimeout(
                    f"request {method!r} to node {self.node_id[:12]} could not be sent within {limit} s "
                    "(the peer is not reading)"
                ) from None
        rid = next(self._ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[rid] = fut
        # A timer on the future is cheaper than asyncio.timeout() on this hot path.
        timer = self._loop.call_later(limit, self._expire, fut, method, limit)
        try:
            self._write(Request(rid, method, body))
            self._owner.stats.requests_sent += 1
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(rid, None)
            self._maybe_finish_retire()

    def _expire(self, fut: asyncio.Future[Any], method: str, limit: float) -> None:
        if not fut.done():
            self._owner.stats.request_timeouts += 1
            fut.set_exception(RequestTimeout(
                f"request {method!r} to node {self.node_id[:12]} got no answer within {limit} s"
            ))

    async def notify(self, topic: str, body: Any = None) -> None:
        """Send a one-way message; waits while the peer is not keeping up (drain).

        Large arrays in ``body`` are handed to TLS without a copy: do not modify
        them before this call returns.
        """
        self._check_open()
        self._write(Notify(topic, body))
        self._owner.stats.notifies_sent += 1
        await self._drain()

    async def send(self, msg: Message) -> None:
        """Send any registered message (for message types added by later issues)."""
        self._check_open()
        self._write(msg)
        await self._drain()

    async def close(self, reason: str = "closed by this node") -> None:
        """Close cleanly (TLS close_notify), failing requests still waiting."""
        self._begin_close(reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._closed.wait()
        if not self.closed and self._tr is not None:
            self._tr.abort()
            await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def __repr__(self) -> str:
        who = self.peer.node_id[:12] if self.peer else "?"
        return f"<Connection {who} {format_address(self.remote_address)} {'out' if self.outbound else 'in'}>"

    # ------------------------------------------------------------------ writing

    def _check_open(self) -> None:
        if self.closed or self._tr is None or self._tr.is_closing():
            raise ConnectionClosed(
                f"connection to {format_address(self.remote_address)} is closed ({self._close_reason})"
            )

    def _write(self, msg: Message) -> None:
        assert self._tr is not None
        parts = encode_message_parts(msg)
        if len(parts) == 1:  # the usual small message: one bytes object
            size = len(parts[0])
        else:
            size = sum(memoryview(p).nbytes for p in parts)
        limit = self._owner.max_frame_size
        if size > limit:
            raise FrameTooLarge(size, limit, f"outgoing {type(msg).__name__} message")
        if size < _JOIN_BELOW:
            self._tr.write(b"".join([frame_header(size), *parts]))
        else:
            self._tr.writelines([frame_header(size), *parts])
        stats = self._owner.stats
        stats.bytes_sent += size + 4
        stats.frames_sent += 1

    async def _drain(self) -> None:
        if self._write_paused:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut
        self._check_open()

    def _resume_writing(self) -> None:
        self._write_paused = False
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------------ lifecycle

    def _attach(self, transport: asyncio.Transport) -> None:
        """TLS is up: learn who the peer is and say hello."""
        self._tr = transport
        if self._deferred_error is not None or self.closed:
            if self._deferred_error is not None:
                with contextlib.suppress(Exception):
                    self._write(Error(*self._deferred_error))
            transport.close()
            return
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.last_received = self._loop.time()
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            self.peer = peer_identity(ssl_object)
        except IdentityError as exc:
            self._protocol_failure("bad_certificate", str(exc))
            return
        owner = self._owner
        self._write(
            Hello(owner._protocol_version, owner.key.node_id, owner.name, owner.software_version, FEATURES)
        )

    def _start_keepalive(self) -> None:
        if self._owner.keepalive_interval > 0:
            self._keepalive_task = self._loop.create_task(self._keepalive())

    async def _keepalive(self) -> None:
        interval = self._owner.keepalive_interval
        nonce = itertools.count(1)
        while not self.closed:
            await asyncio.sleep(interval)
            idle = self._loop.time() - self.last_received
            if idle >= 2 * interval:
                self._owner.stats.keepalive_timeouts += 1
                log.warning("keepalive_timeout", peer=self.node_id, address=format_address(self.remote_address),
                            idle_s=round(idle, 3))
                self._begin_close(f"peer silent for {idle:.1f} s (keepalive timeout)")
                return
            if idle >= interval and self._tr is not None and not self._tr.is_closing():
                self._write(Ping(next(nonce)))

    def _begin_close(self, reason: str) -> None:
        if self.closed:
            return
        if self._close_reason == "closed":
            self._close_reason = reason
        self._owner._unlist(self)  # never hand out a closing connection
        if self._tr is not None and not self._tr.is_closing():
            self._tr.close()
        elif self._tr is None:
            self._on_lost(None)

    def _protocol_failure(self, code: str, message: str) -> None:
        """The peer sent something we cannot accept: tell it why, then close."""
        if self._failed:
            return
        self._failed = True
        self._owner.stats.protocol_errors += 1
        log.warning("peer_protocol_error", address=format_address(self.remote_address),
                    peer=self.peer.node_id if self.peer else None, code=code, error=message)
        if not self._hello_fut.done():
            self._hello_fut.set_exception(HandshakeError(f"{code}: {message}"))
            self._hello_fut.exception()  # mark retrieved: the waiter may be gone
        if self._tr is None:
            self._deferred_error = (code, message)
            self._close_reason = f"{code}: {message}"
            return
        if not self._tr.is_closing():
            with contextlib.suppress(Exception):
                self._write(Error(code, message))
        self._begin_close(f"{code}: {message}")

    def _on_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is not None and self._close_reason == "closed":
            self._close_reason = f"connection lost: {exc}"
        elif self.last_peer_error is not None and self._close_reason == "closed":
            self._close_reason = f"peer reported {self.last_peer_error.message} [{self.last_peer_error.code}]"
        self._closed.set()
        error = ConnectionClosed(
            f"connection to {format_address(self.remote_address)} closed ({self._close_reason})"
        )
        if not self._hello_fut.done():
            self._hello_fut.set_exception(error)
            self._hello_fut.exception()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)  # _drain() re-checks and raises ConnectionClosed
        self._drain_waiters.clear()
        current = asyncio.current_task()
        for task in [*self._tasks, self._notify_task, self._keepalive_task]:
            if task is not None and task is not current and not task.done():
                task.cancel()
        self._owner._forget(self)

    def _retire(self) -> None:
        """A duplicate of a kept connection: close it once nothing is in flight on it."""
        self._retired = True
        self._maybe_finish_retire()

    def _maybe_finish_retire(self) -> None:
        if self._retired and not self._pending and not self._running_handlers and not self._notify_queue:
            self._begin_close("duplicate connection to the same peer")
