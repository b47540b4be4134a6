"""Serving manifests and pieces to peers over the transport, within upload limits.

Two request methods: ``swarm.manifest`` (a model id -> the manifest's bytes, which
the asker checks against the id) and ``swarm.piece`` (a model id and a piece
index -> the piece's bytes, read and verified here first: a piece damaged on disk
is never sent). A request for a model this node does not know, a piece index
outside the model, or a piece it does not hold is refused with a code, and
nothing is read. Pieces leave at most ``max_upload_rate`` bytes per second in all
(0: unlimited) and ``per_peer`` at a time to one peer, so serving weights leaves
room on the link for inference traffic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from node.net.connection import Connection
from node.net.errors import RequestRefused
from node.net.transport import Transport
from node.store.models import ModelStore
from node.store.pieces import CorruptPiece, StoreError
from node.system.counters import Counters

__all__ = ["PieceServer", "UploadLimiter"]


class UploadLimiter:
    """A token bucket of bytes per second shared by every upload (0 = unlimited)."""

    def __init__(self, rate: int, *, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # first come, first served
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class PieceServer:
    def __init__(
        self, store: ModelStore, counters: Counters, *, max_upload_rate: int = 0, per_peer: int = 4,
        on_corrupt: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_corrupt(model id, piece)``: a stored piece was found damaged (and deleted)."""
        self.store = store
        self.on_corrupt = on_corrupt
        self.counters = counters
        self.limiter = UploadLimiter(max_upload_rate)
        self.per_peer = per_peer
        self._slots: dict[str, asyncio.Semaphore] = {}

    def register(self, transport: Transport) -> None:
        transport.on_request("swarm.manifest", self._manifest)
        transport.on_request("swarm.piece", self._piece)

    def _model(self, body: Any) -> str:
        model_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(model_id, str) or len(model_id) != 64:
            raise RequestRefused("bad_request", "a swarm request names a model by its 64-hex-digit id")
        return model_id

    async def _manifest(self, conn: Connection, body: Any) -> bytes:
        model_id = self._model(body)
        try:
            manifest = self.store.manifest(model_id)
        except StoreError:
            self.counters.inc("refused", reason="unknown_model")
            raise RequestRefused("unknown_model", f"model {model_id[:12]} is not on this node") from None
        self.counters.inc("manifests_served")
        return manifest.encoded

    async def _piece(self, conn: Connection, body: Any) -> bytes:
        model_id = self._model(body)
        index = body.get("index")
        try:
            manifest = self.store.manifest(model_id)
        except StoreError:
            self.counters.inc("refused", reason="unknown_model")
            raise RequestRefused("unknown_model", f"model {model_id[:12]} is not on this node") from None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < manifest.num_pieces:
            self.counters.inc("refused", reason="no_such_piece")
            raise RequestRefused("no_such_piece", f"model {model_id[:12]} has no piece {str(index)[:20]}")
        piece = manifest.pieces[index]
        if not self.store.has_piece(manifest, piece):
            self.counters.inc("refused", reason="not_held")
            raise RequestRefused("not_held", f"this node does not hold piece {index} of {model_id[:12]}")
        if len(self._slots) > 1024:  # one per peer: forget the idle ones
            self._slots = {p: s for p, s in self._slots.items() if s.locked()}
        slots = self._slots.setdefault(conn.node_id, asyncio.Semaphore(self.per_peer))
        async with slots:
            try:
                # Reading and hashing 4 MiB takes milliseconds: off the loop.
                data = await asyncio.to_thread(self.store.read_piece, manifest, piece)
            except CorruptPiece:
                self.counters.inc("refused", reason="corrupt_on_disk")
                if self.on_corrupt is not None:
                    self.on_corrupt(model_id, index)
                raise RequestRefused("not_held", f"piece {index} of {model_id[:12]} was damaged here") from None
            except StoreError as exc:
                self.counters.inc("refused", reason="unreadable")
                raise RequestRefused("not_held", str(exc)) from None
            await self.limiter.take(len(data))
        self.counters.inc("pieces_served")
        self.counters.inc("bytes_served", len(data))
        return data
