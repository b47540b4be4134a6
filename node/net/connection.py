"""One authenticated peer connection: the read path under TLS, dispatch, sending, lifecycle.

A Connection is the asyncio ``BufferedProtocol`` under the TLS transport. Both sides
send Hello first (checked by ``protocol.handshake``), then requests (ids, timeouts),
responses, one-way notifications and keepalive pings; one connection serves both
directions. Bad input from a peer closes that connection with an Error frame; the
listener (node/net/transport.py) keeps serving everyone else. A connection gets
frozen ``ConnectionSettings`` and ``ConnectionHooks`` (handler tables, counters, three
callables of its pool), never a reference to the Transport.

Its two halves are node/net/inbound.py (frames out of decrypted bytes, within the
shared memory budget) and node/net/outbound.py (frames out, flow control, the
slow-reader rule); this module dispatches and runs the lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from node.identity import IdentityError
from node.net.addresses import format_address
from node.net.errors import (
    ConnectionClosed,
    HandshakeError,
    ProtocolVersionMismatch,
    RemoteError,
    RequestRefused,
    RequestTimeout,
)
from node.net.inbound import Inbound
from node.net.limits import InboundBudget
from node.net.outbound import WRITE_HIGH_WATER, Outbound
from node.net.tls import PeerIdentity, peer_identity
from node.system.counters import Counters
from protocol.errors import ProtocolError, UnknownMessageType, clip
from protocol.framing import DEFAULT_MAX_FRAME_SIZE
from protocol.handshake import check_hello
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
)

__all__ = ["CLOSE_TIMEOUT", "FEATURES", "Connection", "ConnectionHooks", "ConnectionSettings",
           "NotifyHandler", "RequestHandler"]

RequestHandler = Callable[["Connection", Any], Awaitable[Any]]
NotifyHandler = Callable[["Connection", Any], Awaitable[None]]

log = structlog.get_logger("node.transport")

FEATURES: tuple[str, ...] = ("tensor-ext-1",)
CLOSE_TIMEOUT = 2.0
# Python 3.12's eager tasks run a handler's first step inside the read callback,
# so one that does not block answers without a trip through the event loop. On
# 3.11 a plain task is the correct choice (see the README for the measured cost).
_EAGER = sys.version_info >= (3, 12)


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """This node's side of every connection (the same for all of them)."""

    node_id: str
    name: str
    software_version: str
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    request_timeout: float = 30.0
    keepalive_interval: float = 15.0  # 0 turns pings off
    # Queued notifications plus running request handlers above which the connection
    # stops reading, which pushes back on a peer that sends faster than we handle.
    inbound_backlog: int = 128
    # The first frame (the Hello) is small: a peer not yet introduced gets nothing big.
    hello_limit: int = 16 * 1024
    # A peer that leaves this much of our replies unread is dropped (slow_reader): it
    # pings or asks and never reads, and the replies would pile up in our memory.
    slow_reader_limit: int = 2 * WRITE_HIGH_WATER
    # A frame that has been arriving for this long is cut off (frame_timeout): its
    # buffer counts against the inbound budget every connection shares.
    frame_timeout: float = 120.0
    protocol_version: int = PROTOCOL_VERSION
    features: tuple[str, ...] = FEATURES


@dataclass(frozen=True, slots=True)
class ConnectionHooks:
    """What a connection needs from the pool that owns it."""

    requests: Mapping[str, RequestHandler]
    notifies: Mapping[str, NotifyHandler]
    counters: Counters
    budget: InboundBudget  # bytes of inbound frames all connections may hold together
    kept: Callable[[str], Connection | None]  # the pool's connection to a node id
    closing: Callable[[Connection], None]  # stop handing this connection out
    lost: Callable[[Connection], None]  # the connection is gone


class Connection(asyncio.BufferedProtocol):
    """One authenticated connection to a peer; usable in both directions."""

    def __init__(self, settings: ConnectionSettings, hooks: ConnectionHooks, *, outbound: bool,
                 remote_address: Any, expect_node_id: str | None = None) -> None:
        self._settings = settings
        self._hooks = hooks
        self._counters = hooks.counters
        self._expect_node_id = expect_node_id
        self._loop = asyncio.get_running_loop()
        self.outbound = outbound
        self.remote_address = remote_address
        self.peer: PeerIdentity | None = None
        self.hello: Hello | None = None
        self._tr: asyncio.Transport | None = None
        self._inbound = Inbound(settings.max_frame_size, settings.hello_limit, hooks.budget)
        self._budget_blocked = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._hello_fut: asyncio.Future[Hello] = self._loop.create_future()
        self._closed = asyncio.Event()
        self._close_reason = "closed"
        self._failed = False
        self._deferred_error: tuple[str, str] | None = None  # failed before TLS handed us the transport
        self._retired = False
        self._out = Outbound(settings.max_frame_size, settings.slow_reader_limit, hooks.counters)
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

    @property
    def close_reason(self) -> str:
        return self._close_reason

    # A per-call timeout is part of the API (callers know their deadline).
    async def request(self, method: str, body: Any = None, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Send a request and wait for its response body; RemoteError if the peer failed it."""
        if self._retired:
            replacement = self._hooks.kept(self.node_id)
            if replacement is not None and replacement is not self and not replacement.closed:
                return await replacement.request(method, body, timeout)
        self._check_open()
        limit = self._settings.request_timeout if timeout is None else timeout
        if self._out.paused:  # the peer is not reading: wait for room before adding more
            try:
                async with asyncio.timeout(limit):
                    await self._drain()
            except TimeoutError:
                self._counters.inc("request_timeouts")
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
            self._out.write(Request(rid, method, body))
            self._counters.inc("requests_sent")
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(rid, None)
            self._maybe_finish_retire()

    def _expire(self, fut: asyncio.Future[Any], method: str, limit: float) -> None:
        if not fut.done():
            self._counters.inc("request_timeouts")
            fut.set_exception(RequestTimeout(
                f"request {method!r} to node {self.node_id[:12]} got no answer within {limit} s"
            ))

    async def notify(self, topic: str, body: Any = None) -> None:
        """Send a one-way message; waits while the peer is not keeping up (drain).

        Large arrays in ``body`` are handed to TLS without a copy: do not modify
        them before this call returns.
        """
        self._check_open()
        self._out.write(Notify(topic, body))
        self._counters.inc("notifies_sent")
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

    async def wait_hello(self, timeout: float) -> Hello:  # noqa: ASYNC109
        """The peer's accepted Hello; HandshakeError if it is refused or does not come."""
        try:
            async with asyncio.timeout(timeout):
                return await self._hello_fut
        except TimeoutError:
            self._protocol_failure("hello_timeout", f"no hello within {timeout} s")
            raise HandshakeError(
                f"node at {format_address(self.remote_address)} sent no hello within {timeout} s"
            ) from None

    def start_keepalive(self) -> None:
        if self._settings.keepalive_interval > 0 and self._keepalive_task is None:
            self._keepalive_task = self._loop.create_task(self._keepalive())

    def retire(self) -> None:
        """A duplicate of a kept connection: close it once nothing is in flight on it."""
        self._retired = True
        self._maybe_finish_retire()

    def __repr__(self) -> str:
        who = self.peer.node_id[:12] if self.peer else "?"
        return f"<Connection {who} {format_address(self.remote_address)} {'out' if self.outbound else 'in'}>"

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called by the TLS transport once its handshake is done.
        self.attach(transport)  # type: ignore[arg-type]

    def attach(self, transport: asyncio.Transport) -> None:
        """TLS is up: learn who the peer is, say hello, deliver what already arrived."""
        if self._tr is not None:
            return
        self._tr = transport
        self._out.attach(transport)
        if self._deferred_error is not None or self.closed:
            if self._deferred_error is not None:
                with contextlib.suppress(Exception):
                    self._out.write(Error(*self._deferred_error))
            transport.close()
            return
        self.last_received = self._loop.time()
        try:
            self.peer = peer_identity(transport.get_extra_info("ssl_object"))
        except IdentityError as exc:
            self._protocol_failure("bad_certificate", str(exc))
            return
        s = self._settings
        self._out.write(Hello(s.protocol_version, s.node_id, s.name, s.software_version, s.features))
        self._deliver()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._inbound.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._counters.inc("bytes_received", nbytes)
        # Any bytes count as a sign of life, so a long frame does not look like silence.
        self.last_received = now = self._loop.time()
        if self._failed:
            return
        try:
            self._inbound.received(nbytes, now)
        except ProtocolError as exc:
            self._protocol_failure(exc.code, exc.message)
            return
        if self._tr is not None:  # frames that arrive with the TLS handshake wait for attach()
            self._deliver()
        if not self._budget_blocked and self._inbound.over_budget:
            self._counters.inc("budget_pauses")
            self._budget_blocked = True
            self._hooks.budget.when_available(self._budget_available)
            self._update_reading()

    def _budget_available(self) -> None:
        if self._inbound.over_budget and not self.closed:
            self._hooks.budget.when_available(self._budget_available)  # not yet our turn
            return
        self._budget_blocked = False
        self._update_reading()

    def eof_received(self) -> bool | None:
        if not self._failed:
            self._inbound.ended()
            if self._tr is not None:
                self._deliver()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self._out.pause()

    def resume_writing(self) -> None:
        self._out.resume()

    # ------------------------------------------------------------------ receiving

    def _deliver(self) -> None:
        try:
            for frame in self._inbound.frames():
                self._on_frame(frame)
                if self._failed:
                    return
        except ProtocolError as exc:
            self._protocol_failure(exc.code, exc.message)

    def _on_frame(self, frame: bytes | bytearray) -> None:
        self._counters.inc("frames_received")
        try:
            msg = decode_message(frame, max_size=self._settings.max_frame_size)
        except UnknownMessageType as exc:
            # Maybe a newer peer: answer, but keep the connection.
            log.info("unknown_message_type", peer=self.peer.node_id if self.peer else None, type=exc.type_name)
            self._reply(Error(exc.code, exc.message, exc.request_id))
            return
        except ProtocolError as exc:
            self._protocol_failure(exc.code, exc.message)
            return
        if self.hello is None:
            self._on_first_message(msg)
        elif isinstance(msg, Request):
            self._counters.inc("requests_received")
            self._running_handlers += 1
            self._update_reading()
            self._spawn(self._serve_request(msg))
        elif isinstance(msg, Response):
            fut = self._pending.get(msg.request_id)
            if fut is not None and not fut.done():
                fut.set_result(msg.body)
        elif isinstance(msg, Notify):
            self._counters.inc("notifies_received")
            self._notify_queue.append(msg)
            if self._notify_task is None or self._notify_task.done():
                self._notify_task = self._spawn(self._run_notifies())
            self._update_reading()
        elif isinstance(msg, Error):
            if msg.request_id is not None:
                fut = self._pending.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_exception(RemoteError(clip(msg.code), clip(msg.message)))
            else:
                log.warning("peer_reported_error", peer=self.node_id, code=clip(msg.code), error=clip(msg.message))
                self.last_peer_error = RemoteError(clip(msg.code), clip(msg.message))
        elif isinstance(msg, Ping):
            self._reply(Pong(msg.nonce))
        elif isinstance(msg, Hello):
            self._protocol_failure("unexpected_hello", "hello sent twice on one connection")
        elif not isinstance(msg, Pong):
            self._reply(Error("unhandled_message", f"this node does not handle {type(msg).TYPE!r} messages"))

    def _on_first_message(self, msg: Message) -> None:
        # Checked here, synchronously, so that a request the peer sends right
        # after its hello (in the same read) already finds the hello accepted.
        fut = self._hello_fut
        if isinstance(msg, Hello):
            assert self.peer is not None
            s = self._settings
            rejection = check_hello(
                msg, certified_id=self.peer.node_id, own_id=s.node_id,
                expected_id=self._expect_node_id, version=s.protocol_version,
            )
            if rejection is None:
                self.hello = msg
                if not fut.done():
                    fut.set_result(msg)
                return
            error_type = ProtocolVersionMismatch if rejection.version_mismatch else HandshakeError
            if not fut.done():
                fut.set_exception(
                    error_type(f"node at {format_address(self.remote_address)} {rejection.detail}")
                )
            self._protocol_failure(rejection.code, rejection.message)
        elif isinstance(msg, Error):
            error_type = ProtocolVersionMismatch if msg.code == "protocol_version" else HandshakeError
            if not fut.done():
                fut.set_exception(error_type(f"the peer refused the connection: {clip(msg.message)}"))
            self._begin_close(f"peer refused: {clip(msg.message)}")
        else:
            self._protocol_failure("expected_hello", f"the first message must be hello, got {type(msg).TYPE}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        if _EAGER:
            task: asyncio.Task[None] = asyncio.Task(coro, loop=self._loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
            if task.done():
                return None
        else:
            task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _update_reading(self) -> None:
        if self._tr is None or self._tr.is_closing():
            return
        backlog = len(self._notify_queue) + self._running_handlers
        limit = self._settings.inbound_backlog
        if not self._reading_paused and (backlog > limit or self._budget_blocked):
            self._reading_paused = True
            self._tr.pause_reading()
        elif self._reading_paused and backlog <= limit // 2 and not self._budget_blocked:
            self._reading_paused = False
            self._tr.resume_reading()

    async def _serve_request(self, req: Request) -> None:
        # _running_handlers was raised when the request arrived (so back-pressure
        # counts it at once, even before this task first runs).
        handler = self._hooks.requests.get(req.method)
        try:
            if handler is None:
                reply: Message = Error(
                    "unknown_method", f"this node has no handler for method {clip(req.method)!r}",
                    req.request_id,
                )
            else:
                try:
                    reply = Response(req.request_id, await handler(self, req.body))
                except asyncio.CancelledError:
                    raise
                except RequestRefused as exc:
                    reply = Error(exc.code, exc.message, req.request_id)
                except Exception as exc:
                    # The detail stays in our log; the peer learns only that it failed.
                    self._counters.inc("handler_errors")
                    log.warning("request_handler_failed", method=clip(req.method), peer=self.node_id,
                                error=f"{type(exc).__name__}: {exc}")
                    reply = Error("handler_error", "the request failed on the peer (see its log)",
                                  req.request_id)
            # Wait for room first, so replies queue in their handlers, not in our buffer.
            if self._out.paused:
                await self._drain()
            if self._tr is None or self._tr.is_closing():
                return
            try:
                self._out.write(reply)
            except ProtocolError as exc:  # the handler returned something we cannot send
                self._out.write(Error(exc.code, f"the reply could not be sent: {exc.message}", req.request_id))
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
            handler = self._hooks.notifies.get(msg.topic)
            if handler is None:
                log.info("unhandled_notify", topic=clip(msg.topic), peer=self.node_id)
                continue
            try:
                await handler(self, msg.body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._counters.inc("handler_errors")
                log.warning("notify_handler_failed", topic=clip(msg.topic), peer=self.node_id,
                            error=f"{type(exc).__name__}: {exc}")
        self._maybe_finish_retire()

    # ------------------------------------------------------------------ writing

    def _check_open(self) -> None:
        if self.closed or self._tr is None or self._tr.is_closing():
            raise ConnectionClosed(
                f"connection to {format_address(self.remote_address)} is closed ({self._close_reason})"
            )

    def _reply(self, msg: Message) -> None:
        """A reply that cannot wait (Pong, Error); a peer that does not read loses the connection."""
        if self._out.reply(msg):
            return
        self._counters.inc("dropped_peers", reason="slow_reader")
        log.warning("slow_reader", peer=self.peer.node_id if self.peer else None,
                    address=format_address(self.remote_address), unread=self._out.unread)
        self._close_reason = "slow_reader: the peer does not read its replies"
        assert self._tr is not None
        self._tr.abort()

    async def _drain(self) -> None:
        if self._out.paused:
            await self._out.wait_room(lambda: self.closed)
        self._check_open()

    # ------------------------------------------------------------------ lifecycle

    async def _keepalive(self) -> None:
        interval = self._settings.keepalive_interval
        nonce = itertools.count(1)
        while not self.closed:
            await asyncio.sleep(interval)
            if self._inbound.stalled(self._loop.time(), self._settings.frame_timeout):
                self._protocol_failure("frame_timeout", f"a frame took over {self._settings.frame_timeout:g} s")
                return
            idle = self._loop.time() - self.last_received
            if idle >= 2 * interval:
                self._counters.inc("keepalive_timeouts")
                log.warning("keepalive_timeout", peer=self.node_id, address=format_address(self.remote_address),
                            idle_s=round(idle, 3))
                self._begin_close(f"peer silent for {idle:.1f} s (keepalive timeout)")
                return
            if idle >= interval and self._out.open:
                self._out.write(Ping(next(nonce)))

    def _begin_close(self, reason: str) -> None:
        if self.closed:
            return
        if self._close_reason == "closed":
            self._close_reason = reason
        self._hooks.closing(self)  # never hand out a closing connection
        if self._tr is not None and not self._tr.is_closing():
            self._tr.close()
        elif self._tr is None:
            self._on_lost(None)

    def _protocol_failure(self, code: str, message: str) -> None:
        """The peer sent something we cannot accept: tell it why, then close."""
        if self._failed:
            return
        self._failed = True
        self._inbound.close()
        self._counters.inc("protocol_errors", reason=code)
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
                self._out.write(Error(code, message))
        self._begin_close(f"{code}: {message}")

    def _on_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self._inbound.close()
        self._hooks.budget.forget(self._budget_available)
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
        self._out.wake_all()  # _drain() re-checks and raises ConnectionClosed
        current = asyncio.current_task()
        for task in [*self._tasks, self._notify_task, self._keepalive_task]:
            if task is not None and task is not current and not task.done():
                task.cancel()
        self._hooks.lost(self)

    def _maybe_finish_retire(self) -> None:
        if self._retired and not self._pending and not self._running_handlers and not self._notify_queue:
            self._begin_close("duplicate connection to the same peer")
