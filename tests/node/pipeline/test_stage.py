"""A stage's sessions belong to their drivers, a driver holds its share of the slots, and a
slot is zeroed when a new session takes it (a poisoned slot cannot reach the next session)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from node.engine import PartitionSpec, WeightSource, load_config, load_partition
from node.pipeline.stage import StageBusy, StageError, StageRunner
from node.testing.tinymodel import make_tiny_model
from protocol.pipeline import Step

MODEL = "c" * 64
ALICE, MALLORY = "a" * 64, "e" * 64


@pytest.fixture(scope="module")
def middle(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=2, hidden=32, intermediate=64,
                           vocab_size=320)
    cfg = load_config(path)
    return load_partition(WeightSource.from_dir(Path(path)), cfg, PartitionSpec(0, 2, False, False),
                          dtype="float32", max_context=64, prefill_chunk=16)


def prefill(session: str, rows: np.ndarray, step: int = 0, start: int = 0) -> Step:
    return Step(MODEL, 1, session, step, "prefill", start, rows.astype(np.float32), True, None, 0, None, 10.0)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def runner_for(part, slots: int = 2, cap: int | None = None) -> StageRunner:  # type: ignore[no-untyped-def]
    r = StageRunner(part, slots=slots, executor=ThreadPoolExecutor(1), session_idle=60,
                    owner_cap=(lambda _o: cap) if cap else None)
    r.start()
    return r


def test_another_drivers_steps_and_closes_do_not_touch_a_session(middle) -> None:  # type: ignore[no-untyped-def]
    rows = np.random.default_rng(0).normal(size=(3, 32))

    async def go() -> None:
        r = runner_for(middle)
        await r.submit(prefill("00aa00aa", rows), ALICE)
        with pytest.raises(StageError) as info:  # a reset of alice's session by someone else
            await r.submit(prefill("00aa00aa", rows, step=1), MALLORY)
        assert info.value.code == "not_your_session"
        assert not r.free("00aa00aa", MALLORY) and "00aa00aa" in r.sessions
        assert r.free("00aa00aa", ALICE) and not r.sessions
        await r.close()

    run(go())


def test_a_driver_holds_at_most_its_share_of_the_slots(middle) -> None:  # type: ignore[no-untyped-def]
    rows = np.ones((1, 32))

    async def go() -> None:
        r = runner_for(middle, slots=4, cap=2)
        for sid in ("00000001", "00000002"):
            await r.submit(prefill(sid, rows), MALLORY)
        with pytest.raises(StageBusy):
            await r.submit(prefill("00000003", rows), MALLORY)
        await r.submit(prefill("00000004", rows), ALICE)  # the others still get theirs
        assert r.owned_by(MALLORY) == 2 and r.owned_by(ALICE) == 1
        await r.close()

    run(go())


def test_a_poisoned_slot_is_zeroed_for_the_next_session(middle) -> None:  # type: ignore[no-untyped-def]
    """NaN rows (a peer's, before the stage boundary refused them; or an overflow) leave NaN
    keys and values in the slot; the next session that takes the slot answers as on a fresh
    stage (attention weighs the slot's unused rows by 0, and 0 * NaN is NaN)."""
    good = np.random.default_rng(1).normal(size=(2, 32))

    async def go() -> tuple[np.ndarray, np.ndarray]:
        fresh = runner_for(middle, slots=1)
        want = (await fresh.submit(prefill("0000beef", good), ALICE)).hidden
        await fresh.close()
        r = runner_for(middle, slots=1)
        await r.submit(prefill("0000dead", np.full((16, 32), np.nan)), MALLORY)
        assert not np.isfinite(np.asarray(r.cache.v[0][0])).all()  # the slot is poisoned
        assert r.free("0000dead", MALLORY)
        got = (await r.submit(prefill("0000beef", good), ALICE)).hidden
        await r.close()
        assert want is not None and got is not None
        return want, got

    want, got = run(go())
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)


def test_an_embed_step_makes_the_tail_answer_the_embedding(tmp_path: Path) -> None:
    """Chunks of an embed step prefill like a prompt; the last one's answer is the vector the
    engine gives for the whole input (and no token)."""
    path = make_tiny_model(tmp_path / "tiny", layers=2, hidden=32, intermediate=64, vocab_size=320)
    cfg = load_config(path)
    part = load_partition(WeightSource.from_dir(Path(path)), cfg, PartitionSpec(0, 2, True, True),
                          dtype="float32", max_context=64, prefill_chunk=16)
    ids = np.arange(3, 23, dtype=np.int64)

    def embed(step: int, a: int, b: int) -> Step:
        return Step(MODEL, 1, "00ee00ee", step, "embed", a, ids[a:b], b == ids.size, None, 0, None, 10.0)

    async def go() -> None:
        r = runner_for(part)
        first = await r.submit(embed(0, 0, 16), ALICE)
        assert first.embedding is None and first.token is None
        last = await r.submit(embed(1, 16, 20), ALICE)
        assert last.token is None and last.embedding is not None
        await r.close()
        _, ref = part.prefill(part.new_cache(1), ids, embed=True)
        np.testing.assert_allclose(last.embedding, np.asarray(ref), atol=1e-5)
        assert last.embedding.dtype == np.float32 and abs(np.linalg.norm(last.embedding) - 1) < 1e-5

    run(go())
