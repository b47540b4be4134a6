"""Which piece to ask which peer for next: a pure function of what everyone holds.

Rarest first (the piece the fewest holders have goes first, so the swarm spreads
every piece before any one is everywhere), random among equals (so ten fetchers
do not all start on the same piece), at most ``per_peer`` requests in flight to
one peer, never a banned peer. What the node remembers of each peer
(node/swarm/peerbook.py) orders the choice: a peer that answered lately is asked
first, one that failed lately (on probation) last and one request at a time. In the
endgame (only a few pieces left, all of them already asked for) a piece may be asked
of a second holder too, so one slow peer cannot hold up the last piece; so may a
piece whose every request is old and unanswered (``overdue``): a holder that never
answers costs a short wait, not a request timeout. Whichever answer comes first wins.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

__all__ = ["Assignment", "pick", "rarest_first"]


@dataclass(frozen=True, slots=True)
class Assignment:
    peer: str
    piece: int


def rarest_first(missing: Set[int], holders: Mapping[str, Set[int]], rng: random.Random | None = None) -> list[int]:
    """The missing pieces someone holds, rarest first, random among equals. O(pieces x
    holders): a fetcher computes it when the holders' bitfields change, off its loop."""
    rng = rng or random.Random()
    rarity = {piece: sum(1 for held in holders.values() if piece in held) for piece in missing}
    # A stable sort of a shuffled list.
    order = [piece for piece, count in rarity.items() if count > 0]
    rng.shuffle(order)
    order.sort(key=rarity.__getitem__)
    return order


def pick(
    missing: Set[int],
    holders: Mapping[str, Set[int]],
    in_flight: Mapping[int, Set[str]],
    *,
    per_peer: int = 4,
    banned: Set[str] = frozenset(),
    probation: Set[str] = frozenset(),
    trusted: Set[str] = frozenset(),
    overdue: Set[int] = frozenset(),
    endgame: int = 4,
    order: Sequence[int] | None = None,
    rng: random.Random | None = None,
) -> list[Assignment]:
    """Requests to start now, given the pieces still missing, each peer's pieces, and the
    requests in flight (piece -> peers asked). A peer on ``probation`` (it failed lately)
    gets one request at a time, and only when no other holder of the piece is free; a
    ``trusted`` one (it answered lately) is chosen before others; a piece in ``overdue``
    (every request for it asked long ago, no answer yet) may be asked of one more holder.
    ``order``: ``rarest_first`` of a moment ago (pieces no longer missing are skipped); with
    it a call costs about the requests it starts times the holders, not the model's size."""
    rng = rng or random.Random()
    busy: dict[str, int] = {}
    for peers in in_flight.values():
        for peer in peers:
            busy[peer] = busy.get(peer, 0) + 1
    usable = {p: held for p, held in holders.items() if p not in banned}
    caps = {p: 1 if p in probation else per_peer for p in usable}
    if all(busy.get(p, 0) >= caps[p] for p in usable):
        return []
    late = len(missing) <= endgame and all(p in in_flight for p in missing)
    if order is None:
        order = rarest_first(missing, usable, rng)
    out: list[Assignment] = []
    open_peers = [p for p in usable if busy.get(p, 0) < caps[p]]  # only these are looked at
    for piece in order:
        asked = in_flight.get(piece)
        # May be asked now: missing, and not asked yet, overdue, or in the endgame asked once.
        if piece not in missing or (asked and piece not in overdue and not (late and len(asked) < 2)):
            continue
        free = [p for p in open_peers if piece in usable[p] and not (asked and p in asked)]
        if not free:
            continue
        rank = {p: (p in probation, p not in trusted, busy.get(p, 0)) for p in free}
        best = min(rank.values())
        peer = rng.choice(sorted(p for p in free if rank[p] == best))
        busy[peer] = busy.get(peer, 0) + 1
        if busy[peer] >= caps[peer]:
            open_peers.remove(peer)
        out.append(Assignment(peer, piece))
        if not open_peers:
            break
    return out
