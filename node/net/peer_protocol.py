"""The asyncio read path of a peer connection.

PeerProtocol is the BufferedProtocol under TLS: it lets the frame decoder
hand out the buffer TLS decrypts into (large frames land in their final
buffer without a copy), passes whole frames to the Connection, and relays
flow control (pause/resume writing) and connection loss.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder

if TYPE_CHECKING:
    from node.net.connection import Connection

__all__ = ["PeerProtocol"]


class PeerProtocol(asyncio.BufferedProtocol):
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
