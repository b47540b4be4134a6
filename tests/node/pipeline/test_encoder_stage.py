"""An embedding model (BERT) in the pipeline: planned as one unit on one node, its stage
fetches every tensor of it, and its runner embeds whole inputs and refuses anything else."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from node.engine import WeightSource
from node.engine.bert import load_encoder, parse_bert_config
from node.pipeline.cost import encoder_cost
from node.pipeline.encoder_stage import EncoderRunner
from node.pipeline.planner import NodeOffer, PlanError, make_plan
from node.pipeline.stage_errors import StageError
from node.store.importer import import_directory
from node.store.models import ModelStore
from node.swarm.layers import pieces_for_layers
from protocol.pipeline import Step
from tests.helpers.tiny_bert import make_tiny_bert

GiB = 1 << 30


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("b") / "bert")


def test_an_encoder_is_planned_whole_on_one_node(bert_dir: Path) -> None:
    config = parse_bert_config(json.loads((bert_dir / "config.json").read_text()))
    cost = encoder_cost(config, "float32", 64, 2)
    plan = make_plan(cost, [NodeOffer("a", "a", GiB, 1.0), NodeOffer("b", "b", GiB, 2.0)])
    assert [(s.start, s.end) for s in plan.stages] == [(0, 1)]
    whole = cost.need(0, 1, True, True)
    with pytest.raises(PlanError):  # never split over two nodes that each hold half of it
        make_plan(cost, [NodeOffer("a", "a", whole // 2 + 1, 1.0), NodeOffer("b", "b", whole // 2 + 1, 1.0)])


def test_its_stage_fetches_every_encoder_tensor(bert_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, bert_dir, name="bert", piece_size=16 * 1024)
    whole = pieces_for_layers(manifest, 0, 1, has_embedding=True, has_head=True)
    names = [t for t in manifest.tensors if t.name.startswith(("embeddings.", "encoder."))]
    assert names and manifest.pieces_for_ranges([(t.file, t.offset, t.length) for t in names]) <= whole


def test_the_runner_embeds_whole_inputs_only(bert_dir: Path) -> None:
    config = parse_bert_config(json.loads((bert_dir / "config.json").read_text()))
    encoder = load_encoder(WeightSource.from_dir(bert_dir), config)
    ids = np.array([2, 5, 6, 3], np.int64)

    def step(kind: str, start: int = 0, last: bool = True) -> Step:
        return Step("c" * 64, 1, "00ee00ee", 0, kind, start, ids, last, None, 0, None, 10.0)

    async def go() -> None:
        r = EncoderRunner(encoder, slots=2, executor=ThreadPoolExecutor(1), session_idle=60)
        got = await r.submit(step("embed"))
        assert got.embedding is not None and got.token is None
        np.testing.assert_allclose(got.embedding, encoder.embed([ids])[0], atol=1e-6)
        assert not r.sessions  # nothing is kept
        for bad, why in ((step("prefill"), "embedding model"), (step("embed", last=False), "whole input")):
            with pytest.raises(StageError, match=why):
                await r.submit(bad)

    asyncio.run(go())
