"""The DHT's public values: its error, directory keys and lookup results.

Also the counter helper the DHT modules share for their metrics dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.records import Record

__all__ = [
    "DIRECTORY_PREFIX",
    "DIRECTORY_SHARDS",
    "DHTError",
    "LookupResult",
    "RecordSet",
    "bump",
    "member_key",
]

DIRECTORY_PREFIX = "members/"
DIRECTORY_SHARDS = "0123456789abcdef"


class DHTError(Exception):
    """A DHT operation could not be carried out (message says why and what to do)."""


def member_key(node_id: str) -> str:
    """Directory key a node publishes its capability record under (16 shards)."""
    return f"{DIRECTORY_PREFIX}{node_id[0]}"


class RecordSet(dict[str, Record]):
    """publisher node id -> record, plus whether some holder had to truncate its answer."""

    truncated: bool = False


@dataclass
class LookupResult:
    records: RecordSet
    truncated: bool = False
    rounds: int = 0
    queried: int = 0
    responded: int = 0
    # Round in which the first record arrived (0: none, or only a local copy).
    first_hit_round: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def bump(metrics: dict[str, int], name: str, amount: int = 1) -> None:
    metrics[name] = metrics.get(name, 0) + amount
