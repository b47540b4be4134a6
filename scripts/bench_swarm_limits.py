#!/usr/bin/env python3
"""Benchmark what a hostile model costs a node: event-loop stalls and a pull's time.

    python scripts/bench_swarm_limits.py [--json] [--pieces 480000] [--serve-pieces 35000]
                                         [--fakes 10] [--timeout 10]

In one process, with a fake DHT and fake peers (no sockets):

1. ``manifest``: a peer answers ``swarm.manifest`` with a manifest of N pieces (32 MiB
   at 480k): the longest event-loop stall while the node receives and checks it, then
   the longest stall while it answers ten ``swarm.piece`` requests for that model, and
   while it publishes what it holds.
2. ``serve``: the event-loop time one ``swarm.piece`` request costs for a model of M
   pieces (the piece held), mean over 50 requests.
3. ``fakes``: a pull in three downloads (small files, then two halves of the layers,
   as a stage load does) of a tiny model from one honest holder and F fake ones (half
   send wrong bytes, half never answer until a ``--timeout`` s request timeout).
JSON keys: manifest_stall_s, manifest_piece_stall_s, manifest_publish_stall_s, serve_loop_ms, pull_s (pull_part1..3_s: each
download), pull_alone_s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.net.errors import RequestRefused
from node.store.importer import import_directory
from node.store.models import ModelStore
from node.swarm.catalog import encode_bits
from node.swarm.layers import pieces_for_layers
from node.swarm.server import PieceServer
from node.swarm.service import ModelService
from node.system.counters import Counters
from node.testing.tinymodel import make_tiny_model

PIECE = 16 * 1024
ZERO = b"\0" * PIECE
ZERO_HASH = hashlib.sha256(ZERO).hexdigest()


class _Record:
    def __init__(self, value: Any) -> None:
        self.value = value


class _Dht:
    node_id = "f" * 64

    def __init__(self) -> None:
        self.records: dict[str, dict[str, _Record]] = {}

    async def get(self, key: str) -> dict[str, _Record]:
        return dict(self.records.get(key, {}))

    async def put(self, key: str, value: Any, *, ttl: float) -> int:
        return 1

    def forget(self, node_id: str) -> None:
        pass


class _Transport:
    def on_request(self, method: str, handler: Any) -> None:
        pass


class _Conn:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id


class LoopWatch:
    """The longest gap between ticks of a task that asks to run every millisecond."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last)
            last = now

    async def measure(self, work: Callable[[], Awaitable[Any]]) -> float:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(0.01)
        self.worst = 0.0
        try:
            await work()
            await asyncio.sleep(0.01)  # the ticker sees the last stall
        finally:
            self._task.cancel()
        return self.worst


def hostile_manifest(pieces: int, per_file: int = 1000) -> bytes:
    """A manifest of ``pieces`` 16 KiB zero pieces in weight files of ``per_file`` pieces
    (with 8-byte headers: within every limit on small files and headers)."""
    files = [{"path": f"w{f:05d}.bin", "size": per_file * PIECE, "pieces": [ZERO_HASH] * per_file,
              "data_start": 8} for f in range(pieces // per_file)]
    doc = {"version": 1, "piece_size": PIECE, "files": files, "tensors": [], "summary": {}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def service_for(root: Path, dht: _Dht) -> ModelService:
    return ModelService(ModelStore(root, reserve=0), dht, _Transport(), lambda: None, Counters(),  # type: ignore[arg-type]
                        piece_size=PIECE, ttl=60)


async def bench_manifest(pieces: int) -> dict[str, float]:
    data = hostile_manifest(pieces)
    model_id = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        dht = _Dht()
        dht.records[f"model/{model_id}"] = {"a" * 64: _Record({})}
        service = service_for(Path(tmp), dht)
        service.store.pieces.write(ZERO_HASH, ZERO)

        async def ask(peer: str, method: str, body: dict[str, object]) -> bytes:
            return data

        service._ask = ask  # type: ignore[method-assign]
        watch = LoopWatch()
        got: list[Any] = []

        async def receive() -> None:
            try:
                got.append(await service.manifest(model_id, deadline=1))
            except Exception as exc:  # refused (a limit): still a measure of the stall
                got.append(exc)

        stall = await watch.measure(receive)

        async def serve() -> None:
            for i in range(10):
                try:
                    await service.server._piece(_Conn("b" * 64), {"id": model_id, "index": i * 997})  # type: ignore[arg-type]
                except RequestRefused:
                    pass

        piece_stall = await watch.measure(serve)
        publish_stall = await watch.measure(service.publish)
    return {"manifest_bytes": len(data), "manifest_stall_s": stall, "manifest_piece_stall_s": piece_stall,
            "manifest_publish_stall_s": publish_stall, "manifest_refused": float(isinstance(got[0], Exception))}


async def bench_serve(pieces: int, requests: int = 50) -> dict[str, float]:
    data = hostile_manifest(pieces)
    with tempfile.TemporaryDirectory() as tmp:
        from protocol.manifest import parse_manifest

        store = ModelStore(Path(tmp), reserve=0)
        manifest = parse_manifest(data)
        store.add(manifest)
        store.pieces.write(ZERO_HASH, ZERO)
        server = PieceServer(store, Counters())
        conn = _Conn("b" * 64)
        spent = 0.0
        for i in range(requests):
            index = (i * 7919) % manifest.num_pieces
            spent += await _loop_time(server._piece(conn, {"id": manifest.model_id, "index": index}))  # type: ignore[arg-type]
    return {"serve_pieces": pieces, "serve_loop_ms": 1000 * spent / requests}


async def _loop_time(coro: Any) -> float:
    """Seconds ``coro`` runs on the event loop (its steps), not counting what it awaits:
    the coroutine is stepped by hand and each future it yields awaited in between."""
    spent, fut = 0.0, None
    while True:
        t0 = time.perf_counter()
        try:
            fut = coro.send(None)
        except StopIteration:
            return spent + time.perf_counter() - t0
        spent += time.perf_counter() - t0
        if fut is not None:
            await asyncio.wait([fut])


async def bench_fakes(fakes: int, silence: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "m", layers=4, hidden=128, intermediate=256, vocab_size=1024)
        seed = ModelStore(root / "seed", reserve=0)
        manifest = import_directory(seed, model, name="m", piece_size=PIECE)
        honest = "0" * 64
        liars = [f"{i + 1:064x}" for i in range(fakes)]
        bits = encode_bits(range(manifest.num_pieces), manifest.num_pieces)

        async def pull(holders: list[str]) -> tuple[float, list[float]]:
            dht = _Dht()
            dht.records[f"model/{manifest.model_id}"] = {h: _Record({"bits": bits, "count": 1}) for h in holders}
            service = service_for(root / f"me{len(holders)}", dht)
            service.store.add(manifest)

            async def ask(peer: str, method: str, body: dict[str, object]) -> bytes:
                index = body["index"]
                assert isinstance(index, int)
                if peer == honest:
                    await asyncio.sleep(0.002)  # a LAN round trip
                    return seed.read_piece(manifest, manifest.pieces[index])
                if int(peer, 16) % 2:
                    return b"\1" * manifest.pieces[index].length
                await asyncio.sleep(silence)
                raise TimeoutError(f"no answer within {silence} s")

            service._ask = ask  # type: ignore[method-assign]
            count = manifest.summary["num_hidden_layers"]
            parts = [pieces_for_layers(manifest, 0, 0, has_embedding=False, has_head=False),
                     pieces_for_layers(manifest, 0, count // 2, has_embedding=True, has_head=False),
                     pieces_for_layers(manifest, count // 2, count, has_embedding=False, has_head=True)]
            times = []
            for wanted in parts:
                t0 = time.perf_counter()
                await service.ensure(manifest, wanted)
                times.append(time.perf_counter() - t0)
            return sum(times), times

        alone, _ = await pull([honest])
        crowded, each = await pull([honest, *liars])
    return {"pull_alone_s": alone, "pull_s": crowded, **{f"pull_part{i + 1}_s": t for i, t in enumerate(each)},
            "fakes": fakes}


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    out.update(await bench_manifest(args.pieces))
    out.update(await bench_serve(args.serve_pieces))
    out.update(await bench_fakes(args.fakes, args.timeout))
    return out


def main() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--pieces", type=int, default=480_000)
    p.add_argument("--serve-pieces", type=int, default=35_000)
    p.add_argument("--fakes", type=int, default=10)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(out))
        return
    for key, value in out.items():
        print(f"{key:28s} {value:12.4f}")


if __name__ == "__main__":
    main()
