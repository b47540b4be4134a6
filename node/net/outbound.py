"""The write side of one connection: frames onto TLS, flow control, and the slow-reader rule.

A message goes out as frame header plus the encoder's buffers (large arrays as
views of their own memory) with ``writelines``; frames under 256 KiB are joined
into one buffer first, because each buffer handed to TLS becomes its own record
(and its own AEAD call), which costs more than copying a small payload once.

Above the write buffer's high-water mark the transport pauses us: senders that
can wait (requests, notifications, responses) wait for room *before* writing, so
replies queue in their handlers rather than in memory. Replies that cannot wait
(Pong, Error) are written unless the peer has left ``slow_reader_limit`` bytes
unread, in which case the caller drops the peer: it asks and never reads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from node.system.counters import Counters
from protocol.errors import FrameTooLarge
from protocol.framing import frame_header
from protocol.messages import Message, encode_message_parts

__all__ = ["WRITE_HIGH_WATER", "Outbound"]

WRITE_HIGH_WATER = 4 * 2**20
_JOIN_BELOW = 256 * 1024


class Outbound:
    def __init__(self, max_frame_size: int, slow_reader_limit: int, counters: Counters) -> None:
        self._max_frame_size = max_frame_size
        self._slow_reader_limit = slow_reader_limit
        self._counters = counters
        self._tr: asyncio.Transport | None = None
        self.paused = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def attach(self, transport: asyncio.Transport) -> None:
        self._tr = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    @property
    def open(self) -> bool:
        return self._tr is not None and not self._tr.is_closing()

    @property
    def unread(self) -> int:
        return self._tr.get_write_buffer_size() if self._tr is not None else 0

    def write(self, msg: Message) -> None:
        assert self._tr is not None
        parts = encode_message_parts(msg)
        if len(parts) == 1:  # the usual small message: one bytes object
            size = len(parts[0])
        else:
            size = sum(memoryview(p).nbytes for p in parts)
        if size > self._max_frame_size:
            raise FrameTooLarge(size, self._max_frame_size, f"outgoing {type(msg).__name__} message")
        if size < _JOIN_BELOW:
            self._tr.write(b"".join([frame_header(size), *parts]))
        else:
            self._tr.writelines([frame_header(size), *parts])
        self._counters.inc("bytes_sent", size + 4)
        self._counters.inc("frames_sent")

    def reply(self, msg: Message) -> bool:
        """Write a reply that cannot wait; False (nothing written) for a peer that does not read."""
        if not self.open:
            return True
        if self.unread > self._slow_reader_limit:
            return False
        self.write(msg)
        return True

    async def wait_room(self, closed: Callable[[], bool]) -> None:
        # Every waiter looks again after waking: the first one to write may fill the
        # buffer for the others.
        loop = asyncio.get_running_loop()
        while self.paused and not closed():
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            await fut

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake_all()

    def wake_all(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
