"""node.gguf.ollama.find_model over a hostile Ollama store: no link is followed out of the
store, manifests and licenses are read only from regular files and only up to their caps,
and a license must hash to its digest. (Importing a found model, and refusing a GGUF blob
whose digest does not match, are in tests/node/store/test_gguf_import.py.)"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from node.gguf.ollama import MAX_MANIFEST, OllamaError, find_model

GGUF = b"GGUF" + bytes(60)
LICENSE = b"Apache License 2.0 (test)"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _store(root: Path, *, licenses: tuple[bytes, ...] = (LICENSE,)) -> Path:
    """A store holding tiny:q8 (a 64-byte 'GGUF' and its licenses); returns the manifest's path."""
    (root / "blobs").mkdir(parents=True)
    for data in (GGUF, *licenses):
        (root / "blobs" / f"sha256-{_sha(data)}").write_bytes(data)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{_sha(GGUF)}",
               "size": len(GGUF)}]
    layers += [{"mediaType": "application/vnd.ollama.image.license", "digest": f"sha256:{_sha(lic)}",
                "size": len(lic)} for lic in licenses]
    where = root / "manifests" / "registry.ollama.ai" / "library" / "tiny"
    where.mkdir(parents=True)
    (where / "q8").write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return where / "q8"


def _relink(path: Path, target: Path | str) -> None:
    path.unlink()
    path.symlink_to(target)


def test_a_plain_store(tmp_path: Path) -> None:
    _store(tmp_path / "ollama")
    found = find_model("tiny:q8", tmp_path / "ollama")
    assert found.blob == (tmp_path / "ollama" / "blobs" / f"sha256-{_sha(GGUF)}").resolve()
    assert found.sha256 == _sha(GGUF) and found.size == len(GGUF) and found.extra == {"LICENSE": LICENSE}


def test_links_inside_the_store_are_followed(tmp_path: Path) -> None:
    # A store moved to another disk and linked back, and a blob linked to another place in it.
    real = tmp_path / "disk" / "ollama"
    _store(real)
    (tmp_path / "models").symlink_to(real)
    blob = real / "blobs" / f"sha256-{_sha(GGUF)}"
    (real / "elsewhere").mkdir()
    blob.rename(real / "elsewhere" / "model.gguf")
    blob.symlink_to(real / "elsewhere" / "model.gguf")
    found = find_model("tiny:q8", tmp_path / "models")
    assert found.blob == (real / "elsewhere" / "model.gguf").resolve() and found.extra["LICENSE"] == LICENSE


def test_a_license_linked_out_of_the_store_is_not_read(tmp_path: Path) -> None:
    # The license "blob" a link to this node's cluster secret: it would be published as LICENSE.
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(b"s3cret-key")
    _store(tmp_path / "ollama")
    lic = tmp_path / "ollama" / "blobs" / f"sha256-{_sha(LICENSE)}"
    _relink(lic, secret)
    with pytest.raises(OllamaError, match="outside the Ollama store") as err:
        find_model("tiny:q8", tmp_path / "ollama")
    assert str(lic) in str(err.value) and "s3cret" not in str(err.value)
    # Named by the secret's own digest, it is still outside.
    link = tmp_path / "ollama" / "blobs" / f"sha256-{_sha(b's3cret-key')}"
    link.symlink_to(secret)
    manifest = tmp_path / "ollama" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q8"
    manifest.write_text(manifest.read_text().replace(_sha(LICENSE), _sha(b"s3cret-key")))
    with pytest.raises(OllamaError, match="outside the Ollama store"):
        find_model("tiny:q8", tmp_path / "ollama")


def test_a_gguf_linked_out_of_the_store_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(GGUF)
    _store(tmp_path / "ollama")
    _relink(tmp_path / "ollama" / "blobs" / f"sha256-{_sha(GGUF)}", outside)
    with pytest.raises(OllamaError, match="outside the Ollama store"):
        find_model("tiny:q8", tmp_path / "ollama")


def test_a_license_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    _store(tmp_path / "ollama")
    lic = tmp_path / "ollama" / "blobs" / f"sha256-{_sha(LICENSE)}"
    lic.write_bytes(b"something else")
    with pytest.raises(OllamaError, match=f"{lic}.* does not hash to the digest"):
        find_model("tiny:q8", tmp_path / "ollama")
    lic.unlink()
    with pytest.raises(OllamaError, match=f"license blob {lic} is missing"):
        find_model("tiny:q8", tmp_path / "ollama")


def test_manifests_are_read_only_from_regular_files_up_to_the_cap(tmp_path: Path) -> None:
    manifest = _store(tmp_path / "ollama")
    _relink(manifest, "/dev/zero")  # was read until memory ran out
    with pytest.raises(OllamaError, match="outside the Ollama store"):
        find_model("tiny:q8", tmp_path / "ollama")
    manifest.unlink()
    os.mkfifo(manifest)  # opening one for reading would wait for a writer
    with pytest.raises(OllamaError, match="not a regular file"):
        find_model("tiny:q8", tmp_path / "ollama")
    manifest.unlink()
    manifest.write_bytes(b" " * (MAX_MANIFEST + 1))
    with pytest.raises(OllamaError, match=f"{manifest} is over {MAX_MANIFEST} bytes"):
        find_model("tiny:q8", tmp_path / "ollama")


def test_licenses_are_capped(tmp_path: Path) -> None:
    big = b"x" * (2**20 + 1)
    _store(tmp_path / "ollama", licenses=(big,))
    with pytest.raises(OllamaError, match="over 1048576 bytes, too large to be a license"):
        find_model("tiny:q8", tmp_path / "ollama")
