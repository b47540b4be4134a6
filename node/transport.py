"""Encrypted, mutually authenticated msgpack streams between nodes (asyncio adapter).

Owns the TCP listener and the connections to peers. Every connection is TLS 1.3
with certificates checked against the cluster CA (node/identity.py); the peer's
node id comes from its verified certificate, never from what it says. On top of
TLS it speaks protocol/: length-prefixed frames carrying typed messages. This
module only moves bytes and dispatches; encoding, framing and limits live in the
sans-I/O protocol/ package.

Per connection: both sides send Hello first (protocol versions must match),
then requests (with ids and timeouts), responses, one-way notifications, and
keepalive pings. One connection serves both directions: if A connected to B, B
reuses it for its requests to A. Bad input from a peer (garbage, oversized or
truncated frames, messages of the wrong shape) closes that connection with an
Error frame; the listener keeps serving everyone else.

Copies are avoided on the hot path: a message is written as frame header plus
the encoder's buffers (large arrays as views of their own memory) with
``writelines``, and TLS decrypts large frames straight into their final buffer
(asyncio BufferedProtocol + FrameDecoder.get_buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from node.identity import (
    ClusterKeys,
    IdentityError,
    NodeKey,
    PeerIdentity,
    client_ssl_context,
    peer_identity,
    server_ssl_context,
)
from node.netpolicy import PeerAddressRefused, check_peer_address
from protocol.errors import FrameTooLarge, ProtocolError, UnknownMessageType
from protocol.framing import FrameDecoder, frame_header
from protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Message,
    Notify,
    Ping,
    Pong,
    Request,
    Response,
    decode_message,
    encode_message_parts,
)

__all__ = [
    "ConnectFailed",
    "Connection",
    "ConnectionClosed",
    "HandshakeError",
    "PeerAddressRefused",
    "ProtocolVersionMismatch",
    "RemoteError",
    "RequestTimeout",
    "Transport",
    "TransportError",
    "TransportStats",
]

log = structlog.get_logger(__name__)

RequestHandler = Callable[["Connection", Any], Awaitable[Any]]
NotifyHandler = Callable[["Connection", Any], Awaitable[None]]
MessageHandler = Callable[["Connection", Message], Awaitable[None]]

FEATURES: tuple[str, ...] = ("tensor-ext-1",)
_HANDSHAKE_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 2.0
_WRITE_HIGH_WATER = 4 * 2**20
# Frames up to this size are joined into one buffer before writing: each
# buffer handed to TLS becomes its own record (and its own AEAD call), which
# costs more than copying a small payload once.
_JOIN_BELOW = 256 * 1024
_EAGER = sys.version_info >= (3, 12)


class TransportError(Exception):
    """Base of the errors this module raises."""


class ConnectFailed(TransportError, ConnectionError):
    """A connection to a peer could not be set up."""


class HandshakeError(ConnectFailed):
    """TLS or the Hello exchange failed (wrong cluster, wrong node, bad peer)."""


class ProtocolVersionMismatch(HandshakeError):
    """The peer speaks another protocol version."""


class ConnectionClosed(TransportError, ConnectionError):
    """The connection closed before the operation finished."""


class RequestTimeout(TransportError, TimeoutError):
    """No answer to a request within its timeout."""


class RemoteError(TransportError):
    """The peer answered with an Error message (``code`` says what kind)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"peer error [{code}]: {message}")
        self.code = code
        self.message = message


@dataclass
class TransportStats:
    """Counters for the Prometheus endpoint (all monotonic)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    handshake_failures: int = 0
    hello_failures: int = 0
    refused_addresses: int = 0
    protocol_errors: int = 0
    requests_sent: int = 0
    requests_received: int = 0
    request_timeouts: int = 0
    handler_errors: int = 0
    notifies_sent: int = 0
    notifies_received: int = 0
    keepalive_timeouts: int = 0


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


class _Resume:
    """Awaitable that continues a coroutine already advanced to its first suspension."""

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, None]:
        coro, yielded = self._coro, self._yielded
        while True:
            # Hand what the coroutine yielded (a future) to the Task driving us,
            # and pass the Task's wake-up (or exception) back in: `yield from`
            # for a coroutine that was started elsewhere.
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    yielded = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration:
                    return


async def _finish(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    await _Resume(coro, yielded)


class _PeerProtocol(asyncio.BufferedProtocol):
    """Feeds decrypted bytes into the frame decoder and frames into the Connection."""

    def __init__(self, conn: Connection, max_frame_size: int) -> None:
        self._conn = conn
        self._decoder = FrameDecoder(max_frame_size)
        self._discard: bytearray | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called by the TLS transport once the handshake is done.
        self.attach(transport)  # type: ignore[arg-type]

    def attach(self, transport: asyncio.Transport) -> None:
        if self._conn._tr is None:
            self._conn._attach(transport)
            self._deliver()

    def _deliver(self) -> None:
        conn = self._conn
        try:
            for frame in self._decoder:
                conn._on_frame(frame)
                if conn._failed:
                    return
        except ProtocolError as exc:
            conn._protocol_failure(exc.code, exc.message)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._conn._failed:
            # Keep reading (and dropping) until TLS shuts down.
            if self._discard is None:
                self._discard = bytearray(64 * 1024)
            return memoryview(self._discard)
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        conn._owner.stats.bytes_received += nbytes
        # Any bytes count as a sign of life, so a long frame does not look like silence.
        conn.last_received = conn._loop.time()
        if conn._failed:
            return
        try:
            self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            conn._protocol_failure(exc.code, exc.message)
            return
        if conn._tr is not None:  # frames that arrive with the handshake wait for attach()
            self._deliver()

    def eof_received(self) -> bool | None:
        if not self._conn._failed:
            self._decoder.feed_eof()
            if self._conn._tr is not None:
                self._deliver()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._on_lost(exc)

    def pause_writing(self) -> None:
        self._conn._write_paused = True

    def resume_writing(self) -> None:
        self._conn._resume_writing()


class Connection:
    """One authenticated connection to a peer; usable in both directions."""

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
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._closed.wait()
        if not self.closed and self._tr is not None:
            self._tr.abort()
            await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def __repr__(self) -> str:
        who = self.peer.node_id[:12] if self.peer else "?"
        return f"<Connection {who} {_format_address(self.remote_address)} {'out' if self.outbound else 'in'}>"

    # ------------------------------------------------------------------ writing

    def _check_open(self) -> None:
        if self.closed or self._tr is None or self._tr.is_closing():
            raise ConnectionClosed(
                f"connection to {_format_address(self.remote_address)} is closed ({self._close_reason})"
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
                log.warning("keepalive_timeout", peer=self.node_id, address=_format_address(self.remote_address),
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
        log.warning("peer_protocol_error", address=_format_address(self.remote_address),
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
            f"connection to {_format_address(self.remote_address)} closed ({self._close_reason})"
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

    # ------------------------------------------------------------------ receiving

    def _on_frame(self, frame: bytes | bytearray) -> None:
        owner = self._owner
        owner.stats.frames_received += 1
        try:
            msg = decode_message(frame, max_size=owner.max_frame_size)
        except UnknownMessageType as exc:
            # Maybe a newer peer: answer, but keep the connection.
            log.info("unknown_message_type", peer=self.peer.node_id if self.peer else None, type=exc.type_name)
            self._write(Error(exc.code, exc.message, exc.request_id))
            return
        except ProtocolError as exc:
            self._protocol_failure(exc.code, exc.message)
            return
        if self.hello is None:
            self._on_first_message(msg)
            return
        if isinstance(msg, Request):
            owner.stats.requests_received += 1
            self._spawn(self._serve_request(msg))
        elif isinstance(msg, Response):
            fut = self._pending.get(msg.request_id)
            if fut is not None and not fut.done():
                fut.set_result(msg.body)
        elif isinstance(msg, Notify):
            owner.stats.notifies_received += 1
            self._notify_queue.append(msg)
            if self._notify_task is None or self._notify_task.done():
                self._notify_task = self._spawn(self._run_notifies())
            self._update_reading()
        elif isinstance(msg, Error):
            if msg.request_id is not None:
                fut = self._pending.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_exception(RemoteError(msg.code, msg.message))
            else:
                log.warning("peer_reported_error", peer=self.node_id, code=msg.code, error=msg.message)
                self.last_peer_error = RemoteError(msg.code, msg.message)
        elif isinstance(msg, Ping):
            self._write(Pong(msg.nonce))
        elif isinstance(msg, Pong):
            pass
        elif isinstance(msg, Hello):
            self._protocol_failure("unexpected_hello", "hello sent twice on one connection")
        else:
            handler = owner._message_handlers.get(type(msg))
            if handler is None:
                self._write(Error("unhandled_message", f"this node does not handle {type(msg).TYPE!r} messages"))
            else:
                self._spawn(self._run_message_handler(handler, msg))

    def _on_first_message(self, msg: Message) -> None:
        # Checked here, synchronously, so that a request the peer sends right
        # after its hello (in the same read) already finds the hello accepted.
        fut = self._hello_fut
        if isinstance(msg, Hello):
            failure = self._owner._check_hello(self, msg)
            if failure is None:
                self.hello = msg
                if not fut.done():
                    fut.set_result(msg)
                return
            code, message, error = failure
            if not fut.done():
                fut.set_exception(error)
            self._protocol_failure(code, message)
        elif isinstance(msg, Error):
            exc_type = ProtocolVersionMismatch if msg.code == "protocol_version" else HandshakeError
            if not fut.done():
                fut.set_exception(exc_type(f"the peer refused the connection: {msg.message}"))
            self._begin_close(f"peer refused: {msg.message}")
        else:
            self._protocol_failure("expected_hello", f"the first message must be hello, got {type(msg).TYPE}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        # Handlers start at once, inside this read callback: one that does not
        # block answers without an extra trip through the event loop (a third
        # of a small request's round trip). Only a handler that waits gets a Task.
        if _EAGER:
            task: asyncio.Task[None] = asyncio.Task(coro, loop=self._loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
            if task.done():
                return None
        else:
            try:
                yielded = coro.send(None)
            except StopIteration:
                return None
            task = self._loop.create_task(_finish(coro, yielded))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _update_reading(self) -> None:
        if self._tr is None or self._tr.is_closing():
            return
        backlog = len(self._notify_queue) + self._running_handlers
        limit = self._owner.inbound_backlog
        if not self._reading_paused and backlog > limit:
            self._reading_paused = True
            self._tr.pause_reading()
        elif self._reading_paused and backlog <= limit // 2:
            self._reading_paused = False
            self._tr.resume_reading()

    async def _serve_request(self, req: Request) -> None:
        handler = self._owner._request_handlers.get(req.method)
        self._running_handlers += 1
        self._update_reading()
        try:
            if handler is None:
                reply: Message = Error(
                    "unknown_method", f"this node has no handler for method {req.method!r}", req.request_id
                )
            else:
                try:
                    reply = Response(req.request_id, await handler(self, req.body))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._owner.stats.handler_errors += 1
                    log.warning("request_handler_failed", method=req.method, peer=self.node_id,
                                error=f"{type(exc).__name__}: {exc}")
                    reply = Error("handler_error", f"{type(exc).__name__}: {exc}", req.request_id)
            if self._tr is None or self._tr.is_closing():
                return
            try:
                self._write(reply)
            except ProtocolError as exc:  # the handler returned something we cannot send
                self._write(Error(exc.code, f"the reply could not be sent: {exc.message}", req.request_id))
            if self._write_paused:
                await self._drain()
        except ConnectionClosed:
            pass
        finally:
            self._running_handlers -= 1
            self._update_reading()
            self._maybe_finish_retire()

    async def _run_notifies(self) -> None:
        # One task per connection, so notifications are handled in arrival order.
        while self._notify_queue:
            msg = self._notify_queue.popleft()
            self._update_reading()
            handler = self._owner._notify_handlers.get(msg.topic)
            if handler is None:
                log.info("unhandled_notify", topic=msg.topic, peer=self.node_id)
                continue
            try:
                await handler(self, msg.body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._owner.stats.handler_errors += 1
                log.warning("notify_handler_failed", topic=msg.topic, peer=self.node_id,
                            error=f"{type(exc).__name__}: {exc}")
        self._maybe_finish_retire()

    async def _run_message_handler(self, handler: MessageHandler, msg: Message) -> None:
        try:
            await handler(self, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._owner.stats.handler_errors += 1
            log.warning("message_handler_failed", type=type(msg).TYPE, error=f"{type(exc).__name__}: {exc}")


class Transport:
    """The node's listener plus its pool of peer connections (one per peer)."""

    def __init__(
        self,
        key: NodeKey,
        cluster: ClusterKeys,
        *,
        name: str,
        software_version: str,
        max_frame_size: int = 64 * 2**20,
        request_timeout: float = 30.0,
        keepalive_interval: float = 15.0,
        allow_public: bool = False,
        handshake_timeout: float = _HANDSHAKE_TIMEOUT,
        inbound_backlog: int = 128,
    ) -> None:
        """``inbound_backlog``: queued notifications plus running request handlers
        per connection above which the connection stops reading, which pushes
        back on a peer that sends faster than this node handles. ``keepalive_interval``
        0 turns pings off."""
        self.key = key
        self.cluster = cluster
        self.name = name
        self.software_version = software_version
        self.max_frame_size = max_frame_size
        self.request_timeout = request_timeout
        self.keepalive_interval = keepalive_interval
        self.allow_public = allow_public
        self.handshake_timeout = handshake_timeout
        self.inbound_backlog = inbound_backlog
        self.stats = TransportStats()
        self.connections: dict[str, Connection] = {}
        self.port: int | None = None
        self._protocol_version = PROTOCOL_VERSION  # tests change it to provoke mismatches
        self._server_ctx = server_ssl_context(cluster, key, name)
        self._client_ctx = client_ssl_context(cluster, key, name)
        self._listen_sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._request_handlers: dict[str, RequestHandler] = {}
        self._notify_handlers: dict[str, NotifyHandler] = {}
        self._message_handlers: dict[type[Message], MessageHandler] = {}
        self._all: set[Connection] = set()
        self._by_address: dict[tuple[str, int], Connection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # ------------------------------------------------------------------ handlers

    def on_request(self, method: str, handler: RequestHandler) -> None:
        """Serve ``method``: the handler's return value is the response body."""
        self._request_handlers[method] = handler

    def on_notify(self, topic: str, handler: NotifyHandler) -> None:
        """Handle one-way messages on ``topic`` (called in arrival order per connection)."""
        self._notify_handlers[topic] = handler

    def on_message(self, cls: type[Message], handler: MessageHandler) -> None:
        """Handle a message type registered by a later protocol extension."""
        self._message_handlers[cls] = handler

    def stats_dict(self) -> dict[str, int]:
        return asdict(self.stats)

    # ------------------------------------------------------------------ listening

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free port; see ``self.port``)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dualstack = host == "::" and socket.has_dualstack_ipv6()
        try:
            sock = socket.create_server((host, port), family=family, backlog=128, dualstack_ipv6=dualstack)
        except OSError as exc:
            raise TransportError(
                f"cannot listen for peers on {host}:{port}: {exc.strerror or exc}; "
                "pick another port (network.peer_port) or stop the program using it"
            ) from exc
        sock.setblocking(False)
        self._listen_sock = sock
        self.port = int(sock.getsockname()[1])
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        log.info("transport_listening", host=host, port=self.port)

    async def _accept_loop(self, listener: socket.socket) -> None:
        # Accepting by hand, then handing the socket to connect_accepted_socket()
        # with TLS, lets us see (and log) every failed handshake with the
        # peer's address, which create_server(ssl=...) swallows.
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peername = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: back off, keep serving
                log.warning("accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            try:
                check_peer_address(str(peername[0]), self.allow_public)
            except PeerAddressRefused as exc:
                self.stats.refused_addresses += 1
                log.warning("peer_address_refused", address=_format_address(peername), error=str(exc))
                sock.close()
                continue
            self._track(self._serve_inbound(sock, peername))

    def _track(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_inbound(self, sock: socket.socket, peername: Any) -> None:
        try:
            await self._establish(sock, peername, server_side=True, expect_node_id=None)
        except (HandshakeError, ConnectionClosed):
            pass  # already logged once in _establish
        except Exception as exc:  # never let one bad peer disturb the listener
            log.warning("inbound_connection_failed", peer=_format_address(peername),
                        error=f"{type(exc).__name__}: {exc}")
            sock.close()

    # ------------------------------------------------------------------ connecting

    async def connect(self, host: str, port: int, *, expect_node_id: str | None = None) -> Connection:
        """A connection to the node at ``host:port``, reusing an existing one when possible.

        ``expect_node_id`` (when known) must match the id in the peer's certificate.
        """
        if self._closing:
            raise ConnectionClosed("the transport is closed")
        if expect_node_id is not None:
            existing = self.connections.get(expect_node_id)
            if existing is not None and not existing.closed:
                return existing
        check_peer_address(host, self.allow_public)
        address = (host, port)
        known = self._by_address.get(address)
        if known is not None and not known.closed and (
            expect_node_id is None or known.node_id == expect_node_id
        ):
            return self.connections.get(known.node_id, known)
        pending = self._connecting.get(address)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._connecting[address] = pending
            try:
                conn = await self._dial(host, port, expect_node_id)
                pending.set_result(conn)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    pending.cancel()
                else:
                    pending.set_exception(exc)
                    pending.exception()  # mark retrieved: there may be no other waiter
                raise
            finally:
                del self._connecting[address]
        conn = await asyncio.shield(pending)
        if expect_node_id is not None and conn.node_id != expect_node_id:
            raise HandshakeError(
                f"{host}:{port} is node {conn.node_id[:12]}, not the expected {expect_node_id[:12]}"
            )
        return conn

    async def _dial(self, host: str, port: int, expect_node_id: str | None) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                errors = []
                for family, kind, proto, _, address in infos:
                    # A name may resolve somewhere we must not go: check before any traffic.
                    try:
                        check_peer_address(str(address[0]), self.allow_public)
                    except PeerAddressRefused:
                        self.stats.refused_addresses += 1
                        raise
                    sock = socket.socket(family, kind, proto)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, address)
                        break
                    except OSError as exc:
                        sock.close()
                        errors.append(exc)
                else:
                    raise errors[0] if errors else OSError(f"{host} has no address")
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot reach node at {host}:{port}: {exc or 'timed out'}") from exc
        peername = sock.getpeername()
        conn = await self._establish(sock, peername, server_side=False, expect_node_id=expect_node_id)
        self._by_address[(host, port)] = conn
        return conn

    async def _establish(
        self, sock: socket.socket, peername: Any, *, server_side: bool, expect_node_id: str | None
    ) -> Connection:
        loop = asyncio.get_running_loop()
        where = _format_address(peername)
        conn = Connection(
            self, outbound=not server_side, remote_address=peername, expect_node_id=expect_node_id
        )
        protocol = _PeerProtocol(conn, self.max_frame_size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if server_side:
                tls, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=self._server_ctx,
                    ssl_handshake_timeout=self.handshake_timeout, ssl_shutdown_timeout=_CLOSE_TIMEOUT,
                )
            else:
                tls, _ = await loop.create_connection(
                    lambda: protocol, sock=sock, ssl=self._client_ctx, server_hostname="",
                    ssl_handshake_timeout=self.handshake_timeout, ssl_shutdown_timeout=_CLOSE_TIMEOUT,
                )
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            sock.close()
            self.stats.handshake_failures += 1
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if server_side:
                log.warning("tls_handshake_failed", peer=where, error=reason)
            raise HandshakeError(
                f"TLS handshake with {where} failed ({reason}); the peer is not a member of this "
                "cluster (different cluster secret?) or not an enjambre node"
            ) from None
        self._all.add(conn)
        protocol.attach(tls)
        try:
            await self._handshake(conn)
        except (HandshakeError, ConnectionClosed) as exc:
            self.stats.hello_failures += 1
            if server_side:
                log.warning("hello_failed", peer=where, error=str(exc))
            await conn.close(str(exc))
            raise
        self.stats.connections_opened += 1
        log.info("peer_connected", peer=conn.node_id, name=conn.peer.name if conn.peer else "",
                 address=where, direction="out" if conn.outbound else "in")
        kept = self._register(conn)
        conn._start_keepalive()
        return kept

    async def _handshake(self, conn: Connection) -> None:
        where = _format_address(conn.remote_address)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await conn._hello_fut
        except TimeoutError:
            conn._protocol_failure("hello_timeout", f"no hello within {self.handshake_timeout} s")
            raise HandshakeError(f"node at {where} sent no hello within {self.handshake_timeout} s") from None

    def _check_hello(self, conn: Connection, hello: Hello) -> tuple[str, str, HandshakeError] | None:
        """Why the peer's hello is unacceptable (code, message for it, error for us), or None."""
        where = _format_address(conn.remote_address)
        assert conn.peer is not None
        if hello.protocol_version != self._protocol_version:
            message = (
                f"protocol version mismatch: this node speaks version {self._protocol_version}, "
                f"the peer version {hello.protocol_version}; run the same enjambre release on all nodes"
            )
            return "protocol_version", message, ProtocolVersionMismatch(f"node at {where}: {message}")
        if hello.node_id != conn.peer.node_id:
            return (
                "identity_mismatch",
                "hello names another node than the certificate",
                HandshakeError(f"node at {where} claims an id that its certificate does not prove"),
            )
        if conn.peer.node_id == self.key.node_id:
            return "self_connection", "a node cannot connect to itself", HandshakeError(
                f"{where} is this node itself"
            )
        expected = conn._expect_node_id
        if expected is not None and conn.peer.node_id != expected:
            return "wrong_node", "this is not the node the caller expected", HandshakeError(
                f"{where} is node {conn.peer.node_id[:12]}, not the expected {expected[:12]}; "
                "the address may belong to another node now"
            )
        return None

    def _register(self, conn: Connection) -> Connection:
        """Keep one connection per peer; both nodes pick the same one of a duplicate pair."""
        node_id = conn.node_id
        existing = self.connections.get(node_id)
        if existing is None or existing.closed:
            self.connections[node_id] = conn
            return conn

        def opener(c: Connection) -> str:
            return self.key.node_id if c.outbound else node_id

        if opener(conn) < opener(existing):
            keep, drop = conn, existing
        else:
            keep, drop = existing, conn
        self.connections[node_id] = keep
        drop._retire()
        return keep

    def _forget(self, conn: Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self.stats.connections_closed += 1
        self._unlist(conn)

    def _unlist(self, conn: Connection) -> None:
        if conn.peer is not None and self.connections.get(conn.peer.node_id) is conn:
            del self.connections[conn.peer.node_id]
            log.info("peer_disconnected", peer=conn.peer.node_id, reason=conn._close_reason)
        for address, known in list(self._by_address.items()):
            if known is conn:
                del self._by_address[address]

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop listening and close every connection."""
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listen_sock is not None:
            self._listen_sock.close()
            self._listen_sock = None
        for task in list(self._tasks):  # handshakes in progress
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.close("transport shutting down") for c in list(self._all)),
                             return_exceptions=True)
