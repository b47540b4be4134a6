"""Fetching a model's pieces from every peer that has them, verifying each, resuming after a crash.

The fetcher knows what is wanted (every piece, or those of a layer range), asks
the holders' bitfields in the DHT, and keeps up to ``per_peer`` requests in flight
to each holder, choosing pieces with the pure ``picker.pick``. Each piece is
verified against its hash as it is stored (the store refuses bytes that do not
match): a peer that sends a wrong piece is banned, and the piece is asked of
someone else. A peer that fails (gone, timed out: a busy machine is slow, not lost)
rests for a while, longer after each failure in a row, and is asked again, one
request at a time until it answers. Bans and rests are the node's ``PeerBook``
(peerbook.py), shared by every download, so the next download skips a liar at once.
A piece asked ``hedge_after`` seconds ago (2 s, or four times the usual time for a
piece if longer) and still unanswered is asked of one more holder, a trusted one
first: a holder that never answers costs a short wait, not a request timeout. The
fetch gives up only when nothing has arrived for ``idle_timeout`` seconds, saying
what it was waiting for. Pieces already in the store are never fetched again, so a
fetch that was killed resumes where it stopped. Each stored piece is reported
(``on_piece``) so the node can serve it and say so at once.
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
from node.swarm.peerbook import PeerBook
from node.swarm.picker import pick, rarest_first
from node.system.counters import Counters
from protocol.manifest import Manifest

__all__ = ["FetchError", "FetchProgress", "PieceFetcher"]

log = structlog.get_logger("enjambre.swarm")

# (peer node id, request body) -> the piece's bytes; raises on failure.
AskPiece = Callable[[str, dict[str, object]], Awaitable[bytes]]
Holders = Callable[[], Awaitable[dict[str, set[int]]]]


# Seconds a request waits before its piece is asked of another holder too (at least: four
# times the usual time for a piece, if that is longer).
HEDGE_AFTER = 2.0


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
        book: PeerBook | None = None,
        per_peer: int = 4,
        rest: float = 1.0,
        max_rest: float = 15.0,
        hedge_after: float | None = None,
        idle_timeout: float = 120.0,
        rng: random.Random | None = None,
    ) -> None:
        """``book``: the node's (shared by its downloads); without one, this fetch keeps its
        own, resting a failed peer ``rest`` seconds, doubling up to ``max_rest``."""
        self.store = store
        self.manifest = manifest
        self.ask = ask
        self.holders = holders
        self.counters = counters
        self.on_piece = on_piece
        self.book = book if book is not None else PeerBook(rest=rest, max_rest=max_rest)
        self.per_peer = per_peer
        self.hedge_after = HEDGE_AFTER if hedge_after is None else hedge_after
        self.idle_timeout = idle_timeout
        self.rng = rng or random.Random()
        self._piece_time = 0.0  # a moving average of how long a piece takes to arrive
        self._late: set[asyncio.Task[None]] = set()  # requests found unanswered past the hedge time

    @property
    def banned(self) -> set[str]:
        """The peers banned now (of those the book remembers)."""
        return self.book.banned_peers(time.monotonic())

    async def run(self, wanted: set[int], progress: Callable[[FetchProgress], None] | None = None) -> None:
        pieces = self.manifest.pieces
        # Work in proportion to the model (a stat per piece, the rarity of each) runs off the
        # loop: a model may have hundreds of thousands of pieces.
        missing, total = await asyncio.to_thread(self._missing, wanted)
        state = FetchProgress(total, pieces_left=len(missing))
        in_flight: dict[int, set[str]] = {}
        tasks: dict[asyncio.Task[None], tuple[int, str, float]] = {}
        holders: dict[str, set[int]] = {}
        order: list[int] = []
        refreshed, every = -1e9, 1.0
        idle_since = time.monotonic()
        try:
            while missing:
                now = time.monotonic()
                if now - refreshed > every or not holders:
                    holders = await self.holders()
                    order = await asyncio.to_thread(rarest_first, set(missing), holders, self.rng)
                    refreshed = time.monotonic()
                    every = max(1.0, 10 * (refreshed - now))  # a huge model: re-read less often
                book = self.book
                usable = {p: h for p, h in holders.items() if not book.resting(p, now)}
                banned = {p for p in usable if book.banned(p, now)}
                probation = {p for p in usable if book.on_probation(p, now)}
                trusted = {p for p in usable if book.trusted(p, now)}
                for a in pick(missing, usable, in_flight, per_peer=self.per_peer, banned=banned,
                              probation=probation, trusted=trusted, overdue=self._overdue(tasks, now),
                              order=order, rng=self.rng):
                    task = asyncio.ensure_future(self._fetch_one(a.peer, a.piece))
                    tasks[task] = (a.piece, a.peer, now)
                    in_flight.setdefault(a.piece, set()).add(a.peer)
                if not tasks:
                    if time.monotonic() - idle_since > self.idle_timeout:
                        raise FetchError(self._stuck(missing, holders))
                    await asyncio.sleep(0.5)
                    refreshed = -1e9
                    continue
                done, _ = await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    piece, peer, started = tasks.pop(task)
                    in_flight.get(piece, set()).discard(peer)
                    if not in_flight.get(piece):
                        in_flight.pop(piece, None)
                    if self._settle(task, piece, peer, missing, started):
                        idle_since = time.monotonic()
                        state.done_bytes += pieces[piece].length
                        state.pieces_left = len(missing)
                        state.peers.add(peer)
                        for other, (p, _, _) in tasks.items():  # endgame and hedged duplicates
                            if p == piece:
                                other.cancel()
                        if progress is not None:
                            progress(state)
        finally:
            now = time.monotonic()
            for task, (_, peer, started) in tasks.items():
                if not task.done() and (task in self._late or 0 < 4 * self._piece_time < now - started):
                    # It never answered while others did: remembered for the next download.
                    self._failed(peer, TimeoutError(f"no answer in {now - started:.1f} s"))
                task.cancel()
            self._late.clear()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _missing(self, wanted: set[int]) -> tuple[set[int], int]:
        """The wanted pieces not held here, and their bytes."""
        missing = set(wanted) - self.store.held(self.manifest)
        pieces = self.manifest.pieces
        return missing, sum(pieces[i].length for i in missing)

    def _overdue(self, tasks: dict[asyncio.Task[None], tuple[int, str, float]], now: float) -> set[int]:
        """Pieces whose every request was made long enough ago to ask one more holder (each
        such request is noted: if another holder's answer comes first, its peer failed)."""
        latest: dict[int, float] = {}
        wait = self._hedge_wait()
        for task, (piece, _, started) in tasks.items():
            latest[piece] = max(latest.get(piece, started), started)
            if now - started > wait:
                self._late.add(task)
        return {piece for piece, started in latest.items() if now - started > wait}

    def _hedge_wait(self) -> float:
        return max(self.hedge_after, 4 * self._piece_time)

    async def _fetch_one(self, peer: str, piece: int) -> None:
        """Ask ``peer`` for a piece and store it; hashing and the disk write run off the loop,
        so they overlap with the other requests in flight."""
        data = await self.ask(peer, {"id": self.manifest.model_id, "index": piece})
        await asyncio.to_thread(self.store.write_piece, self.manifest.pieces[piece], data)

    def _settle(self, task: asyncio.Task[None], piece: int, peer: str, missing: set[int], started: float) -> bool:
        """Account for a finished request; True if it brought a new piece."""
        late = task in self._late
        self._late.discard(task)
        if task.cancelled():  # another holder's copy came first
            if late:  # a holder that never answers rests, then is on probation
                waited = time.monotonic() - started
                self._failed(peer, TimeoutError(f"no answer in {waited:.1f} s, when another holder's came"))
            return False
        exc = task.exception()
        if isinstance(exc, CorruptPiece):
            self.book.corrupt(peer, time.monotonic())
            self.counters.inc("bad_pieces")
            log.warning("peer sent a wrong piece; banned", peer=peer[:12], piece=piece,
                        model=self.manifest.model_id[:12], minutes=round(self.book.ban / 60))
            return False
        if isinstance(exc, DiskFull):
            raise FetchError(str(exc)) from None
        if exc is not None:
            self._failed(peer, exc)
            return False
        self.book.answered(peer, time.monotonic())
        took = time.monotonic() - started
        self._piece_time = took if self._piece_time == 0.0 else 0.8 * self._piece_time + 0.2 * took
        if piece not in missing:
            return False  # another holder's copy came first
        missing.discard(piece)
        self.counters.inc("pieces_fetched")
        self.counters.inc("bytes_fetched", self.manifest.pieces[piece].length)
        if self.on_piece is not None:
            self.on_piece(piece)
        return True

    def _failed(self, peer: str, exc: BaseException) -> None:
        self.counters.inc("fetch_failures")
        count = self.book.failed(peer, time.monotonic())
        log.info("piece request failed", peer=peer[:12], failures=count, error=f"{type(exc).__name__}: {exc}")

    def _stuck(self, missing: set[int], holders: dict[str, set[int]]) -> str:
        now = time.monotonic()
        banned = [p for p in holders if self.book.banned(p, now)]
        return (
            f"{len(missing)} pieces of model {self.manifest.model_id[:12]} could not be fetched for "
            f"{self.idle_timeout:.0f} s ({len(holders)} holders known, {len(banned)} banned for wrong "
            f"pieces, {len(holders) - len(banned)} asked again and again); start a node that holds the model, "
            "or import it again"
        )
