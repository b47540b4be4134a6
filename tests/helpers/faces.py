"""A three-node cluster serving one tiny model split over all three, shared by the tests
of the user-facing surfaces (OpenAI and Ollama clients, `nodectl run`, the web console).

Started once per test session (three daemons and a load cost ~30 s on 2 cores); tests
must leave it as they found it: the model loaded, nothing else changed that another
module relies on (copies and deletions use their own names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.engine import (
    PartitionSpec,
    SamplingParams,
    WeightSource,
    generate,
    load_chain,
    load_config,
)
from node.engine.tokenizer import Tokenizer
from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.plans import lend_for_split
from node.testing.tinymodel import make_tiny_model

MODEL = "faces-model"
LAYERS = 3
CONTEXT, SLOTS, CHUNK = 256, 4, 32
ENGINE = {"max_context": CONTEXT, "max_sessions": SLOTS, "prefill_chunk": CHUNK, "queue": 4,
          "step_timeout": 20.0, "compute_dtype": "float32"}


@dataclass
class Faces:
    cluster: LocalCluster
    model_dir: Path
    tokenizer: Tokenizer

    @property
    def nodes(self) -> list[LocalNode]:
        return self.cluster.nodes

    @property
    def entry(self) -> LocalNode:
        """The node the clients talk to (it drives the generations)."""
        return self.cluster.nodes[0]

    def url(self, path: str = "") -> str:
        return f"http://{self.entry.api}{path}"

    def nodectl(self, *args: str, check: bool = True, timeout: float = 120,
                node: LocalNode | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ENJAMBRE_CONFIG": str((node or self.entry).config)}
        out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                             timeout=timeout, env=env)
        if check:
            assert out.returncode == 0, out.stderr + out.stdout
        return out

    def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                timeout: float = 120) -> tuple[int, bytes]:
        """(status, body bytes) of one raw request (bytes bodies are sent as they are)."""
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def reference(self, prompt_ids: list[int], n: int, penalty: float = 1.0, model_dir: Path | None = None
                  ) -> list[int]:
        """The single-process engine's greedy tokens (whole model) for the same prompt
        (of faces-model, or of the model in ``model_dir``)."""
        model_dir = model_dir or self.model_dir
        cfg = load_config(model_dir)
        chain = load_chain(WeightSource.from_dir(model_dir), cfg, [PartitionSpec.whole(cfg)],
                           dtype="float32", max_context=CONTEXT, prefill_chunk=CHUNK)
        stop = Tokenizer.from_model_dir(model_dir).stop_token_ids
        sampling = SamplingParams(repetition_penalty=penalty, stop_token_ids=stop)
        return [t for t, _ in generate(chain, prompt_ids, sampling, n, block=0)]


# DeepSeek-R1-like: asked to think (enable_thinking), the template opens the reasoning block.
THINK_SWITCH = "{%- if add_generation_prompt and enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}{%- endif %}"


# Qwen2.5-like: offered tools, the template names them and teaches Hermes-style calls
# (names only, not their schemas: the tiny model's context is 256 tokens).
TOOLS_BLOCK = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:' }}{%- for tool in tools %}{{- ' ' + tool.function.name }}"
    "{%- endfor %}{{- '\\nCall one as <tool_call>\\n{...}\\n</tool_call><|im_end|>\\n' }}{%- endif %}"
)


def _with_think_switch(model_dir: Path) -> None:
    """The tiny model's template, with tools (before it) and the thinking switch (after it)."""
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = TOOLS_BLOCK + cfg["chat_template"] + THINK_SWITCH
    path.write_text(json.dumps(cfg))


def start_faces(root: Path, env: dict[str, str]) -> Faces:
    """Three daemons that each lend a third of the model, the model pulled on the first
    and loaded over all three. The caller closes ``faces.cluster``."""
    model_dir = make_tiny_model(root / "model" / MODEL, layers=LAYERS, hidden=64, intermediate=128,
                                vocab_size=512)
    _with_think_switch(model_dir)
    # As much as still needs all three nodes: room beside it for a small second model.
    lend = lend_for_split(model_dir, 3, context=CONTEXT, slots=SLOTS, prefill_chunk=CHUNK, largest=True)
    cluster = LocalCluster(root / "cluster", env=env)
    try:
        for _ in range(3):
            node = cluster.add_node(config={"resources": {"max_memory": lend}, "engine": ENGINE})
            cluster.start(node)
        cluster.wait_converged(timeout=60)
        faces = Faces(cluster, model_dir, Tokenizer.from_model_dir(model_dir))
        faces.nodectl("pull", str(model_dir), "--piece-size", "16KiB")
        out = faces.nodectl("load", MODEL, "--json", timeout=300)
        done = json.loads(out.stdout.splitlines()[-1])
        assert done["status"] == "success" and len(done["plan"]) == 3, out.stdout
        return faces
    except BaseException:
        cluster.close()
        raise
