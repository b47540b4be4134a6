"""A cluster name keeps the model this node first saw it stand for; two claims that this
node cannot settle are shown as a conflict, never resolved to the newest record."""

from __future__ import annotations

import pytest

from node.swarm.names import NameBook, NameConflict

A, B, C = "a" * 64, "b" * 64, "c" * 64


def test_a_name_keeps_the_model_first_seen_under_it() -> None:
    book = NameBook()
    assert book.choose("tiny:latest", {}) is None
    assert book.choose("tiny:latest", {A: {"n1", "n2"}}) == A
    assert book.choose("tiny:latest", {A: {"n1"}, B: {"mallory"}}) == A  # the insider's claim loses
    assert book.choose("tiny:latest", {B: {"n3"}}) == B  # the old model's name went away: the new one stands


def test_two_claims_nobody_here_knew_are_a_conflict_naming_both() -> None:
    with pytest.raises(NameConflict) as info:
        NameBook().choose("tiny:latest", {A: {"n1"}, B: {"mallory"}})
    text = str(info.value)
    assert "2 different models" in text and A[:12] in text and B[:12] in text and "digest" in text


def test_the_book_is_bounded() -> None:
    book = NameBook(limit=3)
    for i, m in enumerate((A, B, C, A)):
        book.choose(f"m{i}:latest", {m: {"n"}})
    assert book.first("m0:latest") is None and book.first("m3:latest") == A
