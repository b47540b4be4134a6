"""A BERT embedding model served by a real daemon: pulled from a directory transformers wrote,
planned as one stage, loaded whole; the official `ollama` and `openai` clients get the
vectors the in-process engine gives (mean pooling, unit length) within 1e-4, and a chat
or a completion for it is a 400 saying it is an embedding model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.engine import WeightSource
from node.engine.bert import load_encoder, parse_bert_config
from node.engine.tokenizer import Tokenizer
from node.testing.localcluster import LocalCluster
from tests.helpers.tiny_bert import make_tiny_bert

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MODEL = "tiny-bert"
TEXTS = ["hola mundo", "el gato come pescado y duerme al sol"]


def test_a_bert_model_serves_embeddings(cluster: LocalCluster, tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "model" / MODEL)
    node = cluster.add_node(config={"engine": {"max_context": 256, "max_sessions": 2, "compute_dtype": "float32"}})
    cluster.start(node)
    env = {**os.environ, "ENJAMBRE_CONFIG": str(node.config)}
    out = subprocess.run([sys.executable, "-m", "node.cli", "pull", str(model_dir)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr + out.stdout

    tok = Tokenizer.from_model_dir(model_dir)
    config = parse_bert_config(json.loads((model_dir / "config.json").read_text()))
    encoder = load_encoder(WeightSource.from_dir(model_dir), config)
    want = encoder.embed([tok.encode(t) for t in TEXTS])

    client: Any = ollama.Client(host=f"http://{node.api}", timeout=300)
    got = np.asarray(client.embed(model=MODEL, input=TEXTS).embeddings)
    assert got.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-4)
    with urllib.request.urlopen(f"http://{node.api}/api/ps", timeout=30) as resp:
        ps = json.loads(resp.read())["models"]
    assert [len(m["plan"]) for m in ps if m["name"].startswith(MODEL)] == [1]  # one stage, the whole model

    oa: Any = openai.OpenAI(base_url=f"http://{node.api}/v1", api_key="unused", max_retries=0)
    done = oa.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float", dimensions=8)
    np.testing.assert_allclose(done.data[0].embedding, want[1][:8] / np.linalg.norm(want[1][:8]), atol=1e-4)

    with pytest.raises(ollama.ResponseError, match="is an embedding model") as caught:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hola"}])
    assert caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hola"}])
