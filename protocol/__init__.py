"""enjambre's wire protocol, sans-I/O: bytes <-> frames <-> typed messages.

Nothing here touches sockets, asyncio or JAX (a test enforces it); the I/O
side is node/transport.py.
"""

from protocol.codec import pack, pack_parts, unpack
from protocol.errors import (
    DecodeError,
    EncodeError,
    FrameTooLarge,
    ProtocolError,
    TruncatedFrame,
    UnknownMessageType,
)
from protocol.framing import FrameDecoder, encode_frame, frame_header
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
    encode_message,
    encode_message_parts,
    message,
)

__all__ = [
    "PROTOCOL_VERSION",
    "DecodeError",
    "EncodeError",
    "Error",
    "FrameDecoder",
    "FrameTooLarge",
    "Hello",
    "Message",
    "Notify",
    "Ping",
    "Pong",
    "ProtocolError",
    "Request",
    "Response",
    "TruncatedFrame",
    "UnknownMessageType",
    "decode_message",
    "encode_frame",
    "encode_message",
    "encode_message_parts",
    "frame_header",
    "message",
    "pack",
    "pack_parts",
    "unpack",
]
