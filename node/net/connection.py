"""One authenticated peer connection: ConnectionCore plus the inbound side.

Per connection: both sides send Hello first (protocol versions must match),
then requests (with ids and timeouts), responses, one-way notifications, and
keepalive pings. One connection serves both directions: if A connected to B, B
reuses it for its requests to A. Bad input from a peer (garbage, oversized or
truncated frames, messages of the wrong shape) closes that connection with an
Error frame; the listener (node/transport.py) keeps serving everyone else.

This module dispatches what arrives: frames from the read path
(node/peer_protocol.py) become responses to our requests, calls to the
request, notify and message handlers, or a failed handshake; handlers start
eagerly (node/eager.py), and reading pauses while too many are queued.
Sending and the connection's lifecycle are in node/connection_core.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from node.net.connection_core import CLOSE_TIMEOUT, FEATURES, ConnectionCore, format_address
from node.net.eager import start_eager
from node.net.errors import (
    ConnectionClosed,
    HandshakeError,
    ProtocolVersionMismatch,
    RemoteError,
)
from protocol.errors import ProtocolError, UnknownMessageType
from protocol.messages import (
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

__all__ = [
    "CLOSE_TIMEOUT",
    "FEATURES",
    "Connection",
    "MessageHandler",
    "NotifyHandler",
    "RequestHandler",
    "format_address",
]

RequestHandler = Callable[["Connection", Any], Awaitable[Any]]
NotifyHandler = Callable[["Connection", Any], Awaitable[None]]
MessageHandler = Callable[["Connection", Message], Awaitable[None]]

# The transport's logger: connection events have always been logged under it.
log = structlog.get_logger("node.net.transport")


class Connection(ConnectionCore):
    """One authenticated connection to a peer; usable in both directions."""

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
        task = start_eager(self._loop, coro)
        if task is None:
            return None
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
