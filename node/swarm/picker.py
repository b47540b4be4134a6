"""Which piece to ask which peer for next: a pure function of what everyone holds.

Rarest first (the piece the fewest holders have goes first, so the swarm spreads
every piece before any one is everywhere), random among equals (so ten fetchers
do not all start on the same piece), at most ``per_peer`` requests in flight to
one peer, never a banned peer. In the endgame (only a few pieces left, all of
them already asked for) a piece may be asked of a second holder too, so one slow
peer cannot hold up the last piece; whichever answer comes first wins.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Set
from dataclasses import dataclass

__all__ = ["Assignment", "pick"]


@dataclass(frozen=True, slots=True)
class Assignment:
    peer: str
    piece: int


def pick(
    missing: Set[int],
    holders: Mapping[str, Set[int]],
    in_flight: Mapping[int, Set[str]],
    *,
    per_peer: int = 4,
    banned: Set[str] = frozenset(),
    endgame: int = 4,
    rng: random.Random | None = None,
) -> list[Assignment]:
    """Requests to start now, given the pieces still missing, each peer's pieces, and the
    requests in flight (piece -> peers asked)."""
    rng = rng or random.Random()
    busy: dict[str, int] = {}
    for peers in in_flight.values():
        for peer in peers:
            busy[peer] = busy.get(peer, 0) + 1
    usable = {p: held for p, held in holders.items() if p not in banned}
    rarity = {piece: sum(1 for held in usable.values() if piece in held) for piece in missing}
    # Rarest first, random among equals: a stable sort of a shuffled list.
    order = [piece for piece in missing if rarity[piece] > 0]
    rng.shuffle(order)
    order.sort(key=lambda piece: rarity[piece])
    out: list[Assignment] = []
    late = len([p for p in missing if p not in in_flight]) == 0 and len(missing) <= endgame
    for piece in order:
        asked = in_flight.get(piece, frozenset())
        if asked and not late:
            continue
        if late and len(asked) >= 2:
            continue
        free = [p for p, held in usable.items() if piece in held and p not in asked and busy.get(p, 0) < per_peer]
        if not free:
            continue
        least = min(busy.get(p, 0) for p in free)
        peer = rng.choice(sorted(p for p in free if busy.get(p, 0) == least))
        busy[peer] = busy.get(peer, 0) + 1
        out.append(Assignment(peer, piece))
    return out
