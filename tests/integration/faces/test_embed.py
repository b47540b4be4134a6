"""Embeddings on the real three-node cluster (the model split over all three): the official
`ollama` and `openai` clients get unit vectors equal to the single-process engine's (the
whole model, last token after the final norm) within 1e-4, truncated to `dimensions` and
normalized again, and OpenAI's base64 decodes to the same floats."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from node.engine import PartitionSpec, WeightSource, load_chain, load_config
from tests.helpers.faces import CHUNK, CONTEXT, MODEL, Faces

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

TEXTS = ["hola mundo", "una frase bastante más larga que la otra, " * 3]


def _reference(faces: Faces, text: str) -> np.ndarray:
    cfg = load_config(faces.model_dir)
    chain = load_chain(WeightSource.from_dir(faces.model_dir), cfg, [PartitionSpec.whole(cfg)],
                       dtype="float32", max_context=CONTEXT, prefill_chunk=CHUNK)
    ids = faces.tokenizer.encode(text, add_special_tokens=True)
    _, vec = chain.prefill(chain.new_caches(1), ids, embed=True)
    return np.asarray(vec)


def test_embeddings_through_both_clients(faces: Faces) -> None:
    want = np.stack([_reference(faces, t) for t in TEXTS])
    client: Any = ollama.Client(host=faces.url())
    got = np.asarray(client.embed(model=MODEL, input=TEXTS).embeddings)
    assert got.shape == want.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-4)
    short = np.asarray(client.embed(model=MODEL, input=TEXTS[0], dimensions=16).embeddings[0])
    np.testing.assert_allclose(short, want[0][:16] / np.linalg.norm(want[0][:16]), atol=1e-4)
    np.testing.assert_allclose(client.embeddings(model=MODEL, prompt=TEXTS[1]).embedding, want[1], atol=1e-4)

    oa: Any = openai.OpenAI(base_url=faces.url("/v1"), api_key="unused", max_retries=0)
    done = oa.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in done.data], want, atol=1e-4)
    assert done.usage.prompt_tokens == sum(len(faces.tokenizer.encode(t)) for t in TEXTS)
    raw = oa.embeddings.with_raw_response.create(model=MODEL, input=TEXTS[0], encoding_format="base64")
    blob = raw.http_response.json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(blob), "<f4"), want[0], atol=1e-4)
