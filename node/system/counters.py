"""Counters: the one way a part of the node (transport, DHT, beacon) counts what happens.

A part owns a ``Counters`` and calls ``inc``; it never knows about Prometheus.
``node/system/metrics.py`` reads every part's counters at scrape time and exposes
``enjambre_<part>_<name>_total``, with a ``reason`` label for the counts kept by
reason (datagrams dropped, records rejected, connections refused). Counts only go up.

The reasons a peer can make us count are always names from our own code, never
strings a peer sent, so the label set stays small and bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["Counters"]


class Counters:
    """Monotonic counts by name, optionally split by reason."""

    __slots__ = ("_plain", "_reasons")

    def __init__(self, names: Iterable[str] = (), *, by_reason: Iterable[str] = ()) -> None:
        # Names given up front are exposed before they first happen (plain ones at 0,
        # counts by reason as an empty family), so a dashboard shows "0 failures"
        # rather than "no data".
        self._plain: dict[str, int] = dict.fromkeys(names, 0)
        self._reasons: dict[str, dict[str, int]] = {name: {} for name in by_reason}

    def inc(self, name: str, amount: int = 1, *, reason: str | None = None) -> None:
        if reason is None:
            self._plain[name] = self._plain.get(name, 0) + amount
            return
        by_reason = self._reasons.setdefault(name, {})
        by_reason[reason] = by_reason.get(reason, 0) + amount

    def get(self, name: str, reason: str | None = None) -> int:
        """The count for ``name`` (and ``reason``); 0 if it never happened."""
        if reason is None:
            if name in self._plain:
                return self._plain[name]
            return sum(self._reasons.get(name, {}).values())
        return self._reasons.get(name, {}).get(reason, 0)

    def __getitem__(self, name: str) -> int:
        return self.get(name)

    def plain(self) -> Iterator[tuple[str, int]]:
        """(name, count) of the counts kept without a reason."""
        yield from list(self._plain.items())

    def by_reason(self) -> Iterator[tuple[str, dict[str, int]]]:
        """(name, {reason: count}) of the counts kept by reason."""
        for name, reasons in list(self._reasons.items()):
            yield name, dict(reasons)

    def as_dict(self) -> dict[str, int]:
        """Flat view for logs and JSON: ``name`` and ``name.reason`` keys."""
        out = dict(self._plain)
        for name, reasons in self._reasons.items():
            for reason, count in reasons.items():
                out[f"{name}.{reason}"] = count
        return out
