"""The fetcher against fake holders: bad pieces, vanishing holders, resumes, nobody left."""

from __future__ import annotations

import asyncio
import filecmp
import time
from pathlib import Path

import pytest

from node.store.importer import import_directory
from node.store.models import ModelStore
from node.swarm.fetcher import FetchError, PieceFetcher
from node.system.counters import Counters
from node.testing.tinymodel import make_tiny_model
from protocol.manifest import Manifest

PIECE = 16 * 1024


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[Path, ModelStore, Manifest]:
    model = make_tiny_model(tmp_path / "m", layers=2)
    seed = ModelStore(tmp_path / "seed", reserve=0)
    return model, seed, import_directory(seed, model, name="m", piece_size=PIECE)


def fetcher_for(store: ModelStore, manifest: Manifest, peers: dict[str, object], asked: list[tuple[str, int]],
                **kw: object) -> PieceFetcher:
    async def ask(peer: str, body: dict[str, object]) -> bytes:
        index = int(body["index"])  # type: ignore[call-overload]
        asked.append((peer, index))
        behaviour = peers[peer]
        return await behaviour(index)  # type: ignore[operator,no-any-return]

    async def holders() -> dict[str, set[int]]:
        return {p: set(range(manifest.num_pieces)) for p in peers}

    return PieceFetcher(store, manifest, ask=ask, holders=holders, counters=Counters(), **kw)  # type: ignore[arg-type]


async def test_a_peer_that_sends_wrong_bytes_is_banned_and_the_copy_is_exact(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    model, seed, manifest = seeded
    good = lambda i: _read(seed, manifest, i)  # noqa: E731

    async def liar(i: int) -> bytes:
        return b"\0" * manifest.pieces[i].length

    store = ModelStore(tmp_path / "copy", reserve=0)
    store.add(manifest, name="m")
    asked: list[tuple[str, int]] = []
    fetcher = fetcher_for(store, manifest, {"good": good, "liar": liar}, asked)
    await fetcher.run(set(range(manifest.num_pieces)))
    assert "liar" in fetcher.banned and fetcher.counters["bad_pieces"] >= 1
    store.export(manifest, tmp_path / "out")
    assert not filecmp.dircmp(model, tmp_path / "out").diff_files


async def test_a_holder_that_vanishes_mid_transfer_leaves_the_others_to_finish(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    _, seed, manifest = seeded
    served = {"n": 0}

    async def dies(i: int) -> bytes:
        served["n"] += 1
        if served["n"] > 2:
            raise ConnectionError("gone")
        return await _read(seed, manifest, i)

    store = ModelStore(tmp_path / "copy", reserve=0)
    store.add(manifest)
    asked: list[tuple[str, int]] = []
    fetcher = fetcher_for(store, manifest, {"dies": dies, "stays": lambda i: _read(seed, manifest, i)}, asked,
                          rest=0.01)
    await fetcher.run(set(range(manifest.num_pieces)))
    assert store.held(manifest) == set(range(manifest.num_pieces))


async def test_a_resumed_fetch_asks_only_for_what_is_missing(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    _, seed, manifest = seeded
    store = ModelStore(tmp_path / "copy", reserve=0)
    store.add(manifest)
    for piece in manifest.pieces[: manifest.num_pieces // 2]:  # what a killed fetch had stored
        store.write_piece(piece, await _read(seed, manifest, piece.index))
    asked: list[tuple[str, int]] = []
    await fetcher_for(store, manifest, {"seed": lambda i: _read(seed, manifest, i)}, asked).run(
        set(range(manifest.num_pieces)))
    assert sorted(i for _, i in asked) == list(range(manifest.num_pieces // 2, manifest.num_pieces))


async def test_when_nobody_can_serve_the_error_says_so(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    _, _, manifest = seeded

    async def broken(i: int) -> bytes:
        raise ConnectionError("refused")

    store = ModelStore(tmp_path / "copy", reserve=0)
    store.add(manifest)
    fetcher = fetcher_for(store, manifest, {"only": broken}, [], rest=0.01, idle_timeout=0.5)
    with pytest.raises(FetchError, match="could not be fetched for 0 s"):
        await fetcher.run(set(range(manifest.num_pieces)))


async def test_a_busy_holder_that_times_out_again_and_again_is_asked_again(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    """The only holder times out five times in a row (a machine busy with other work): the
    fetch rests and asks again instead of giving up (it used to drop a peer after three)."""
    _, seed, manifest = seeded
    calls = {"n": 0}

    async def busy(i: int) -> bytes:
        calls["n"] += 1
        if calls["n"] <= 5:
            raise TimeoutError("no answer within 60 s")
        return await _read(seed, manifest, i)

    store = ModelStore(tmp_path / "copy", reserve=0)
    store.add(manifest)
    await fetcher_for(store, manifest, {"only": busy}, [], rest=0.01, per_peer=1).run(set(range(manifest.num_pieces)))
    assert store.held(manifest) == set(range(manifest.num_pieces)) and calls["n"] > 5


async def _read(store: ModelStore, manifest: Manifest, index: int) -> bytes:
    return store.read_piece(manifest, manifest.pieces[index])


async def test_a_disk_that_fills_mid_fetch_stops_it_clearly_and_leaves_a_consistent_store(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    _, seed, manifest = seeded
    store = ModelStore(tmp_path / "copy", reserve=0)
    store.add(manifest)
    served = {"n": 0}

    async def fills(i: int) -> bytes:
        served["n"] += 1
        if served["n"] == 4:
            store.pieces.reserve = 2**62  # the disk is now "full"
        return await _read(seed, manifest, i)

    with pytest.raises(FetchError, match="not enough disk space"):
        await fetcher_for(store, manifest, {"seed": fills}, [], per_peer=1).run(set(range(manifest.num_pieces)))
    held = store.held(manifest)
    assert 0 < len(held) < manifest.num_pieces
    for index in held:  # every piece that is there is whole and right
        store.read_piece(manifest, manifest.pieces[index])
    assert not list((tmp_path / "copy" / "pieces").glob("*/.*"))  # no temporary files left


async def test_holders_that_never_answer_cost_a_short_wait_not_a_request_timeout(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    """Three holders take requests and never answer (a request timeout is 60 s): each of
    their pieces is asked of another holder once it is overdue, and they are remembered."""
    _, seed, manifest = seeded

    async def silent(i: int) -> bytes:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    store = ModelStore(tmp_path / "copy", reserve=0)
    store.add(manifest)
    peers = {"good": lambda i: _read(seed, manifest, i), "s1": silent, "s2": silent, "s3": silent}
    fetcher = fetcher_for(store, manifest, peers, [], hedge_after=0.05)
    await asyncio.wait_for(fetcher.run(set(range(manifest.num_pieces))), 10)
    assert store.held(manifest) == set(range(manifest.num_pieces))
    now = time.monotonic()
    assert all(fetcher.book.on_probation(p, now) for p in ("s1", "s2", "s3")) and not fetcher.banned
    assert fetcher.book.trusted("good", now)


async def test_a_slow_holder_that_answers_is_never_banned(
    seeded: tuple[Path, ModelStore, Manifest], tmp_path: Path
) -> None:
    """Serving must hold on a busy machine: a holder slower than the hedge time is used
    (alone, it serves everything), and beside a faster one it rests, never banned."""
    _, seed, manifest = seeded

    async def slow(i: int) -> bytes:
        await asyncio.sleep(0.05)
        return await _read(seed, manifest, i)

    for peers in ({"slow": slow}, {"slow": slow, "fast": lambda i: _read(seed, manifest, i)}):
        store = ModelStore(tmp_path / f"copy{len(peers)}", reserve=0)
        store.add(manifest)
        fetcher = fetcher_for(store, manifest, peers, [], hedge_after=0.01)
        await asyncio.wait_for(fetcher.run(set(range(manifest.num_pieces))), 30)
        assert store.held(manifest) == set(range(manifest.num_pieces)) and not fetcher.banned
