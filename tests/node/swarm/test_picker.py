"""The piece picker and the layer-range rule: pure functions, table-driven."""

from __future__ import annotations

import random

import pytest

from node.swarm.catalog import decode_bits, encode_bits
from node.swarm.picker import Assignment, pick


def test_rarest_first() -> None:
    holders = {"a": {0, 1, 2}, "b": {0, 1}, "c": {0}}
    got = pick({0, 1, 2}, holders, {}, per_peer=1, rng=random.Random(1))
    assert got[0] == Assignment("a", 2)  # only a has piece 2: it goes first
    assert {g.piece for g in got} == {0, 1, 2} and len({g.peer for g in got}) == 3


@pytest.mark.parametrize(
    ("missing", "holders", "in_flight", "banned", "per_peer", "expected"),
    [
        # a peer at its limit gets nothing more
        ({0, 1}, {"a": {0, 1}}, {5: {"a"}}, set(), 1, []),
        # banned peers are never asked
        ({0}, {"a": {0}, "b": {0}}, {}, {"a"}, 4, [Assignment("b", 0)]),
        # a piece nobody holds is not assigned
        ({7}, {"a": {0}}, {}, set(), 4, []),
        # a piece already asked for is not asked again before the endgame
        ({0, 1, 2, 3, 4, 5}, {"a": {0}, "b": {0}}, {0: {"a"}}, set(), 4, []),
        # endgame: everything left is in flight, a second holder is asked too
        ({0}, {"a": {0}, "b": {0}}, {0: {"a"}}, set(), 4, [Assignment("b", 0)]),
        # ...but never a third
        ({0}, {"a": {0}, "b": {0}, "c": {0}}, {0: {"a", "b"}}, set(), 4, []),
    ],
)
def test_table(missing: set[int], holders: dict[str, set[int]], in_flight: dict[int, set[str]],
               banned: set[str], per_peer: int, expected: list[Assignment]) -> None:
    got = pick(missing, holders, in_flight, per_peer=per_peer, banned=banned, rng=random.Random(0))
    if missing == {0, 1, 2, 3, 4, 5}:
        assert all(a.piece != 0 for a in got)
    else:
        assert got == expected


def test_load_is_spread_and_random_among_equals() -> None:
    holders = {p: set(range(40)) for p in "abcd"}
    got = pick(set(range(40)), holders, {}, per_peer=3, rng=random.Random(3))
    assert sorted(a.peer for a in got) == sorted("abcd" * 3)
    other = pick(set(range(40)), holders, {}, per_peer=3, rng=random.Random(4))
    assert {a.piece for a in got} != {a.piece for a in other}


def test_bitfields_round_trip_and_refuse_bombs() -> None:
    held = {0, 3, 8, 1999}
    assert decode_bits(encode_bits(held, 2000), 2000) == held
    assert decode_bits(encode_bits(held, 2000), 3000) is None  # wrong length
    import zlib

    assert decode_bits(zlib.compress(b"\xff" * 10_000_000), 2000) is None  # never inflated past a bitfield
    assert decode_bits(b"garbage", 8) is None and decode_bits("x", 8) is None
