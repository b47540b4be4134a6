"""A ``bert`` GGUF (all-MiniLM's form in Ollama's store): its metadata becomes BertModel's
config.json, its phantom-space vocabulary the WordPiece tokenizer (the same ids as the
original tokenizer), its tensors the encoder's under Hugging Face names; the vectors equal
transformers' (mean pooling, normalized) and a store import lists the tensors for the
whole-model stage to fetch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from node.engine import WeightSource
from node.engine.bert import load_encoder, parse_bert_config
from node.engine.tokenizer import Tokenizer
from node.gguf.config import GGUFConfigError, hf_config
from node.gguf.sidecar import write_sidecars
from node.store.gguf_import import import_gguf
from node.store.models import ModelStore
from node.swarm.layers import pieces_for_layers
from tests.helpers.tiny_bert import make_tiny_bert, write_bert_gguf

TEXTS = ["Hola mundo", "el gato come pescado y duerme al sol", "the cat eats fish"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bg")
    model_dir = make_tiny_bert(root / "hf")
    return model_dir, write_bert_gguf(model_dir, root / "tiny-bert.gguf")


def test_a_bert_gguf_embeds_as_transformers_does(bert: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, path = bert
    side = write_sidecars(path, tmp_path / "side")
    config = parse_bert_config(json.loads((side / "config.json").read_text()))
    tok = Tokenizer.from_model_dir(side)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = [tok.encode(t) for t in TEXTS]
    assert rows == [hf_tok(t)["input_ids"] for t in TEXTS]
    got = load_encoder(WeightSource.from_gguf(path), config).embed(rows)
    model = transformers.BertModel.from_pretrained(model_dir).eval()
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert (np.sum(got * want, axis=1) >= 0.9999).all()


def test_its_import_lists_the_encoder_tensors(bert: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = bert
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_gguf(store, path, name="tiny-bert", piece_size=16 * 1024)
    names = {t.name for t in manifest.tensors}
    assert "embeddings.word_embeddings.weight" in names and "encoder.layer.1.output.LayerNorm.bias" in names
    whole = pieces_for_layers(manifest, 0, 1, has_embedding=True, has_head=True)
    assert whole == set(range(manifest.num_pieces))


def test_a_cls_pooled_bert_gguf_is_refused() -> None:
    md = {"general.architecture": "bert", "bert.pooling_type": 2, "bert.attention.head_count": 4,
          "bert.embedding_length": 32}
    with pytest.raises(GGUFConfigError, match="pooling_type 2 is not supported"):
        hf_config(md, tied=True)
