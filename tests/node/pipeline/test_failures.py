"""Failure marks are hints that expire: a node that timed out once is planned again later,
and at once when it answers."""

from __future__ import annotations

from node.pipeline.failures import MAX_MARKS, FailureMarks


def test_marks_expire_and_clear() -> None:
    now = [0.0]
    marks = FailureMarks(ttl=30.0, clock=lambda: now[0])
    marks.mark("a")
    marks.mark("b")
    assert marks.active() == {"a", "b"} and "a" in marks
    now[0] = 10.0
    marks.clear("a")  # it answered a probe
    assert marks.active() == {"b"}
    now[0] = 29.9
    assert "b" in marks
    now[0] = 30.0
    assert marks.active() == set()


def test_marks_are_bounded() -> None:
    now = [0.0]
    marks = FailureMarks(clock=lambda: now[0])
    for i in range(MAX_MARKS + 10):
        now[0] = i * 1e-3
        marks.mark(f"n{i}")
    active = marks.active()
    assert len(active) == MAX_MARKS and "n0" not in active and f"n{MAX_MARKS + 9}" in active
