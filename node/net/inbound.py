"""The read side of one connection: frames cut out of decrypted bytes, within a memory budget.

``Inbound`` owns the frame decoder a connection reads into (TLS decrypts straight
into its buffers) and charges what it holds to the transport's shared
``InboundBudget``: a frame's buffer grows only as its bytes arrive, and when all
connections together hold more than the budget, only the one with the oldest
unfinished frame keeps reading; the others stop until there is room. Before the Hello, the first
frame may be at most ``hello_limit`` bytes. After a protocol error it keeps
handing out one small scratch buffer, so TLS can be read (and dropped) to its end.
"""

from __future__ import annotations

from collections.abc import Iterator

from node.net.limits import InboundBudget
from protocol.framing import FrameDecoder

__all__ = ["Inbound"]

_DISCARD = 64 * 1024


class Inbound:
    def __init__(self, max_frame_size: int, hello_limit: int, budget: InboundBudget) -> None:
        self._decoder = FrameDecoder(max_frame_size, first_frame_limit=hello_limit)
        self._budget = budget
        self._held = 0
        self._partial_since: float | None = None
        self._discard: bytearray | None = None
        self.discarding = False

    def get_buffer(self) -> memoryview:
        if self.discarding:
            if self._discard is None:
                self._discard = bytearray(_DISCARD)
            return memoryview(self._discard)
        return self._decoder.get_buffer()

    def received(self, nbytes: int, now: float) -> None:
        """``nbytes`` landed in the last buffer; raises ProtocolError on bad framing."""
        if not self.discarding:
            self._decoder.buffer_updated(nbytes)
            self._account()
            if not self._decoder.buffered_bytes:
                self._partial_since = None
            elif self._partial_since is None:
                self._partial_since = now

    def stalled(self, now: float, limit: float) -> bool:
        """True when a frame has been arriving for longer than ``limit`` seconds."""
        return self._partial_since is not None and now - self._partial_since > limit

    def ended(self) -> None:
        if not self.discarding:
            self._decoder.feed_eof()

    def frames(self) -> Iterator[bytes | bytearray]:
        """Complete frames in arrival order (raises TruncatedFrame after a cut-off end)."""
        try:
            yield from self._decoder
        finally:
            self._account()

    @property
    def over_budget(self) -> bool:
        """True when this connection should stop reading for now (see InboundBudget)."""
        return not self._budget.may_read(self)

    def close(self) -> None:
        """Give back everything this connection held (it is gone)."""
        self.discarding = True
        self._held = 0
        self._budget.hold(self, 0)

    def _account(self) -> None:
        held = 0 if self.discarding else self._decoder.allocated_bytes
        if held != self._held:  # the usual small frame: nothing held before or after
            self._held = held
            self._budget.hold(self, held)
