"""The errors the peer transport raises (node/net/transport.py, node/net/connection.py).

One hierarchy under TransportError, so callers can catch everything the
transport raises at once; the subclasses also derive from the builtin error a
caller would expect (ConnectionError, TimeoutError).
"""

from __future__ import annotations

__all__ = [
    "ConnectFailed",
    "ConnectionClosed",
    "HandshakeError",
    "ProtocolVersionMismatch",
    "RemoteError",
    "RequestRefused",
    "RequestTimeout",
    "TransportError",
]


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


class RequestRefused(TransportError):
    """Raised by a request handler to answer with this code and message.

    Any other exception in a handler reaches the peer only as a generic
    ``handler_error`` (its text could reveal this node's internals); this one is
    meant for the peer: a refusal it can act on ("layer range not loaded").
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
