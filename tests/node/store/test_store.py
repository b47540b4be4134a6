"""The piece store and the importer: byte-identical exports, in-place serving, damage, refusals."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest

from node.store.importer import ImportError_, import_directory
from node.store.models import ModelStore, normalize_name
from node.store.pieces import CorruptPiece, DiskFull, StoreError
from node.testing.tinymodel import make_tiny_model

PIECE = 16 * 1024


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-model", shards=2)


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors and sorted(match) == names


def test_import_and_export_are_byte_identical(tiny: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, tiny, name="tiny", piece_size=PIECE)
    assert store.resolve("tiny") == store.resolve("tiny:latest") == manifest.model_id
    assert store.resolve(manifest.model_id[:12]) == manifest.model_id
    assert store.held(manifest) == set(range(manifest.num_pieces))
    assert manifest.summary["architecture"] == "LlamaForCausalLM" and manifest.summary["parameters"] > 0
    assert {f.path for f in manifest.files} >= {"config.json", "model.safetensors.index.json", "tokenizer.json"}
    weights = [f for f in manifest.files if f.path.endswith(".safetensors")]
    assert len(weights) == 2 and all(f.data_start for f in weights)
    store.export(manifest, tmp_path / "out")
    assert same_tree(tiny, tmp_path / "out")
    # A range read equals the file's bytes wherever it starts and ends.
    data = (tiny / weights[0].path).read_bytes()
    assert store.read_range(manifest, weights[0].path, 100, 3 * PIECE) == data[100 : 100 + 3 * PIECE]
    # The same bytes imported again give the same model id, and pieces are shared.
    again = import_directory(store, tiny, name="tiny:copy", piece_size=PIECE)
    assert again.model_id == manifest.model_id and sorted(store.names()) == ["tiny:copy", "tiny:latest"]


def test_a_piece_damaged_on_disk_is_deleted_not_served(tiny: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, tiny, name="tiny", piece_size=PIECE)
    piece = manifest.pieces[-1]
    path = store.pieces.path(piece.digest)
    path.write_bytes(b"\0" + path.read_bytes()[1:])
    with pytest.raises(CorruptPiece):
        store.read_piece(manifest, piece)
    assert not path.exists() and piece.index not in store.held(manifest)


def test_in_place_serves_the_users_files_and_notices_changes(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "mine", layers=2)
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, model, name="mine", piece_size=PIECE, in_place=True)
    assert list(store.pieces) == []  # nothing copied
    assert store.held(manifest) == set(range(manifest.num_pieces))
    store.export(manifest, tmp_path / "out")
    assert same_tree(model, tmp_path / "out")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))
    weight_pieces = {p.index for p in manifest.pieces if manifest.files[p.file].path == "model.safetensors"}
    assert not store.held(manifest) & weight_pieces
    with pytest.raises(StoreError, match="changed since"):
        store.read_piece(manifest, manifest.pieces[max(weight_pieces)])


def test_removed_models_are_garbage_collected(tiny: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, tiny, name="a", piece_size=PIECE)
    import_directory(store, tiny, name="b", piece_size=PIECE)
    assert store.remove(manifest.model_id) == ["a:latest", "b:latest"]
    assert list(store.pieces) == [] and store.model_ids() == []


@pytest.mark.parametrize("damage", ["no_config", "no_weights", "truncated_header", "past_end", "bad_index"])
def test_directories_that_are_not_models_are_refused_and_nothing_is_published(
    tmp_path: Path, damage: str
) -> None:
    model = make_tiny_model(tmp_path / "m", layers=1)
    weights = model / "model.safetensors"
    if damage == "no_config":
        (model / "config.json").unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated_header":
        weights.write_bytes(weights.read_bytes()[:20])
    elif damage == "past_end":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        (model / "model.safetensors.index.json").write_text('{"weight_map": {"x": "missing.safetensors"}}')
    store = ModelStore(tmp_path / "data", reserve=0)
    with pytest.raises(ImportError_) as info:
        import_directory(store, model, name="m", piece_size=PIECE)
    assert str(model) in str(info.value) or "missing.safetensors" in str(info.value)
    assert store.model_ids() == [] and store.names() == {} and list(store.pieces) == []


def test_a_full_disk_is_a_clear_error_before_anything_is_written(tiny: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data", reserve=2**62)
    with pytest.raises(DiskFull, match="not enough disk space"):
        import_directory(store, tiny, name="tiny", piece_size=PIECE)
    assert store.model_ids() == [] and list(store.pieces) == []


def test_names() -> None:
    assert normalize_name("Qwen2.5:0.5B") == "qwen2.5:0.5b"
    assert normalize_name("library/tiny") == "library/tiny:latest"
    for bad in ("", "a b", "-x", "x:", "x:y:z", "../x"):
        with pytest.raises(ValueError):
            normalize_name(bad)


def test_range_reader_reads_each_piece_once_and_equals_the_file(tiny: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_directory(store, tiny, name="tiny", piece_size=PIECE)
    weights = next(f for f in manifest.files if f.path.endswith(".safetensors"))
    data = (tiny / weights.path).read_bytes()
    reads: list[int] = []
    real = store.read_piece
    monkeypatch.setattr(store, "read_piece", lambda m, p: reads.append(p.index) or real(m, p))
    reader = store.range_reader(manifest)
    pos = 0
    for length in (7, PIECE - 7, 3, PIECE * 2 + 5, 1):  # consecutive tensors, across pieces
        assert reader(weights.path, pos, length) == data[pos : pos + length]
        pos += length
    assert len(reads) == len(set(reads))  # no piece read (and hashed) twice in a row
    buf = bytearray(10)
    reader.read_into(weights.path, 5, memoryview(buf))
    assert bytes(buf) == data[5:15]
    with pytest.raises(StoreError, match="outside it"):
        reader(weights.path, len(data) - 2, 4)


def test_an_import_that_peers_would_refuse_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    """A config.json over its cap (protocol/model_limits.py) would be refused by every peer:
    the import says so, naming the file and the cap, and stores nothing."""
    import json

    model = make_tiny_model(tmp_path / "m", layers=1)
    config = json.loads((model / "config.json").read_text())
    config["padding"] = "x" * (2 * 2**20)
    (model / "config.json").write_text(json.dumps(config))
    store = ModelStore(tmp_path / "data", reserve=0)
    with pytest.raises(ImportError_, match=r"config\.json is 2\.0 MiB; a config\.json may have 1\.0 MiB at most"):
        import_directory(store, model, name="m", piece_size=PIECE)
    assert store.model_ids() == [] and not list(store.pieces)
