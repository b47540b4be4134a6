"""Which pieces a layer range needs: the layers' bytes, embedding or head as needed, headers, small files."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.store.importer import import_directory
from node.store.models import ModelStore
from node.swarm.layers import pieces_for_layers
from node.testing.tinymodel import make_tiny_model


@pytest.mark.parametrize("tied", [False, True])
def test_quarters_together_cover_the_model_about_once(tmp_path: Path, tied: bool) -> None:
    model = make_tiny_model(tmp_path / "m", layers=8, hidden=128, intermediate=256, tie_word_embeddings=tied)
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, model, name="m", piece_size=16 * 1024)
    quarters = [pieces_for_layers(manifest, 2 * q, 2 * q + 2, has_embedding=q == 0, has_head=q == 3)
                for q in range(4)]
    everything = set(range(manifest.num_pieces))
    assert set().union(*quarters) == everything
    sizes = {p.index: p.length for p in manifest.pieces}
    fetched = sum(sizes[i] for q in quarters for i in q)
    assert fetched / manifest.total_size < 1.15  # shared boundary pieces and small files, little more
    names = {t.name: t for t in manifest.tensors}
    embed = manifest.pieces_for_ranges([(names["model.embed_tokens.weight"].file,
                                         names["model.embed_tokens.weight"].offset,
                                         names["model.embed_tokens.weight"].length)])
    middle = pieces_for_layers(manifest, 4, 6, has_embedding=False, has_head=False)
    assert not embed <= middle  # a middle range skips the embedding
    assert embed <= quarters[0]
    assert (embed <= quarters[3]) == tied  # a tied head is the embedding; an untied one is not


def test_a_multimodal_checkpoint_fetches_its_language_model_by_layer(tmp_path: Path) -> None:
    """Gemma 3's usual form keeps the text model under `language_model.model.*` beside a
    vision tower: ranges pick their layers under that prefix, the head its norm and
    lm_head, and nobody fetches the vision tower."""
    from safetensors.numpy import load_file, save_file

    model = make_tiny_model(tmp_path / "m", layers=4, hidden=128, intermediate=256)
    weights = load_file(str(model / "model.safetensors"))
    renamed = {("language_model." + k if k.startswith(("model.", "lm_head")) else k): v
               for k, v in weights.items()}
    renamed["vision_tower.encoder.layers.0.mlp.weight"] = weights["model.embed_tokens.weight"].copy()
    (model / "model.safetensors").unlink()
    save_file(renamed, str(model / "model.safetensors"))
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, model, name="mm", piece_size=16 * 1024)
    names = {t.name: t for t in manifest.tensors}

    def pieces(name: str) -> set[int]:
        t = names[name]
        return manifest.pieces_for_ranges([(t.file, t.offset, t.length)])

    first = pieces_for_layers(manifest, 0, 2, has_embedding=True, has_head=False)
    last = pieces_for_layers(manifest, 2, 4, has_embedding=False, has_head=True)
    assert pieces("language_model.model.layers.1.mlp.up_proj.weight") <= first
    assert not pieces("language_model.model.layers.3.mlp.up_proj.weight") <= first
    assert pieces("language_model.model.embed_tokens.weight") <= first
    assert pieces("language_model.model.norm.weight") <= last and pieces("language_model.lm_head.weight") <= last
    vision = pieces("vision_tower.encoder.layers.0.mlp.weight")
    assert not vision <= first | last
