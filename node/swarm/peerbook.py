"""Which holders served this node badly lately, remembered across downloads: bounded, expiring.

Bans used to last one download: a pull is several (a stage load fetches the small
files, then its layers; a repair is one more), so ten fake holders made every one of
them pay again, and a pull that takes 3 s alone took 80. The node keeps one book:

* a holder that sent bytes that do not hash to the piece asked for is **banned** for
  ``ban`` seconds (10 min). Only a liar or a broken node does that: an honest node
  verifies each piece as it reads it and refuses to send a damaged one.
* a holder whose request failed (no answer in time, refused, gone) **rests**, twice as
  long after each failure in a row (``rest`` up to ``max_rest``), and is then **on
  probation** until it answers again or ``memory`` seconds pass: one request at a
  time, and asked only when no better holder is free. Never banned: a busy machine is
  slow, not lying, and serving must hold on one.
* a holder that sent a good piece lately is **trusted**: asked first, and asked for a
  piece another holder is slow with (an unknown holder may be one more that never
  answers).

At most ``max_peers`` entries: the expired are dropped first, then the oldest. Time is
an argument (``now``, monotonic seconds), so tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PeerBook"]

BAN_SECONDS = 600.0
MEMORY_SECONDS = 600.0
MAX_PEERS = 1024


@dataclass(slots=True)
class _Entry:
    banned_until: float = 0.0
    failures: int = 0  # in a row, since it last answered
    rest_until: float = 0.0
    answered_until: float = 0.0  # sent a good piece lately: asked first
    expires: float = 0.0  # the entry is forgotten then


class PeerBook:
    def __init__(self, *, ban: float = BAN_SECONDS, memory: float = MEMORY_SECONDS, rest: float = 1.0,
                 max_rest: float = 15.0, max_peers: int = MAX_PEERS) -> None:
        self.ban, self.memory, self.rest, self.max_rest, self.max_peers = ban, memory, rest, max_rest, max_peers
        self._entries: dict[str, _Entry] = {}  # in order of last change: the oldest first

    def corrupt(self, peer: str, now: float) -> None:
        """``peer`` sent a piece that does not hash to what was asked for: banned."""
        entry = self._touch(peer, now)
        entry.banned_until = now + self.ban
        entry.expires = max(entry.expires, entry.banned_until)

    def failed(self, peer: str, now: float) -> int:
        """A request to ``peer`` failed: it rests (longer each time in a row). Returns the count."""
        entry = self._touch(peer, now)
        entry.failures += 1
        entry.rest_until = now + min(self.max_rest, self.rest * 2 ** min(entry.failures - 1, 30))
        entry.expires = max(entry.expires, now + self.memory)
        return entry.failures

    def answered(self, peer: str, now: float) -> None:
        """``peer`` sent a good piece: its failures are forgotten (a ban is not), and it is
        trusted (asked first, and with a piece another holder is slow with) for a while."""
        entry = self._touch(peer, now)
        entry.failures, entry.rest_until = 0, 0.0
        entry.answered_until = now + self.memory
        entry.expires = max(entry.expires, entry.answered_until)

    def banned(self, peer: str, now: float) -> bool:
        entry = self._entries.get(peer)
        return entry is not None and entry.banned_until > now

    def banned_peers(self, now: float) -> set[str]:
        return {p for p, e in self._entries.items() if e.banned_until > now}

    def resting(self, peer: str, now: float) -> bool:
        entry = self._entries.get(peer)
        return entry is not None and entry.rest_until > now

    def trusted(self, peer: str, now: float) -> bool:
        """Sent a good piece lately and has not failed since."""
        entry = self._entries.get(peer)
        return entry is not None and entry.answered_until > now and entry.failures == 0

    def on_probation(self, peer: str, now: float) -> bool:
        """Failed lately and not answered since (while its entry lasts)."""
        entry = self._entries.get(peer)
        return entry is not None and entry.failures > 0 and entry.expires > now

    def failures(self, peer: str) -> int:
        entry = self._entries.get(peer)
        return 0 if entry is None else entry.failures

    def __len__(self) -> int:
        return len(self._entries)

    def _touch(self, peer: str, now: float) -> _Entry:
        entry = self._entries.pop(peer, None)
        if entry is not None and entry.expires <= now:
            entry = None  # forgotten: a failure now is the first again
        if entry is None:
            if len(self._entries) >= self.max_peers:
                self._entries = {p: e for p, e in self._entries.items() if e.expires > now}
            while len(self._entries) >= self.max_peers:
                del self._entries[next(iter(self._entries))]
            entry = _Entry()
        self._entries[peer] = entry  # moved to the end: the newest
        return entry
