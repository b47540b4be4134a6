"""Fetching a model's pieces from every peer that has them, verifying each, resuming after a crash.

The fetcher knows what is wanted (every piece, or those of a layer range), asks
the holders' bitfields in the DHT, and keeps up to ``per_peer`` requests in flight
to each holder, choosing pieces with the pure ``picker.pick``. Each piece is
verified against its hash as it is stored (the store refuses bytes that do not
match): a peer that sends a wrong piece is banned for this download, and the piece
is asked of someone else. A peer that fails (gone, timed out: a busy machine is
slow, not lost) rests for a while, longer after each failure in a row, and is asked
again; the fetch gives up only when nothing has arrived for ``idle_timeout``
seconds, saying what it was waiting for. Pieces already in the store are never
fetched again, so a fetch that was killed resumes where it stopped. Each stored
piece is reported (``on_piece``) so the node can serve it and say so at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from node.store.models import ModelStore
from node.store.pieces import CorruptPiece, DiskFull, StoreError
from node.swarm.picker import pick
from node.system.counters import Counters
from protocol.manifest import Manifest

__all__ = ["FetchError", "FetchProgress", "PieceFetcher"]

log = structlog.get_logger("enjambre.swarm")

# (peer node id, request body) -> the piece's bytes; raises on failure.
AskPiece = Callable[[str, dict[str, object]], Awaitable[bytes]]
Holders = Callable[[], Awaitable[dict[str, set[int]]]]


class FetchError(StoreError):
    """The wanted pieces could not all be fetched (the message says why)."""


@dataclass
class FetchProgress:
    total_bytes: int
    done_bytes: int = 0
    pieces_left: int = 0
    peers: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.done_bytes / max(time.monotonic() - self.started, 1e-3)


class PieceFetcher:
    def __init__(
        self,
        store: ModelStore,
        manifest: Manifest,
        *,
        ask: AskPiece,
        holders: Holders,
        counters: Counters,
        on_piece: Callable[[int], None] | None = None,
        per_peer: int = 4,
        rest: float = 1.0,
        max_rest: float = 15.0,
        idle_timeout: float = 120.0,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.ask = ask
        self.holders = holders
        self.counters = counters
        self.on_piece = on_piece
        self.per_peer = per_peer
        self.rest = rest
        self.max_rest = max_rest
        self.idle_timeout = idle_timeout
        self.rng = rng or random.Random()
        self.banned: set[str] = set()
        self._failures: dict[str, int] = {}
        self._resting: dict[str, float] = {}

    async def run(self, wanted: set[int], progress: Callable[[FetchProgress], None] | None = None) -> None:
        pieces = self.manifest.pieces
        missing = set(wanted) - self.store.held(self.manifest)
        state = FetchProgress(sum(pieces[i].length for i in missing), pieces_left=len(missing))
        in_flight: dict[int, set[str]] = {}
        tasks: dict[asyncio.Task[None], tuple[int, str]] = {}
        holders: dict[str, set[int]] = {}
        refreshed = -1e9
        idle_since = time.monotonic()
        try:
            while missing:
                now = time.monotonic()
                if now - refreshed > 1.0 or not holders:
                    holders = await self.holders()
                    refreshed = now
                usable = {p: h for p, h in holders.items() if self._resting.get(p, 0) <= now}
                for a in pick(missing, usable, in_flight, per_peer=self.per_peer, banned=self.banned, rng=self.rng):
                    task = asyncio.ensure_future(self._fetch_one(a.peer, a.piece))
                    tasks[task] = (a.piece, a.peer)
                    in_flight.setdefault(a.piece, set()).add(a.peer)
                if not tasks:
                    if time.monotonic() - idle_since > self.idle_timeout:
                        raise FetchError(self._stuck(missing, holders))
                    await asyncio.sleep(0.5)
                    refreshed = -1e9
                    continue
                done, _ = await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    piece, peer = tasks.pop(task)
                    in_flight.get(piece, set()).discard(peer)
                    if not in_flight.get(piece):
                        in_flight.pop(piece, None)
                    if self._settle(task, piece, peer, missing):
                        idle_since = time.monotonic()
                        state.done_bytes += pieces[piece].length
                        state.pieces_left = len(missing)
                        state.peers.add(peer)
                        for other, (p, _) in list(tasks.items()):  # endgame duplicates: first answer wins
                            if p == piece:
                                other.cancel()
                        if progress is not None:
                            progress(state)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_one(self, peer: str, piece: int) -> None:
        """Ask ``peer`` for a piece and store it; hashing and the disk write run off the loop,
        so they overlap with the other requests in flight."""
        data = await self.ask(peer, {"id": self.manifest.model_id, "index": piece})
        await asyncio.to_thread(self.store.write_piece, self.manifest.pieces[piece], data)

    def _settle(self, task: asyncio.Task[None], piece: int, peer: str, missing: set[int]) -> bool:
        """Account for a finished request; True if it brought a new piece."""
        if task.cancelled():
            return False
        exc = task.exception()
        if isinstance(exc, CorruptPiece):
            self.banned.add(peer)
            self.counters.inc("bad_pieces")
            log.warning("peer sent a wrong piece; banned for this download", peer=peer[:12], piece=piece,
                        model=self.manifest.model_id[:12])
            return False
        if isinstance(exc, DiskFull):
            raise FetchError(str(exc)) from None
        if exc is not None:
            self._failed(peer, exc)
            return False
        if piece not in missing:
            return False  # another holder's copy came first
        missing.discard(piece)
        self._failures.pop(peer, None)
        self.counters.inc("pieces_fetched")
        self.counters.inc("bytes_fetched", self.manifest.pieces[piece].length)
        if self.on_piece is not None:
            self.on_piece(piece)
        return True

    def _failed(self, peer: str, exc: BaseException) -> None:
        self.counters.inc("fetch_failures")
        count = self._failures[peer] = self._failures.get(peer, 0) + 1
        self._resting[peer] = time.monotonic() + min(self.max_rest, self.rest * 2 ** (count - 1))
        log.info("piece request failed", peer=peer[:12], failures=count, error=f"{type(exc).__name__}: {exc}")

    def _stuck(self, missing: set[int], holders: dict[str, set[int]]) -> str:
        reachable = [p for p in holders if p not in self.banned]
        return (
            f"{len(missing)} pieces of model {self.manifest.model_id[:12]} could not be fetched for "
            f"{self.idle_timeout:.0f} s ({len(holders)} holders known, {len(self.banned)} banned for wrong "
            f"pieces, {len(reachable)} asked again and again); start a node that holds the model, "
            "or import it again"
        )
