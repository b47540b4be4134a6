"""node/swarm/peerbook.py: bans for wrong pieces, rests for failures, both expiring and bounded."""

from __future__ import annotations

from node.swarm.peerbook import PeerBook


def test_a_wrong_piece_bans_for_ten_minutes_and_an_answer_does_not_lift_it() -> None:
    book = PeerBook()
    book.corrupt("liar", now=100.0)
    book.answered("liar", now=101.0)
    assert book.banned("liar", 699.0) and book.banned_peers(699.0) == {"liar"}
    assert not book.banned("liar", 701.0) and not book.banned("other", 101.0)


def test_failures_rest_longer_each_time_up_to_a_cap_and_never_ban() -> None:
    """A busy machine times out again and again: it rests (1, 2, 4... up to 15 s) and is
    on probation, never banned; one good answer clears it."""
    book = PeerBook(rest=1.0, max_rest=15.0)
    rests = []
    for i in range(8):
        book.failed("busy", now=float(i * 100))
        rests.append(next(r for r in range(1, 100) if not book.resting("busy", i * 100 + r)))
    assert rests == [1, 2, 4, 8, 15, 15, 15, 15]
    assert book.on_probation("busy", 800.0) and not book.banned("busy", 800.0) and not book.trusted("busy", 800.0)
    book.answered("busy", now=800.0)
    assert not book.on_probation("busy", 801.0) and book.trusted("busy", 801.0) and book.failures("busy") == 0


def test_memories_expire() -> None:
    book = PeerBook(memory=600.0)
    for _ in range(5):
        book.failed("gone", now=0.0)
    assert book.on_probation("gone", 599.0) and not book.on_probation("gone", 601.0)
    book.failed("gone", now=700.0)  # long after: a first failure again, a short rest
    assert book.failures("gone") == 1 and not book.resting("gone", 701.5)
    book.answered("good", now=0.0)
    assert book.trusted("good", 599.0) and not book.trusted("good", 601.0)


def test_the_book_is_bounded_forgetting_the_expired_then_the_oldest() -> None:
    book = PeerBook(max_peers=3, memory=10.0)
    book.failed("old", now=0.0)
    book.corrupt("liar", now=5.0)
    book.failed("a", now=6.0)
    book.failed("b", now=12.0)  # "old" has expired: it goes first
    assert len(book) == 3 and not book.on_probation("old", 12.0) and book.banned("liar", 12.0)
    book.failed("c", now=13.0)  # nothing expired: the oldest entry goes ("liar")
    assert len(book) == 3 and book.banned_peers(13.0) == set()
    assert all(book.on_probation(p, 13.0) for p in "abc")
