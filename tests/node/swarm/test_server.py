"""The piece server: a request's cost does not grow with the model, and one peer's requests are bounded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import tracemalloc
from pathlib import Path

import pytest

from node.net.errors import RequestRefused
from node.store.models import ModelStore
from node.swarm.server import PieceServer
from node.system.counters import Counters
from protocol.manifest import Manifest, PieceRef, parse_manifest

PIECE = 16 * 1024
ZERO = b"\0" * PIECE
ZERO_HASH = hashlib.sha256(ZERO).hexdigest()


class _Conn:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id


def big_model(store: ModelStore, pieces: int, per_file: int = 1000) -> Manifest:
    """A model of ``pieces`` zero pieces (one stored piece serves them all)."""
    files = [{"path": f"w{f:03d}.safetensors", "size": per_file * PIECE, "pieces": [ZERO_HASH] * per_file,
              "data_start": 8} for f in range(pieces // per_file)]
    doc = {"version": 1, "piece_size": PIECE, "files": files, "tensors": [], "summary": {}}
    manifest = parse_manifest(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    store.add(manifest)
    store.pieces.write(ZERO_HASH, ZERO)
    return manifest


async def test_serving_a_piece_of_a_large_model_builds_nothing_the_size_of_the_model(tmp_path: Path) -> None:
    """A request for one piece of a 35k-piece model built the whole piece list (0.5 s of
    event loop on a busy machine); now it is a lookup, whatever the model's size."""
    store = ModelStore(tmp_path, reserve=0)
    manifest = big_model(store, 35_000)
    server = PieceServer(store, Counters())
    conn = _Conn("a" * 64)
    assert await server._piece(conn, {"id": manifest.model_id, "index": 0}) == ZERO  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        for index in (1, 17_345, 34_999):
            tracemalloc.reset_peak()
            assert await server._piece(conn, {"id": manifest.model_id, "index": index}) == ZERO  # type: ignore[arg-type]
            _, peak = tracemalloc.get_traced_memory()
            assert peak < 256 * 1024, peak  # the piece (16 KiB) and small change; 35k refs are ~3 MB
    finally:
        tracemalloc.stop()


async def test_a_manifest_not_yet_loaded_is_parsed_off_the_loop(tmp_path: Path) -> None:
    manifest = big_model(ModelStore(tmp_path, reserve=0), 2_000)
    store = ModelStore(tmp_path, reserve=0)  # as after a restart: nothing parsed yet
    loop_thread = threading.get_ident()
    parsed_in: list[int] = []
    real = store.manifest

    def manifest_of(model_id: str) -> Manifest:
        parsed_in.append(threading.get_ident())
        return real(model_id)

    store.manifest = manifest_of  # type: ignore[method-assign]
    server = PieceServer(store, Counters())
    assert await server._piece(_Conn("a" * 64), {"id": manifest.model_id, "index": 5}) == ZERO  # type: ignore[arg-type]
    assert parsed_in and loop_thread not in parsed_in
    assert store.loaded(manifest.model_id) is not None


async def test_one_peer_cannot_make_this_node_hold_unbounded_requests(tmp_path: Path) -> None:
    """A peer has ``per_peer`` requests served and ``queued`` waiting; the rest are refused
    at once ("busy": its fetcher rests and asks again), and other peers are still served."""
    store = ModelStore(tmp_path, reserve=0)
    manifest = big_model(store, 1_000)
    release = threading.Event()
    real = store.read_piece

    def slow_read(m: Manifest, piece: PieceRef) -> bytes:
        release.wait(10)
        return real(m, piece)

    store.read_piece = slow_read  # type: ignore[method-assign]
    counters = Counters()
    server = PieceServer(store, counters, per_peer=2, queued=3)
    greedy, other = _Conn("a" * 64), _Conn("b" * 64)

    def ask(conn: _Conn, index: int) -> asyncio.Task[bytes]:
        return asyncio.ensure_future(server._piece(conn, {"id": manifest.model_id, "index": index}))  # type: ignore[arg-type]

    flood = [ask(greedy, i) for i in range(20)]
    await asyncio.sleep(0.1)
    refused = [t for t in flood if t.done()]
    assert len(refused) == 15 and counters.get("refused", "busy") == 15
    for task in refused:
        with pytest.raises(RequestRefused) as info:
            task.result()
        assert info.value.code == "busy" and "ask again later" in info.value.message
    polite = ask(other, 0)
    await asyncio.sleep(0.05)
    assert not polite.done()  # waiting for a read, not refused
    release.set()
    assert all(r == ZERO for r in await asyncio.gather(polite, *(t for t in flood if t not in refused)))
    assert not server._requests and not server._slots  # nothing kept for peers gone quiet
