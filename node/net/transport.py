"""Encrypted, mutually authenticated msgpack streams between nodes: the listener and the pool.

Owns the TCP listener and the pool of connections to peers (one per peer). Every
connection is TLS 1.3 with certificates checked against the cluster CA
(node/net/tls.py); the peer's node id comes from its verified certificate, never
from what it says. One connection (node/net/connection.py) is one peer; this
module listens, dials, runs the TLS handshake, waits for the Hello and keeps the
pool, handing each connection its settings and hooks instead of itself. Encoding,
framing, limits and the Hello decision live in the sans-I/O protocol/ package.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from node.identity import ClusterKeys, NodeKey
from node.net.addresses import PeerAddressRefused, check_peer_address, format_address
from node.net.connection import (
    CLOSE_TIMEOUT,
    Connection,
    ConnectionHooks,
    ConnectionSettings,
    NotifyHandler,
    RequestHandler,
)
from node.net.errors import ConnectFailed, ConnectionClosed, HandshakeError, TransportError
from node.net.limits import FailureSummary, HandshakeGate, InboundBudget, RateLimiter
from node.net.tls import client_ssl_context, server_ssl_context
from node.system.counters import Counters
from protocol.errors import clip
from protocol.framing import DEFAULT_MAX_FRAME_SIZE
from protocol.messages import PROTOCOL_VERSION

__all__ = ["COUNTERS", "Transport", "TransportLimits"]

log = structlog.get_logger(__name__)

# A LAN handshake takes milliseconds; each pending one costs ~94 KiB and a socket.
_HANDSHAKE_TIMEOUT = 4.0


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """How much strangers and members together can make the listener hold."""

    handshakes: int = 64  # TLS + Hello handshakes in progress at once
    handshakes_per_source: int = 8  # ... from one IP address
    connects_per_second: float = 20.0  # new connections per source IP (bursts of twice that)
    connections: int = 512  # established connections in all
    connections_per_peer: int = 4  # ... with one node id
    inbound_budget: int = 256 * 2**20  # bytes of inbound frames not yet delivered, all connections


# Counted from the start (so /metrics shows them at 0); protocol_errors is kept by reason.
COUNTERS = (
    "bytes_sent", "bytes_received", "frames_sent", "frames_received",
    "connections_opened", "connections_closed", "handshake_failures", "hello_failures",
    "refused_addresses", "requests_sent", "requests_received", "request_timeouts",
    "handler_errors", "notifies_sent", "notifies_received", "keepalive_timeouts",
)


class Transport:
    """The node's listener plus its pool of peer connections (one per peer)."""

    def __init__(
        self,
        key: NodeKey,
        cluster: ClusterKeys,
        *,
        name: str,
        software_version: str,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        request_timeout: float = 30.0,
        keepalive_interval: float = 15.0,
        allow_public: bool = False,
        handshake_timeout: float = _HANDSHAKE_TIMEOUT,
        inbound_backlog: int = 128,
        protocol_version: int = PROTOCOL_VERSION,
        limits: TransportLimits = TransportLimits(),
    ) -> None:
        """See ConnectionSettings for the per-connection limits; ``protocol_version``
        is changed only by tests that provoke a mismatch."""
        self.key = key
        self.allow_public = allow_public
        self.handshake_timeout = handshake_timeout
        self.settings = ConnectionSettings(
            node_id=key.node_id, name=name, software_version=software_version,
            max_frame_size=max_frame_size, request_timeout=request_timeout,
            keepalive_interval=keepalive_interval, inbound_backlog=inbound_backlog,
            protocol_version=protocol_version,
        )
        self.limits = limits
        self.counters = Counters(COUNTERS, by_reason=("protocol_errors", "refused_connections"))
        self._gate = HandshakeGate(limits.handshakes, limits.handshakes_per_source)
        self._connect_rate = RateLimiter(limits.connects_per_second, 2 * limits.connects_per_second)
        self._failures = FailureSummary()
        self.connections: dict[str, Connection] = {}
        self.port: int | None = None
        self._server_ctx = server_ssl_context(cluster, key)
        self._client_ctx = client_ssl_context(cluster, key)
        self._listen_sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._request_handlers: dict[str, RequestHandler] = {}
        self._notify_handlers: dict[str, NotifyHandler] = {}
        self._hooks = ConnectionHooks(
            requests=self._request_handlers, notifies=self._notify_handlers,
            counters=self.counters, budget=InboundBudget(limits.inbound_budget), kept=self.connections.get,
            closing=self._unlist, lost=self._forget,
        )
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
            source = str(peername[0])
            try:
                check_peer_address(source, self.allow_public)
            except PeerAddressRefused as exc:
                self.counters.inc("refused_addresses")
                self._log_failure(source, str(exc))
                sock.close()
                continue
            # Cheapest checks first; a refused socket is closed before any TLS work.
            if not self._connect_rate.allow(source, loop.time()):
                refused = "rate"
            elif len(self._all) + self._gate.pending >= self.limits.connections:
                refused = "connections"
            elif not self._gate.enter(source):
                refused = "handshakes"
            else:
                self._track(self._serve_inbound(sock, peername, source))
                continue
            self.counters.inc("refused_connections", reason=refused)
            self._log_failure(source, f"refused ({refused} limit)")
            sock.close()

    def _log_failure(self, source: str, reason: str) -> None:
        # One line per source and minute, however many attempts: a scan cannot fill the log.
        report = self._failures.record(source, reason, asyncio.get_running_loop().time())
        if report is not None:
            log.warning("peer_connection_failed", peer=source, failures=report[0], last_error=report[1])

    def _track(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_inbound(self, sock: socket.socket, peername: Any, source: str) -> None:
        try:
            await self._establish(sock, peername, server_side=True, expect_node_id=None)
        except (HandshakeError, ConnectionClosed):
            pass  # already counted and logged in _establish
        except Exception as exc:  # never let one bad peer disturb the listener
            self._log_failure(source, f"{type(exc).__name__}: {exc}")
            sock.close()
        finally:
            self._gate.leave(source)

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
                        self.counters.inc("refused_addresses")
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
        where = format_address(peername)
        conn = Connection(
            self.settings, self._hooks, outbound=not server_side, remote_address=peername,
            expect_node_id=expect_node_id,
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if server_side:
                tls, _ = await loop.connect_accepted_socket(
                    lambda: conn, sock, ssl=self._server_ctx,
                    ssl_handshake_timeout=self.handshake_timeout, ssl_shutdown_timeout=CLOSE_TIMEOUT,
                )
            else:
                tls, _ = await loop.create_connection(
                    lambda: conn, sock=sock, ssl=self._client_ctx, server_hostname="",
                    ssl_handshake_timeout=self.handshake_timeout, ssl_shutdown_timeout=CLOSE_TIMEOUT,
                )
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            sock.close()
            self.counters.inc("handshake_failures")
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if server_side:
                self._log_failure(str(peername[0]), f"TLS handshake: {reason}")
            raise HandshakeError(
                f"TLS handshake with {where} failed ({reason}); the peer is not a member of this "
                "cluster (different cluster secret?) or not an enjambre node"
            ) from None
        self._all.add(conn)
        conn.attach(tls)
        try:
            await conn.wait_hello(self.handshake_timeout)
        except (HandshakeError, ConnectionClosed) as exc:
            self.counters.inc("hello_failures")
            if server_side:
                self._log_failure(str(peername[0]), f"hello: {exc}")
            await conn.close(str(exc))
            raise
        same_peer = sum(1 for c in self._all if c.peer is not None and c.peer.node_id == conn.node_id)
        if same_peer > self.limits.connections_per_peer:
            self.counters.inc("refused_connections", reason="per_peer")
            await conn.close(f"more than {self.limits.connections_per_peer} connections from one node")
            raise HandshakeError(f"{where}: too many connections with node {conn.node_id[:12]}")
        self.counters.inc("connections_opened")
        log.info("peer_connected", peer=conn.node_id, name=clip(conn.hello.name) if conn.hello else "",
                 address=where, direction="out" if conn.outbound else "in")
        kept = self._register(conn)
        conn.start_keepalive()
        return kept

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
        drop.retire()
        return keep

    def _forget(self, conn: Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self.counters.inc("connections_closed")
        self._unlist(conn)

    def _unlist(self, conn: Connection) -> None:
        if conn.peer is not None and self.connections.get(conn.peer.node_id) is conn:
            del self.connections[conn.peer.node_id]
            log.info("peer_disconnected", peer=conn.peer.node_id, reason=conn.close_reason)
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
