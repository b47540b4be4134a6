"""Serving manifests and pieces to peers over the transport, within upload limits.

Two request methods: ``swarm.manifest`` (a model id -> the manifest's bytes, which
the asker checks against the id) and ``swarm.piece`` (a model id and a piece
index -> the piece's bytes, read and verified here first: a piece damaged on disk
is never sent). A request for a model this node does not know, a piece index
outside the model, or a piece it does not hold is refused with a code, and
nothing is read. Pieces leave at most ``max_upload_rate`` bytes per second in all
(0: unlimited) and ``per_peer`` at a time to one peer, so serving weights leaves
room on the link for inference traffic.

Each request costs the event loop O(1) whatever the model's size: a dict lookup of
the manifest (parsed off the loop the first time), a piece by index, one stat; the
read and the hash run in a thread. One peer may have ``per_peer`` requests served
and ``queued`` more waiting; beyond that it is refused at once with ``busy`` (its
fetcher rests and asks again), so no member can make this node hold an unbounded
backlog of its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from node.net.connection import Connection
from node.net.errors import RequestRefused
from node.net.transport import Transport
from node.store.models import ModelStore
from node.store.pieces import CorruptPiece, StoreError
from node.system.counters import Counters
from protocol.manifest import Manifest

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


# Requests of one peer waiting for a slot, beyond the ``per_peer`` served: a node's
# fetcher keeps 4 in flight to one holder, and a few downloads may run at once (a
# pull, a stage load, a repair).
QUEUED_PER_PEER = 12


class PieceServer:
    def __init__(
        self, store: ModelStore, counters: Counters, *, max_upload_rate: int = 0, per_peer: int = 4,
        queued: int = QUEUED_PER_PEER, on_corrupt: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_corrupt(model id, piece)``: a stored piece was found damaged (and deleted)."""
        self.store = store
        self.on_corrupt = on_corrupt
        self.counters = counters
        self.limiter = UploadLimiter(max_upload_rate)
        self.per_peer = per_peer
        self.queued = queued
        self._slots: dict[str, asyncio.Semaphore] = {}  # per peer with requests here, served or waiting
        self._requests: dict[str, int] = {}

    def register(self, transport: Transport) -> None:
        transport.on_request("swarm.manifest", self._manifest)
        transport.on_request("swarm.piece", self._piece)

    def _model(self, body: Any) -> str:
        model_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(model_id, str) or len(model_id) != 64:
            raise RequestRefused("bad_request", "a swarm request names a model by its 64-hex-digit id")
        return model_id

    async def _known(self, model_id: str) -> Manifest:
        manifest = self.store.loaded(model_id)
        if manifest is not None:
            return manifest
        try:  # the first request after a start reads, hashes and parses it: off the loop
            return await asyncio.to_thread(self.store.manifest, model_id)
        except StoreError:
            self.counters.inc("refused", reason="unknown_model")
            raise RequestRefused("unknown_model", f"model {model_id[:12]} is not on this node") from None

    @contextlib.asynccontextmanager
    async def _admitted(self, peer: str) -> AsyncIterator[asyncio.Semaphore]:
        """Counts one of ``peer``'s requests while it lasts (RequestRefused("busy") past
        ``per_peer + queued`` of them); yields the peer's ``per_peer`` slots for a read."""
        count = self._requests.get(peer, 0)
        if count >= self.per_peer + self.queued:
            self.counters.inc("refused", reason="busy")
            raise RequestRefused("busy", f"this node is already serving {count} requests of yours; ask again later")
        self._requests[peer] = count + 1
        try:
            yield self._slots.setdefault(peer, asyncio.Semaphore(self.per_peer))
        finally:
            left = self._requests[peer] - 1
            if left:
                self._requests[peer] = left
            else:  # nothing kept for a peer with no request here
                del self._requests[peer], self._slots[peer]

    async def _manifest(self, conn: Connection, body: Any) -> bytes:
        model_id = self._model(body)
        async with self._admitted(conn.node_id):
            manifest = await self._known(model_id)
            await self.limiter.take(len(manifest.encoded))
        self.counters.inc("manifests_served")
        return manifest.encoded

    async def _piece(self, conn: Connection, body: Any) -> bytes:
        model_id = self._model(body)
        index = body.get("index")
        async with self._admitted(conn.node_id) as slots:
            manifest = await self._known(model_id)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < manifest.num_pieces:
                self.counters.inc("refused", reason="no_such_piece")
                raise RequestRefused("no_such_piece", f"model {model_id[:12]} has no piece {str(index)[:20]}")
            piece = manifest.pieces[index]
            if not self.store.has_piece(manifest, piece):
                self.counters.inc("refused", reason="not_held")
                raise RequestRefused("not_held", f"this node does not hold piece {index} of {model_id[:12]}")
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
