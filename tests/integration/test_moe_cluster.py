"""A tiny Qwen3-MoE as Ollama's library serves such models (a Q8_0 GGUF), pulled into a
cluster of real daemons and split over three of them, answers through the Ollama API
(the official client) exactly as the engine does in one process with the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.engine import (
    PartitionSpec,
    SamplingParams,
    WeightSource,
    generate,
    load_chain,
    load_config,
)
from node.engine.tokenizer import Tokenizer
from node.gguf.sidecar import write_sidecars
from node.testing.gguf_writer import write_gguf
from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.plans import lend_for_split
from tests.helpers.tiny_archs import make_tiny_arch

ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.slow

CONTEXT, SLOTS, CHUNK = 256, 2, 32
ENGINE = {"max_context": CONTEXT, "max_sessions": SLOTS, "prefill_chunk": CHUNK, "queue": 2,
          "step_timeout": 20.0, "compute_dtype": "float32"}
ENV = {"PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"}
MODEL = "tiny-moe"


def nodectl(node: LocalNode, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "ENJAMBRE_CONFIG": str(node.config)})
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The GGUF (6 layers of 8 experts, top 2) and its sidecar directory (config, tokenizer)."""
    root = tmp_path_factory.mktemp("moe")
    hf = make_tiny_arch("qwen3moe", root / "hf", seed=3, layers=6)
    gguf = write_gguf(hf, root / f"{MODEL}.gguf", qtype="Q8_0")
    return gguf, write_sidecars(gguf, root / "side")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, files: tuple[Path, Path]) -> Iterator[LocalCluster]:
    gguf, side = files
    lend = lend_for_split(side, 3, context=CONTEXT, slots=SLOTS, prefill_chunk=CHUNK)
    c = LocalCluster(tmp_path_factory.mktemp("moe-cluster"), env=ENV)
    try:
        for _ in range(3):
            c.start(c.add_node(config={"resources": {"max_memory": lend}, "engine": ENGINE}))
        c.wait_converged(timeout=60)
        nodectl(c.nodes[0], "pull", str(gguf), "--name", MODEL, "--piece-size", "16KiB")
        time.sleep(1.0)
        yield c
    finally:
        c.close()


def test_moe_split_over_three_daemons_answers_as_the_engine(cluster: LocalCluster,
                                                            files: tuple[Path, Path]) -> None:
    gguf, side = files
    config = load_config(side)
    assert config.architecture == "Qwen3MoeForCausalLM" and config.num_experts == 8
    tok = Tokenizer.from_model_dir(side)
    messages = [{"role": "user", "content": "el gato come pescado"}]
    ids = tok.encode_chat(messages)
    chain = load_chain(WeightSource.from_gguf(gguf), config, [PartitionSpec.whole(config)], dtype="float32",
                       max_context=CONTEXT, prefill_chunk=CHUNK)
    # Ollama's default repeat_penalty (1.1) and the model's stop tokens, as the daemon uses.
    sampling = SamplingParams(repetition_penalty=1.1, stop_token_ids=tok.stop_token_ids)
    want = [t for t, _ in generate(chain, ids, sampling, 20, block=0)]

    driver = cluster.nodes[1]  # not the node that imported it
    client: Any = ollama.Client(host=f"http://{driver.api}", timeout=300)
    reply = client.chat(model=MODEL, messages=messages, options={"temperature": 0, "num_predict": 20})
    assert reply.message.content == tok.decode(want)
    assert reply.eval_count == len(want)
    ps = json.loads(nodectl(driver, "ps", "--json"))
    (entry,) = ps["models"]
    assert len(entry["plan"]) == 3 and len({s["node_id"] for s in entry["plan"]}) == 3
    # A second entry node adopts the same plan and answers the same.
    other: Any = ollama.Client(host=f"http://{cluster.nodes[2].api}", timeout=300)
    again = other.chat(model=MODEL, messages=messages, options={"temperature": 0, "num_predict": 20})
    assert again.message.content == reply.message.content
    (entry2,) = json.loads(nodectl(cluster.nodes[2], "ps", "--json"))["models"]
    assert entry2["plan"] == entry["plan"]
    shown = client.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "qwen3_moe"
