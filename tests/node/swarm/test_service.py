"""The model service's checks on what peers send (a manifest must hash to the id asked for and
stay within the limits on small files), its patience (a manifest is asked for again until a
holder answers or a deadline passes), and its memory of holders across downloads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from node.store.importer import import_directory
from node.store.models import ModelStore
from node.swarm import fetcher as fetcher_module
from node.swarm.catalog import encode_bits
from node.swarm.service import ModelService, PullError
from node.system.counters import Counters
from node.testing.tinymodel import make_tiny_model
from protocol.manifest import ManifestFile, build_manifest


class _Transport:
    def on_request(self, method: str, handler: Any) -> None:
        pass


class _Dht:
    node_id = "f" * 64

    def __init__(self, holders: list[str]) -> None:
        self.holders = holders

    async def get(self, key: str) -> dict[str, Any]:
        return dict.fromkeys(self.holders, None)

    def forget(self, node_id: str) -> None:
        pass


async def test_a_manifest_that_is_not_the_model_asked_for_is_rejected(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m", layers=1)
    real = import_directory(ModelStore(tmp_path / "seed", reserve=0), model, name="m", piece_size=16384)
    other = make_tiny_model(tmp_path / "other", layers=1, seed=3)
    forged = import_directory(ModelStore(tmp_path / "x", reserve=0), other, name="x", piece_size=16384)
    counters = Counters()
    service = ModelService(ModelStore(tmp_path / "me", reserve=0), _Dht(["a" * 64, "b" * 64]),  # type: ignore[arg-type]
                           _Transport(), lambda: None, counters, piece_size=16384, ttl=60)  # type: ignore[arg-type]
    answers = {"a" * 64: forged.encoded, "b" * 64: real.encoded}

    async def ask(peer: str, method: str, body: dict[str, object]) -> bytes:
        return answers[peer]

    service._ask = ask  # type: ignore[method-assign]
    got = await service.manifest(real.model_id)
    assert got.model_id == real.model_id and counters["bad_manifests"] == 1  # the liar was skipped
    assert service.store.manifest(real.model_id).model_id == real.model_id  # kept, to serve it on
    answers["b" * 64] = forged.encoded
    service = ModelService(ModelStore(tmp_path / "me2", reserve=0), _Dht(["a" * 64, "b" * 64]),  # type: ignore[arg-type]
                           _Transport(), lambda: None, counters, piece_size=16384, ttl=60)  # type: ignore[arg-type]
    service._ask = ask  # type: ignore[method-assign]
    with pytest.raises(PullError, match="no reachable node holds"):
        await service.manifest(real.model_id, deadline=0.5)


async def test_a_manifest_is_asked_for_until_a_holder_appears_and_answers(tmp_path: Path) -> None:
    """Right after an import on another node no holder record has spread yet, and on a busy
    machine the first answer may time out: neither ends the pull."""
    model = make_tiny_model(tmp_path / "m", layers=1)
    real = import_directory(ModelStore(tmp_path / "seed", reserve=0), model, name="m", piece_size=16384)
    dht = _Dht([])
    service = ModelService(ModelStore(tmp_path / "me", reserve=0), dht, _Transport(),  # type: ignore[arg-type]
                           lambda: None, Counters(), piece_size=16384, ttl=60)  # type: ignore[arg-type]
    calls = {"n": 0}

    async def ask(peer: str, method: str, body: dict[str, object]) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("no answer within 60 s")
        return real.encoded

    service._ask = ask  # type: ignore[method-assign]
    events: list[dict[str, Any]] = []
    task = asyncio.ensure_future(service.manifest(real.model_id, progress=events.append, deadline=30))
    await asyncio.sleep(0.6)
    assert not task.done()
    dht.holders = ["a" * 64]  # the importer's record arrives
    got = await asyncio.wait_for(task, 20)
    assert got.model_id == real.model_id and calls["n"] == 2
    assert any("waiting for a node that holds" in e["status"] for e in events)


class _Record:
    def __init__(self, value: Any) -> None:
        self.value = value


class _HoldersDht(_Dht):
    """Every holder says it holds every piece of ``manifest``."""

    def __init__(self, holders: list[str], manifest: Any) -> None:
        super().__init__(holders)
        self.bits = encode_bits(range(manifest.num_pieces), manifest.num_pieces)

    async def get(self, key: str) -> dict[str, Any]:
        return {h: _Record({"bits": self.bits, "count": 1}) for h in self.holders}


async def test_a_holder_that_lied_or_never_answered_is_skipped_by_the_next_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bans used to last one download: a stage load is several (small files, then layers),
    and ten fake holders made each pay again (a 3 s pull took 80 s). Now the node
    remembers: the next download does not ask the liar, and asks the silent holder at most
    once (it rests, then is on probation)."""
    monkeypatch.setattr(fetcher_module, "HEDGE_AFTER", 0.05, raising=False)
    model = make_tiny_model(tmp_path / "m", layers=2)
    seed = ModelStore(tmp_path / "seed", reserve=0)
    manifest = import_directory(seed, model, name="m", piece_size=16384)
    good, liar, silent = "a" * 64, "b" * 64, "c" * 64
    service = ModelService(ModelStore(tmp_path / "me", reserve=0), _HoldersDht([good, liar, silent], manifest),  # type: ignore[arg-type]
                           _Transport(), lambda: None, Counters(), piece_size=16384, ttl=60)  # type: ignore[arg-type]
    service.store.add(manifest)
    asked: list[str] = []

    async def ask(peer: str, method: str, body: dict[str, Any]) -> bytes:
        asked.append(peer)
        piece = manifest.pieces[body["index"]]
        if peer == liar:
            return b"\0" * piece.length
        if peer == silent:
            await asyncio.sleep(3600)
        return seed.read_piece(manifest, piece)

    service._ask = ask  # type: ignore[method-assign]
    half = manifest.num_pieces * 3 // 4
    await asyncio.wait_for(service.ensure(manifest, set(range(half))), 20)
    assert liar in asked and silent in asked
    asked.clear()
    await asyncio.wait_for(service.ensure(manifest, set(range(half, manifest.num_pieces))), 20)
    assert service.store.held(manifest) == set(range(manifest.num_pieces))
    assert asked.count(liar) == 0 and asked.count(silent) <= 1 and asked.count(good) >= manifest.num_pieces - half


async def test_a_model_over_the_limits_is_refused_before_any_piece_is_fetched(tmp_path: Path) -> None:
    """An insider's model whose config.json is 192 MiB (every node that loads it read it
    whole: +0.5 GiB and seconds of stall) is refused when its manifest arrives, naming the
    file and the cap; nothing is kept and no piece asked for."""
    config = ManifestFile("config.json", 192 * 2**20, ("0" * 64,) * 3)
    weights = ManifestFile("model.safetensors", 2**30, ("1" * 64,) * 16, data_start=1024)
    hostile = build_manifest([config, weights], [], piece_size=64 * 2**20)
    counters = Counters()
    service = ModelService(ModelStore(tmp_path / "me", reserve=0), _Dht(["a" * 64]),  # type: ignore[arg-type]
                           _Transport(), lambda: None, counters, piece_size=16384, ttl=60)  # type: ignore[arg-type]
    methods: list[str] = []

    async def ask(peer: str, method: str, body: dict[str, object]) -> bytes:
        methods.append(method)
        return hostile.encoded

    service._ask = ask  # type: ignore[method-assign]
    with pytest.raises(PullError, match=r"config\.json is 192\.0 MiB; a config\.json may have 1\.0 MiB at most"):
        await service.manifest(hostile.model_id, deadline=5)
    assert methods == ["swarm.manifest"] and counters["models_refused"] == 1
    assert service.store.model_ids() == []
