"""Importing a GGUF file (a path, or an Ollama blob) into the store.

The manifest lists the GGUF itself as the model's weight file (``data_start`` is
where its tensor data begins, so the header travels with every layer range) and,
as small files, the config.json and tokenizer files its metadata implies
(node/gguf/sidecar.py). Tensors are listed under their Hugging Face names with
their GGUF types and byte ranges, so the layer-range fetch and the engine treat a
GGUF model like a safetensors one. With ``in_place`` the GGUF's bytes are served
from the user's file (an Ollama store's blob stays where Ollama keeps it); the
small files are always stored as pieces (they exist nowhere else).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from node.gguf.config import GGUFConfigError
from node.gguf.tokenizer import GGUFTokenizerError
from node.store.importer import ImportError_, Progress, hash_file
from node.store.models import ModelStore
from protocol.gguf import GGUFError, GGUFHeader, hf_name
from protocol.manifest import Manifest, ManifestError, ManifestFile, build_manifest, check_path
from protocol.model_limits import ModelTooLarge, check_files
from protocol.safetensors import TensorInfo

__all__ = ["import_gguf", "is_gguf"]


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _summary(header: GGUFHeader, config: dict[str, Any]) -> dict[str, Any]:
    params = 0
    for t in header.tensors:
        count = 1
        for d in t.shape:
            count *= d
        params += count
    types = Counter(t.dtype for t in header.tensors if len(t.shape) == 2)
    md = header.metadata
    summary: dict[str, Any] = {
        "format": "gguf",
        "architecture": config["architectures"][0],
        "parameters": params,
        "quantization": types.most_common(1)[0][0] if types else None,
    }
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "torch_dtype",
                "max_position_embeddings", "tie_word_embeddings"):
        summary[key] = config.get(key)
    for key, name in (("general.name", "title"), ("general.license", "license")):
        value = md.get(key)
        if isinstance(value, str):
            summary[name] = value[:200]
    return summary


def import_gguf(
    store: ModelStore, path: Path, *, name: str, piece_size: int, in_place: bool = False,
    progress: Progress | None = None, expected_sha256: str | None = None,
    extra: dict[str, bytes] | None = None,
) -> Manifest:
    """Import the GGUF at ``path`` under ``name``; ``expected_sha256``: refuse a file
    whose digest differs (an Ollama blob is named by its digest); ``extra``: more small
    files for the manifest (an Ollama model's LICENSE)."""
    import json

    from node.gguf.sidecar import read_sidecars

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ImportError_(f"{path} is not a file")
    rel = path.name
    try:
        check_path(rel)
        header, small = read_sidecars(path)
        small.update(extra or {})
        # What peers would refuse to fetch (a header or a sidecar over its cap) is refused here.
        check_files([*((f, len(b), None) for f, b in small.items()), (rel, path.stat().st_size, header.data_start)],
                    gguf=True, model=str(path))
    except ModelTooLarge as exc:
        raise ImportError_(str(exc)) from None
    except (GGUFError, GGUFConfigError, GGUFTokenizerError, ManifestError) as exc:
        raise ImportError_(f"{path}: {exc}") from None
    config = json.loads(small["config.json"])
    size = path.stat().st_size
    if not in_place:
        store.pieces.check_space(size + sum(len(b) for b in small.values()))
    def keep(piece: str, data: bytes) -> None:
        store.pieces.write(piece, data)

    files: list[ManifestFile] = []
    digest = hashlib.sha256()
    try:
        for fname, data in sorted(small.items()):
            hashes = []
            for i in range(0, max(len(data), 1), piece_size):
                chunk = data[i : i + piece_size]
                piece = hashlib.sha256(chunk).hexdigest()
                keep(piece, chunk)
                hashes.append(piece)
            files.append(ManifestFile(fname, len(data), tuple(hashes) if data else (), None))
        info = path.stat()

        def keep_and_hash(piece: str, data: bytes) -> None:
            digest.update(data)
            if not in_place:
                keep(piece, data)

        got, hashes = hash_file(path, piece_size, keep_and_hash, progress, rel)
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise ImportError_(
                f"{path} has sha256 {digest.hexdigest()}, but it should be {expected_sha256}: "
                "the file is damaged or not the one named; refusing it"
            )
        files.append(ManifestFile(rel, got, tuple(hashes), header.data_start))
        arch = header.architecture
        tensors = [TensorInfo(hf_name(t.name, arch) or t.name, rel, t.dtype, t.shape, t.offset, t.length)
                   for t in header.tensors]
        manifest = build_manifest(files, sorted(tensors, key=lambda t: t.offset), piece_size=piece_size,
                                  summary=_summary(header, config))
        source = {"root": str(path.parent), "files": {rel: [info.st_size, info.st_mtime_ns]}}
        store.add(manifest, name=name, in_place=source if in_place else None)
        store.mark_imported(manifest.model_id)
    except BaseException:
        store.collect_garbage()
        raise
    return manifest
