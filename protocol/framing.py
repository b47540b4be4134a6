"""Length-prefixed frames and an incremental, sans-I/O frame decoder.

A frame is a 4-byte big-endian payload length followed by the payload (one
encoded message). The decoder follows h11's shape: bytes go in
(:meth:`FrameDecoder.receive_data`, or :meth:`~FrameDecoder.get_buffer` /
:meth:`~FrameDecoder.buffer_updated` for asyncio's BufferedProtocol), whole
frames come out of :meth:`~FrameDecoder.next_frame`.

The length is checked against ``max_frame_size`` as soon as the 4 header
bytes are in, before any payload is buffered, so a header announcing 4 GiB is
refused at once; ``first_frame_limit`` holds the first frame (the Hello) to a
smaller size, so a peer that is not even introduced cannot ask for much. A large
frame's buffer grows by doubling as its bytes arrive, never ahead of them (a
header announcing 64 MiB costs nothing until 64 MiB are sent), and the socket
layer reads straight into it.
"""

from __future__ import annotations

import struct
from collections import deque

from protocol.errors import FrameTooLarge, ProtocolError, TruncatedFrame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "FrameDecoder",
    "encode_frame",
    "frame_header",
]

HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 64 * 2**20
_HEADER = struct.Struct(">I")
_MAX_LENGTH = 2**32 - 1
# Frames at least this large get their own buffer that the socket fills
# directly; smaller ones are cut out of the shared receive buffer.
_DIRECT_FRAME = 64 * 1024
_SCRATCH_SIZE = 256 * 1024
# A large frame's buffer starts at this size and doubles as it fills.
_DIRECT_START = 256 * 1024


def frame_header(payload_size: int) -> bytes:
    """The 4-byte header for a payload of ``payload_size`` bytes.

    Send it followed by the payload buffers (``writelines``) to avoid joining a
    large payload into one new bytes object.
    """
    if not 0 <= payload_size <= _MAX_LENGTH:
        raise FrameTooLarge(payload_size, _MAX_LENGTH)
    return _HEADER.pack(payload_size)


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """Header plus payload as one bytes object (fine for small payloads)."""
    return frame_header(memoryview(payload).nbytes) + payload


class FrameDecoder:
    """Splits a byte stream into frames; never buffers more than one frame's worth.

    After an error the decoder stays failed: every later call re-raises it.
    """

    def __init__(
        self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, *, first_frame_limit: int | None = None
    ) -> None:
        if not 0 < max_frame_size <= _MAX_LENGTH:
            raise ValueError(f"max_frame_size must be in 1..{_MAX_LENGTH}")
        self.max_frame_size = max_frame_size
        self._first_limit = first_frame_limit
        self._buf = bytearray()  # bytes not yet cut into frames
        self._frames: deque[bytes | bytearray] = deque()
        self._direct: bytearray | None = None  # a large frame being filled in place
        self._direct_size = 0  # the frame's announced size (the buffer grows up to it)
        self._direct_filled = 0
        self._scratch: bytearray | None = None
        self._error: ProtocolError | None = None
        self._eof = False

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the stream; ``b""`` means end of stream (like h11)."""
        self._check()
        view = memoryview(data).cast("B")
        if not view.nbytes:
            self._eof = True
            return
        if self._eof:
            raise ProtocolError("data received after the end of the stream")
        while self._direct is not None and view.nbytes:
            room = self._direct_room()
            take = min(view.nbytes, len(room))
            room[:take] = view[:take]
            room.release()
            self._advance_direct(take)
            view = view[take:]
        if not view.nbytes:
            return
        self._buf += view
        self._parse()


    def feed_eof(self) -> None:
        """Mark the end of the stream; a partial frame then raises TruncatedFrame."""
        self._eof = True

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer for the next bytes (asyncio BufferedProtocol style)."""
        self._check()
        if self._direct is not None:
            return self._direct_room()
        if self._scratch is None:
            self._scratch = bytearray(_SCRATCH_SIZE)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written into the buffer from :meth:`get_buffer`."""
        self._check()
        if self._direct is not None:
            self._advance_direct(nbytes)
        elif nbytes:
            assert self._scratch is not None, "buffer_updated() without get_buffer()"
            if self._buf:
                self._buf += memoryview(self._scratch)[:nbytes]
                self._parse()
            else:
                # Common case: cut frames straight out of the scratch buffer.
                with memoryview(self._scratch) as view:
                    used = self._cut(view, nbytes)
                    if used < nbytes and self._direct is None:
                        self._buf += view[used:nbytes]

    # ------------------------------------------------------------------ output

    def next_frame(self) -> bytes | bytearray | None:
        """The next complete frame's payload, or None if more data is needed.

        Raises TruncatedFrame once the stream has ended inside a frame.
        """
        if self._frames:
            return self._frames.popleft()
        self._check()
        if self._eof and (self._buf or self._direct is not None):
            self._error = TruncatedFrame(
                f"the stream ended inside a frame ({self.buffered_bytes} bytes of it received)"
            )
            raise self._error
        return None

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> bytes | bytearray:
        frame = self.next_frame()
        if frame is None:
            raise StopIteration
        return frame

    @property
    def buffered_bytes(self) -> int:
        """Bytes held that do not form a complete frame yet."""
        return len(self._buf) + self._direct_filled

    @property
    def allocated_bytes(self) -> int:
        """Memory held for incomplete and undelivered frames (for budgets)."""
        direct = len(self._direct) if self._direct is not None else 0
        return len(self._buf) + direct + sum(len(f) for f in self._frames)

    # ------------------------------------------------------------------ internals

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _direct_room(self) -> memoryview:
        """The unfilled part of the large frame's buffer, grown (doubled) when full."""
        assert self._direct is not None
        if self._direct_filled == len(self._direct):
            grown = bytearray(min(self._direct_size, 2 * len(self._direct)))
            grown[: self._direct_filled] = self._direct
            self._direct = grown
        return memoryview(self._direct)[self._direct_filled :]

    def _advance_direct(self, nbytes: int) -> None:
        assert self._direct is not None
        self._direct_filled += nbytes
        if self._direct_filled == self._direct_size:
            self._frames.append(self._direct)
            self._direct = None
            self._direct_filled = self._direct_size = 0

    def _parse(self) -> None:
        with memoryview(self._buf) as view:
            pos = self._cut(view, len(self._buf))
        if pos:
            del self._buf[:pos]

    def _cut(self, buf: memoryview, end: int) -> int:
        """Move the complete frames in ``buf[:end]`` to the output; returns bytes consumed.

        A large incomplete frame at the end moves into its own buffer (all of
        ``end`` consumed); a small one stays (its bytes not consumed).
        """
        pos = 0
        while end - pos >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buf, pos)
            limit = self.max_frame_size if self._first_limit is None else self._first_limit
            if size > limit:
                what = "first frame (the hello)" if self._first_limit is not None else "frame"
                self._error = FrameTooLarge(size, limit, what)
                raise self._error
            self._first_limit = None
            start = pos + HEADER_SIZE
            if end - start >= size:
                self._frames.append(bytes(buf[start : start + size]))
                pos = start + size
            elif size >= _DIRECT_FRAME:
                # The frame's own buffer holds what arrived, with room to grow.
                have = end - start
                self._direct = bytearray(min(size, max(_DIRECT_START, 2 * have)))
                self._direct[:have] = buf[start:end]
                self._direct_size = size
                self._direct_filled = have
                pos = end
                break
            else:
                break
        return pos
