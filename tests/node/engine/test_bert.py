"""BERT embeddings against transformers: a tiny random BertModel written by transformers
itself; the engine's vector is the mean of the last hidden states over the attention mask,
L2-normalized (sentence-transformers' pooling for these models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from node.engine import WeightSource
from node.engine.bert import is_bert, load_encoder, parse_bert_config
from node.engine.errors import ContextOverflowError, TokenRangeError, UnsupportedModelError


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    torch.manual_seed(3)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # random init leaves LayerNorms at 1/0 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _hf(model: object, rows: list[list[int]]) -> np.ndarray:
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state  # type: ignore[operator]
    m = mask[..., None].float()
    pooled = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_bert_embeddings_match_transformers(tiny_bert: tuple[Path, object]) -> None:
    path, model = tiny_bert
    raw = json.loads((path / "config.json").read_text())
    assert is_bert(raw)
    enc = load_encoder(WeightSource.from_dir(path), parse_bert_config(raw))
    rng = np.random.default_rng(0)
    rows = [[int(x) for x in rng.integers(0, 120, n)] for n in (5, 17, 64, 1)]  # padded, masked, full
    got = enc.embed(rows)
    want = _hf(model, rows)
    assert got.shape == (4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = np.sum(got * want, axis=1)
    assert (cos >= 0.9999).all(), cos
    # One at a time gives the same vectors as a padded batch: padding never leaks in.
    np.testing.assert_allclose(enc.embed([rows[0]])[0], got[0], atol=1e-5)


def test_bert_refuses_what_it_cannot_embed(tiny_bert: tuple[Path, object]) -> None:
    path, _ = tiny_bert
    raw = json.loads((path / "config.json").read_text())
    enc = load_encoder(WeightSource.from_dir(path), parse_bert_config(raw))
    with pytest.raises(ContextOverflowError, match="at most 64"):
        enc.embed([[1] * 65])
    with pytest.raises(TokenRangeError, match="outside the vocabulary"):
        enc.embed([[1, 120]])
    with pytest.raises(UnsupportedModelError, match="relu"):
        parse_bert_config({**raw, "hidden_act": "relu"})
