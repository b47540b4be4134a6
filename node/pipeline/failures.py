"""Nodes a driver saw fail, and for how long that counts.

A mark is a hint for the next plan, not a verdict: a node that timed out once on a busy
machine is healthy a moment later. Marks expire after ``ttl`` seconds, and a node that
answers again (a lease renewed, a probe answered) is cleared at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["FAILURE_TTL", "FailureMarks"]

FAILURE_TTL = 30.0
MAX_MARKS = 256


class FailureMarks:
    def __init__(self, ttl: float = FAILURE_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._marks: dict[str, float] = {}

    def mark(self, node_id: str) -> None:
        self._marks[node_id] = self._clock()
        if len(self._marks) > MAX_MARKS:  # the oldest marks go first
            for old in sorted(self._marks, key=self._marks.__getitem__)[: len(self._marks) - MAX_MARKS]:
                del self._marks[old]

    def clear(self, node_id: str) -> None:
        self._marks.pop(node_id, None)

    def active(self) -> set[str]:
        now = self._clock()
        for node_id in [n for n, at in self._marks.items() if now - at >= self.ttl]:
            del self._marks[node_id]
        return set(self._marks)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.active()
