"""Decoder embeddings against transformers: the final-norm hidden state of the last token
(transformers' last_hidden_state[-1]), L2-normalized; whole and split across partitions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from node.engine import split_layers

TinyModel = Any  # conftest.py


def _hf_embedding(tiny: TinyModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = tiny.hf.model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
    return out / np.linalg.norm(out)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_decoder_embedding_matches_transformers(tiny: TinyModel, parts: int) -> None:
    chain = tiny.chain(split_layers(tiny.config.num_layers, parts))
    rng = np.random.default_rng(parts)
    # 70 tokens: three 32-token chunks, the last padded; 1 token: one tiny bucket.
    for n in (70, 5, 1):
        ids = [int(x) for x in rng.integers(0, tiny.config.vocab_size, n)]
        _, vec = chain.prefill(chain.new_caches(1), ids, embed=True)
        got = np.asarray(vec)
        ref = _hf_embedding(tiny, ids)
        assert got.shape == (tiny.config.hidden_size,) and got.dtype == np.float32
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
        assert float(got @ ref) >= 0.9999
