"""The cluster directory: every member's capability record, published in and read from the DHT.

A node publishes its record under ``members/<first hex digit of its id>``: a record
may be at most ~7.5 KB (one datagram), so the directory is sharded, and reading it
means looking up the 16 shards at once. ``member_record`` builds this node's record
(``memory_used``: what its loaded layers hold, comparable with ``memory_allowed``;
``rss``: the daemon process's resident memory; ``loop_lag_ms``: how late its event
loop runs, the median of the last 10 s),
``member_problem`` checks one read from the DHT (any member with the secret can
publish anything, so a record of the wrong shape is skipped and counted rather
than trusted), and ``status_view`` turns the valid records into what ``nodectl
status`` shows (a pure function of the records and the time).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import Any

from node.cluster.claims import capped, doubtful
from node.cluster.rtt import rtt_problem
from node.cluster.speed import Speeds
from node.dht.node import DHTNode
from node.dht.routing import RecordSet

__all__ = [
    "DIRECTORY_PREFIX",
    "DIRECTORY_SHARDS",
    "RecentMembers",
    "member_key",
    "member_problem",
    "member_record",
    "publish_member",
    "read_members",
    "status_view",
]

DIRECTORY_PREFIX = "members/"
DIRECTORY_SHARDS = "0123456789abcdef"


def member_key(node_id: str) -> str:
    """Directory key a node publishes its capability record under (16 shards)."""
    return f"{DIRECTORY_PREFIX}{node_id[0]}"


async def publish_member(dht: DHTNode, value: Any, *, ttl: float) -> None:
    """Publish this node's capability record in the cluster directory."""
    await dht.put(member_key(dht.node_id), value, ttl=ttl)


async def read_members(dht: DHTNode) -> RecordSet:
    """All directory records, read from the 16 shards concurrently."""
    results = await asyncio.gather(*(dht.get(f"{DIRECTORY_PREFIX}{s}") for s in DIRECTORY_SHARDS))
    merged = RecordSet()
    for shard in results:
        merged.update(shard)
        merged.truncated = merged.truncated or shard.truncated
    return merged


def member_record(
    capabilities: Mapping[str, Any],
    *,
    node_id: str,
    name: str,
    version: str,
    protocol: int,
    address: str,
    peer_port: int,
    dht_port: int,
    state: str,
    memory_free: int,
    started_at: float,
    rss: int | None = None,
    clock_offset_s: float | None = None,
    serving: list[dict[str, Any]] | None = None,
    rtt_ms: Mapping[str, float] | None = None,
    loop_lag_ms: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """This node's capability record as published in the directory."""
    now = time.time() if now is None else now
    serving = list(serving or [])[:MAX_SERVING]
    return {
        **capabilities,
        "id": node_id,
        "name": name,
        "version": version,
        "protocol": protocol,
        "addresses": [address],
        "peer_port": peer_port,
        "dht_port": dht_port,
        "state": state,
        "memory_free": memory_free,
        "memory_used": sum(int(entry.get("memory", 0)) for entry in serving),
        "rss": rss,
        "uptime_s": round(now - started_at, 1),
        "clock_offset_s": None if clock_offset_s is None else round(clock_offset_s, 1),
        "serving": serving,
        "rtt_ms": dict(rtt_ms or {}),
        "loop_lag_ms": None if loop_lag_ms is None else round(loop_lag_ms, 1),
        "ts": now,
    }


STATES = frozenset({"joining", "ready", "busy", "leaving"})
MAX_SERVING = 16  # models whose layers one node serves, as its record lists them
MAX_LOOP_LAG_MS = 60_000.0
_TEXT = {"name": 64, "device": 128, "version": 32, "os": 32, "platform": 256, "arch": 32,
         "cpu_model": 128, "device_kind": 16, "jax_version": 32}
_COUNTS = ("peer_port", "dht_port", "protocol", "cpu_count", "device_count", "memory_total",
           "memory_available", "memory_allowed", "memory_free", "memory_used", "tflops_matmul_size")
_OPTIONAL_COUNTS = ("device_memory_total", "device_memory_available", "rss")  # rss: absent from older records
_NUMBERS = ("ts", "tflops", "uptime_s")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def member_problem(publisher: str, value: Any) -> str | None:
    """Why a directory record cannot be used (a short metric label), or None if it can."""
    if not isinstance(value, dict):
        return "not_a_map"
    if value.get("id") != publisher:
        return "wrong_id"
    for key, limit in _TEXT.items():
        text = value.get(key)
        if key in ("name", "version") and not isinstance(text, str):
            return f"bad_{key}"
        if text is not None and (not isinstance(text, str) or len(text) > limit or not text.isprintable()):
            return f"bad_{key}"
    addresses = value.get("addresses")
    if (not isinstance(addresses, list) or not 1 <= len(addresses) <= 8
            or not all(isinstance(a, str) and 0 < len(a) <= 64 and a.isprintable() for a in addresses)):
        return "bad_addresses"
    if value.get("state") not in STATES:
        return "bad_state"
    for key in _COUNTS:
        count = value.get(key)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return f"bad_{key}"
    if not 0 < value["peer_port"] < 65536 or not 0 < value["dht_port"] < 65536:
        return "bad_port"
    for key in _OPTIONAL_COUNTS:
        count = value.get(key)
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            return f"bad_{key}"
    for key in _NUMBERS:
        if not _number(value.get(key)):
            return f"bad_{key}"
    offset = value.get("clock_offset_s")
    if offset is not None and not _number(offset):
        return "bad_clock_offset_s"
    lag = value.get("loop_lag_ms")  # absent from records of older versions
    if lag is not None and (not _number(lag) or not 0 <= lag <= MAX_LOOP_LAG_MS):
        return "bad_loop_lag_ms"
    return _serving_problem(value.get("serving")) or rtt_problem(value.get("rtt_ms"))


def _serving_problem(serving: Any) -> str | None:
    """The layers a node serves: [{model, name, start, end, epoch, sessions, memory}]
    (absent in records of older versions; memory: bytes the stage holds)."""
    if serving is None:
        return None
    if not isinstance(serving, list) or len(serving) > MAX_SERVING:
        return "bad_serving"
    for entry in serving:
        if not isinstance(entry, dict):
            return "bad_serving"
        model, name = entry.get("model"), entry.get("name")
        if not isinstance(model, str) or len(model) != 64 or not all(c in "0123456789abcdef" for c in model):
            return "bad_serving"
        if not isinstance(name, str) or len(name) > 128 or not name.isprintable():
            return "bad_serving"
        for key in ("start", "end", "epoch", "sessions", "memory"):
            count = entry.get(key, 0 if key == "memory" else None)  # memory: absent from older records
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                return "bad_serving"
        if entry["start"] >= entry["end"]:
            return "bad_serving"
    return None


class RecentMembers:
    """Members seen in a recent read, kept for ``grace`` seconds when a read misses them: a
    DHT read over a lossy link can come back without a shard's answer, and a member that
    blinks out of one read must not vanish from pins, plans and status (a node that leaves
    says so: its "leaving" record ends it at once). Bounded (``limit`` members)."""

    def __init__(self, grace: float, *, limit: int = 4096, clock: Any = time.monotonic) -> None:
        self.grace = grace
        self.limit = limit
        self._clock = clock
        self._seen: dict[str, tuple[float, dict[str, Any]]] = {}

    def merge(self, found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        now = self._clock()
        for pid, value in found.items():
            self._seen.pop(pid, None)
            self._seen[pid] = (now, value)
        for pid in [p for p, (at, v) in self._seen.items() if now - at > self.grace or v.get("state") == "leaving"]:
            del self._seen[pid]
        while len(self._seen) > self.limit:
            del self._seen[next(iter(self._seen))]
        out = {pid: value for pid, (_at, value) in self._seen.items()}
        out.update(found)
        return out


def status_view(
    members: Mapping[str, Mapping[str, Any]], *, self_id: str, cluster_id: str, now: float,
    speeds: Speeds | None = None,
) -> dict[str, Any]:
    """The cluster as ``nodectl status`` shows it: this node first, then by name.

    Nodes that announced they are leaving are left out (their record lingers
    until it expires), except this node itself.
    """
    nodes = []
    for node_id, value in members.items():
        if value.get("state") == "leaving" and node_id != self_id:
            continue
        entry = {k: v for k, v in value.items() if k != "ts"}
        entry["id"] = node_id
        entry["last_seen_s"] = round(max(0.0, now - float(value.get("ts", now))), 1)
        entry["self"] = node_id == self_id
        doubts = doubtful(value)
        if speeds is not None and node_id != self_id:  # what this node's probes found (speed.py)
            doubts += speeds.doubts(node_id, capped(value)[1])
            measured = speeds.seen(node_id)
            if measured is not None:
                entry["measured_tflops"] = round(measured, 4)
        if doubts:  # what planners here do not believe (claims.py)
            entry["doubtful"] = doubts
        nodes.append(entry)
    nodes.sort(key=lambda n: (not n["self"], n.get("name", ""), n["id"]))
    return {"self": self_id, "cluster": cluster_id, "nodes": nodes}
