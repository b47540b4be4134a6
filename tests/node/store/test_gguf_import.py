"""Importing GGUF files: a path, in place, and from an Ollama store (manifest + blobs);
the manifest lists tensors under Hugging Face names so layer ranges fetch only their
pieces; the engine loads the model from the store's pieces; bad files are refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from node.engine import PartitionSpec, WeightSource, load_partition
from node.engine.tokenizer import Tokenizer
from node.gguf.ollama import OllamaError, find_model
from node.pipeline.builder import config_of
from node.store.gguf_import import import_gguf
from node.store.importer import ImportError_
from node.store.models import ModelStore
from node.swarm.layers import pieces_for_layers
from node.testing.gguf_writer import write_gguf
from node.testing.tinymodel import make_tiny_model

PIECE = 16 * 1024


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    tiny = make_tiny_model(root / "tiny", arch="qwen2", layers=4, hidden=64, vocab_size=512)
    return write_gguf(tiny, root / "tiny-q8.gguf", qtype="Q8_0")


def _load_from_store(store: ModelStore, manifest):  # type: ignore[no-untyped-def]
    config = config_of(store, manifest)
    reader = store.range_reader(manifest)
    files = [f.path for f in manifest.files if f.data_start is not None]
    source = WeightSource(reader, files, read_into=reader.read_into, sizes={f.path: f.size for f in manifest.files})
    return load_partition(source, config, PartitionSpec.whole(config), max_context=64, prefill_chunk=16)


def test_import_copies_and_the_engine_loads_from_pieces(gguf_file: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_gguf(store, gguf_file, name="tiny", piece_size=PIECE)
    paths = {f.path for f in manifest.files}
    assert paths == {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                     "tiny-q8.gguf"}
    assert manifest.summary["format"] == "gguf" and manifest.summary["quantization"] == "Q8_0"
    assert manifest.summary["num_hidden_layers"] == 4
    names = {t.name for t in manifest.tensors}
    assert "model.layers.3.mlp.down_proj.weight" in names and "model.embed_tokens.weight" in names
    # A middle layer range needs far fewer pieces than the whole model.
    middle = pieces_for_layers(manifest, 1, 2, has_embedding=False, has_head=False)
    assert len(middle) < manifest.num_pieces / 2
    # The GGUF exports byte for byte; the engine loads it from verified pieces.
    store.export(manifest, tmp_path / "out")
    assert (tmp_path / "out" / "tiny-q8.gguf").read_bytes() == gguf_file.read_bytes()
    part = _load_from_store(store, manifest)
    direct = load_partition(WeightSource.from_gguf(gguf_file), part.config, PartitionSpec.whole(part.config),
                            max_context=64, prefill_chunk=16)
    ids = [1, 2, 3, 40, 50]
    a = np.asarray(part.prefill(part.new_cache(1), ids)[1])
    b = np.asarray(direct.prefill(direct.new_cache(1), ids)[1])
    np.testing.assert_array_equal(a, b)
    tok = Tokenizer.from_model_dir(tmp_path / "out")
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)) == "hello world"


def test_in_place_serves_the_users_file_and_notices_changes(gguf_file: Path, tmp_path: Path) -> None:
    local = tmp_path / "user.gguf"
    local.write_bytes(gguf_file.read_bytes())
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_gguf(store, local, name="mine", piece_size=PIECE, in_place=True)
    stored = sum(1 for _ in store.pieces)
    assert stored <= 8  # only the small files were copied
    assert store.held(manifest) == set(range(manifest.num_pieces))
    _load_from_store(store, manifest)
    os.utime(local, ns=(1, 1))  # the file changed (as far as the store can tell)
    gg = manifest.file_index("user.gguf")
    assert not any(p.file == gg for p in manifest.pieces if p.index in store.held(manifest))


def _ollama_store(root: Path, blob: bytes, *, digest: str | None = None) -> None:
    sha = hashlib.sha256(blob).hexdigest()
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / f"sha256-{sha}").write_bytes(blob)
    lic = b"Apache License 2.0 (test)"
    lic_sha = hashlib.sha256(lic).hexdigest()
    (root / "blobs" / f"sha256-{lic_sha}").write_bytes(lic)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                   "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest or sha}",
             "size": len(blob)},
            {"mediaType": "application/vnd.ollama.image.license", "digest": f"sha256:{lic_sha}", "size": len(lic)},
        ],
    }
    where = root / "manifests" / "registry.ollama.ai" / "library" / "tiny"
    where.mkdir(parents=True)
    (where / "q8").write_text(json.dumps(manifest))


def test_an_ollama_store_imports_in_place(gguf_file: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ollama"
    _ollama_store(root, gguf_file.read_bytes())
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    found = find_model("tiny:q8")
    assert found.name == "tiny:q8" and found.blob.parent == root / "blobs" and b"Apache" in found.extra["LICENSE"]
    store = ModelStore(tmp_path / "data", reserve=0)
    manifest = import_gguf(store, found.blob, name=found.name, piece_size=PIECE, in_place=True,
                           expected_sha256=found.sha256, extra=found.extra)
    assert store.resolve("tiny:q8") == manifest.model_id
    assert "LICENSE" in {f.path for f in manifest.files}
    _load_from_store(store, manifest)
    with pytest.raises(OllamaError, match="not in the Ollama store"):
        find_model("absent:1b")
    with pytest.raises(OllamaError, match="not an Ollama model name"):
        find_model("../../etc:passwd")


def test_a_blob_whose_digest_does_not_match_is_refused(gguf_file: Path, tmp_path: Path) -> None:
    root = tmp_path / "ollama"
    data = gguf_file.read_bytes()
    _ollama_store(root, data)
    found = find_model("tiny:q8", root)
    blob = found.blob
    damaged = bytearray(data)
    damaged[-10] ^= 0xFF  # one byte of tensor data flipped: the header still parses
    blob.write_bytes(bytes(damaged))
    store = ModelStore(tmp_path / "data", reserve=0)
    with pytest.raises(ImportError_, match="sha256"):
        import_gguf(store, blob, name="tiny:q8", piece_size=PIECE, in_place=True, expected_sha256=found.sha256)
    assert store.names() == {} and not list(store.pieces)  # nothing half-published


@pytest.mark.parametrize("damage", ["truncate", "not_gguf", "arch"])
def test_broken_files_are_refused_clearly(gguf_file: Path, tmp_path: Path, damage: str) -> None:
    data = gguf_file.read_bytes()
    path = tmp_path / "bad.gguf"
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
        match = "past the end"
    elif damage == "not_gguf":
        path.write_bytes(b"PK\x03\x04" + data[4:])
        match = "not a GGUF"
    else:
        path.write_bytes(data.replace(b"qwen2", b"mamba", 1))
        match = "architecture 'mamba' is not supported"
    store = ModelStore(tmp_path / "data", reserve=0)
    with pytest.raises(ImportError_, match=match):
        import_gguf(store, path, name="bad", piece_size=PIECE)
    assert store.names() == {}
