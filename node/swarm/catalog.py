"""What the cluster holds, in the DHT: names, holders' bitfields, and the model catalog.

Three kinds of signed, expiring records (one per publisher under each key, like
the member directory), republished with the node's own:

* ``name/<name:tag>`` -> ``{"id": model id}``: what a name means. Several holders
  publish it; when they disagree the name keeps the model this node first saw it
  stand for, else it is ambiguous (names.py), never "the newest wins".
* ``model/<model id>`` -> ``{"bits": zlib(bitfield), "count": n}``: which pieces
  each holder can serve. A fetcher asks every holder that has a piece.
* ``models/<first hex digit of the id>`` -> ``{"models": [entry, ...]}``: a
  holder's models in that shard, with their names, size and summary, which is
  what ``nodectl list`` and ``/api/tags`` show (16 shards, read at once).

Everything read here came from some member and is checked before use (shapes,
sizes, a bitfield that decompresses to at most the bytes it should).
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from node.dht.node import DHTNode
from node.swarm.names import NameBook
from protocol.manifest import Manifest

__all__ = [
    "decode_bits",
    "encode_bits",
    "model_key",
    "name_key",
    "publish_holdings",
    "read_catalog",
    "read_holders",
    "read_name",
    "resolve_name",
    "shard_key",
]

SHARDS = "0123456789abcdef"
_SUMMARY_FIELDS = ("format", "architecture", "model_type", "parameters", "num_hidden_layers",
                   "torch_dtype", "max_position_embeddings", "quantization")


def name_key(name: str) -> str:
    return f"name/{name}"


def model_key(model_id: str) -> str:
    return f"model/{model_id}"


def shard_key(model_id: str) -> str:
    return f"models/{model_id[0]}"


def encode_bits(held: Iterable[int], count: int) -> bytes:
    bits = bytearray(math.ceil(count / 8))
    for i in held:
        bits[i >> 3] |= 0x80 >> (i & 7)
    return zlib.compress(bytes(bits), 9)


def decode_bits(data: Any, count: int) -> set[int] | None:
    """The piece indices in a holder's bitfield, or None if it is not a valid one."""
    if not isinstance(data, bytes):
        return None
    expected = math.ceil(count / 8)
    try:
        decompressor = zlib.decompressobj()
        bits = decompressor.decompress(data, expected + 1)  # never inflate more than a bitfield
    except zlib.error:
        return None
    if len(bits) != expected or decompressor.unconsumed_tail:
        return None
    return {i for i in range(count) if bits[i >> 3] & (0x80 >> (i & 7))}


def _entry(manifest: Manifest, names: list[str], held: int) -> dict[str, Any]:
    summary = {k: manifest.summary.get(k) for k in _SUMMARY_FIELDS if k in manifest.summary}
    return {"id": manifest.model_id, "names": names[:4], "size": manifest.total_size,
            "pieces": manifest.num_pieces, "held": held, "summary": summary}


async def publish_holdings(
    dht: DHTNode, held: Mapping[str, tuple[Manifest, set[int], list[str]]], *, ttl: float
) -> None:
    """Publish this node's bitfield and names for every model it holds pieces of, and its
    catalog shards. ``held``: model id -> (manifest, pieces held, names)."""
    puts = []
    shards: dict[str, list[dict[str, Any]]] = {}
    for model_id, (manifest, pieces, names) in held.items():
        puts.append(dht.put(model_key(model_id), {"bits": encode_bits(pieces, manifest.num_pieces),
                                                  "count": len(pieces)}, ttl=ttl))
        for name in names:
            puts.append(dht.put(name_key(name), {"id": model_id}, ttl=ttl))
        shards.setdefault(model_id[0], []).append(_entry(manifest, names, len(pieces)))
    for shard, entries in shards.items():
        puts.append(dht.put(f"models/{shard}", {"models": entries[:24]}, ttl=ttl))
    await asyncio.gather(*puts)


async def read_holders(dht: DHTNode, manifest: Manifest) -> dict[str, set[int]]:
    """node id -> pieces it says it holds (invalid records are skipped). The bitfields are
    decoded off the loop: a model may have hundreds of thousands of pieces."""
    records = await dht.get(model_key(manifest.model_id))
    values = {publisher: record.value for publisher, record in records.items()}

    def decode() -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for publisher, value in values.items():
            bits = decode_bits(value.get("bits"), manifest.num_pieces) if isinstance(value, dict) else None
            if bits:
                out[publisher] = bits
        return out

    return await asyncio.to_thread(decode)


async def read_name(dht: DHTNode, name: str) -> dict[str, set[str]]:
    """The models the cluster says ``name`` stands for: model id -> publishers."""
    records = await dht.get(name_key(name))
    claims: dict[str, set[str]] = {}
    for publisher, record in records.items():
        value = record.value
        model_id = value.get("id") if isinstance(value, dict) else None
        if isinstance(model_id, str) and len(model_id) == 64 and all(c in "0123456789abcdef" for c in model_id):
            claims.setdefault(model_id, set()).add(str(publisher))
    return claims


async def resolve_name(dht: DHTNode, name: str, book: NameBook) -> str | None:
    """The model id a name stands for in the cluster (``book`` settles disagreements:
    the model first seen under the name, else NameConflict)."""
    return book.choose(name, await read_name(dht, name))


async def read_catalog(dht: DHTNode) -> dict[str, dict[str, Any]]:
    """model id -> {names, size, pieces, summary, holders: {node id: pieces held}}."""
    shards = await asyncio.gather(*(dht.get(f"models/{s}") for s in SHARDS))
    out: dict[str, dict[str, Any]] = {}
    for records in shards:
        for publisher, record in records.items():
            entries = record.value.get("models") if isinstance(record.value, dict) else None
            for entry in entries if isinstance(entries, list) else []:
                if not _valid_entry(entry):
                    continue
                model = out.setdefault(entry["id"], {"names": set(), "size": entry["size"], "pieces": entry["pieces"],
                                                     "summary": entry["summary"], "holders": {}})
                model["names"].update(entry["names"])
                model["holders"][publisher] = entry["held"]
    for model in out.values():
        model["names"] = sorted(model["names"])
    return out


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    model_id, names = entry.get("id"), entry.get("names")
    counts = [entry.get(k) for k in ("size", "pieces", "held")]
    return (
        isinstance(model_id, str) and len(model_id) == 64 and all(c in "0123456789abcdef" for c in model_id)
        and isinstance(names, list) and all(isinstance(n, str) and len(n) <= 200 and n.isprintable() for n in names)
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        and isinstance(entry.get("summary"), dict)
    )
