"""Encrypted, mutually authenticated msgpack streams between nodes (asyncio adapter).

Owns the TCP listener and the pool of connections to peers (one per peer).
Every connection is TLS 1.3 with certificates checked against the cluster CA
(node/identity.py); the peer's node id comes from its verified certificate,
never from what it says. On top of TLS it speaks protocol/: length-prefixed
frames carrying typed messages. The transport only moves bytes and dispatches;
encoding, framing and limits live in the sans-I/O protocol/ package.

The pieces: this module listens, dials, runs the TLS and Hello handshakes and
keeps the pool; a Connection is one peer (node/connection_core.py sends and
closes, node/connection.py dispatches what arrives, node/peer_protocol.py is
the read path under TLS); node/transport_errors.py holds the errors.
Everything callers use is importable from here.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from node.identity import (
    ClusterKeys,
    NodeKey,
    client_ssl_context,
    server_ssl_context,
)
from node.net.addresses import PeerAddressRefused, check_peer_address
from node.net.connection import Connection, MessageHandler, NotifyHandler, RequestHandler
from node.net.connection_core import CLOSE_TIMEOUT, FEATURES, ConnectionCore, format_address
from node.net.errors import (
    ConnectFailed,
    ConnectionClosed,
    HandshakeError,
    ProtocolVersionMismatch,
    RemoteError,
    RequestTimeout,
    TransportError,
)
from node.net.peer_protocol import PeerProtocol
from protocol.messages import PROTOCOL_VERSION, Hello, Message

__all__ = [
    "FEATURES",
    "ConnectFailed",
    "Connection",
    "ConnectionClosed",
    "HandshakeError",
    "MessageHandler",
    "NotifyHandler",
    "PeerAddressRefused",
    "ProtocolVersionMismatch",
    "RemoteError",
    "RequestHandler",
    "RequestTimeout",
    "Transport",
    "TransportError",
    "TransportStats",
]

log = structlog.get_logger(__name__)

_HANDSHAKE_TIMEOUT = 10.0


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
                log.warning("peer_address_refused", address=format_address(peername), error=str(exc))
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
            log.warning("inbound_connection_failed", peer=format_address(peername),
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
        where = format_address(peername)
        conn = Connection(
            self, outbound=not server_side, remote_address=peername, expect_node_id=expect_node_id
        )
        protocol = PeerProtocol(conn, self.max_frame_size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if server_side:
                tls, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=self._server_ctx,
                    ssl_handshake_timeout=self.handshake_timeout, ssl_shutdown_timeout=CLOSE_TIMEOUT,
                )
            else:
                tls, _ = await loop.create_connection(
                    lambda: protocol, sock=sock, ssl=self._client_ctx, server_hostname="",
                    ssl_handshake_timeout=self.handshake_timeout, ssl_shutdown_timeout=CLOSE_TIMEOUT,
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
        where = format_address(conn.remote_address)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await conn._hello_fut
        except TimeoutError:
            conn._protocol_failure("hello_timeout", f"no hello within {self.handshake_timeout} s")
            raise HandshakeError(f"node at {where} sent no hello within {self.handshake_timeout} s") from None

    def _check_hello(self, conn: Connection, hello: Hello) -> tuple[str, str, HandshakeError] | None:
        """Why the peer's hello is unacceptable (code, message for it, error for us), or None."""
        where = format_address(conn.remote_address)
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

    def _forget(self, conn: ConnectionCore) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self.stats.connections_closed += 1
        self._unlist(conn)

    def _unlist(self, conn: ConnectionCore) -> None:
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
