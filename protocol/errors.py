"""The exceptions protocol/ raises.

Decoders (`codec.unpack`, `messages.decode_message`, `framing.FrameDecoder`)
raise only :class:`ProtocolError` subclasses, whatever bytes they are given, so
the I/O layer can catch one type, answer the peer with an ``Error`` message
carrying :attr:`ProtocolError.code`, and close the connection.
"""

from __future__ import annotations

__all__ = [
    "PEER_TEXT_LIMIT",
    "DecodeError",
    "EncodeError",
    "FrameTooLarge",
    "ProtocolError",
    "TruncatedFrame",
    "UnknownMessageType",
    "clip",
]

# Strings a peer chose (type names, methods, topics, error texts) are cut to this
# many characters before they reach a log line or an Error sent back.
PEER_TEXT_LIMIT = 200


def clip(text: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """A peer-supplied value as printable text of at most ``limit`` characters."""
    value = text if isinstance(text, str) else repr(text)
    value = "".join(ch if ch.isprintable() else "\ufffd" for ch in value[: limit + 1])
    return value if len(value) <= limit else value[: limit - 1] + "…"


class ProtocolError(Exception):
    """Base of every protocol error; ``code`` is a short machine-readable string."""

    code: str = "protocol_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FrameTooLarge(ProtocolError):
    """A frame (or a value inside one) announces more bytes than the limit allows."""

    code = "frame_too_large"

    def __init__(self, size: int, limit: int, what: str = "frame") -> None:
        super().__init__(
            f"{what} of {size} bytes exceeds the limit of {limit} bytes; "
            "split the data into smaller messages or raise the limit on both nodes"
        )
        self.size = size
        self.limit = limit


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame."""

    code = "truncated_frame"


class DecodeError(ProtocolError):
    """Bytes that are not a well-formed value or message of this protocol."""

    code = "decode_error"


class UnknownMessageType(ProtocolError):
    """A well-formed message whose type this node does not know (a newer peer?)."""

    code = "unknown_message_type"

    def __init__(self, type_name: str, request_id: int | None = None) -> None:
        self.type_name = clip(type_name)
        super().__init__(
            f"unknown message type {self.type_name!r}; the peer may run a newer enjambre version"
        )
        self.request_id = request_id


class EncodeError(ProtocolError):
    """A value this protocol cannot carry (raised on the sending side)."""

    code = "encode_error"
