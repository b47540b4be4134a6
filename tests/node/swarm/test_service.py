"""The model service's checks on what peers send (a manifest must hash to the id asked for),
and its patience: a manifest is asked for again until a holder answers or a deadline passes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from node.store.importer import import_directory
from node.store.models import ModelStore
from node.swarm.service import ModelService, PullError
from node.system.counters import Counters
from node.testing.tinymodel import make_tiny_model


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
