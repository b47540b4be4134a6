"""Importing a Hugging Face model directory into the store: stream, hash, check, then publish.

The directory must hold ``config.json`` and safetensors weights (one file, or
shards listed by ``model.safetensors.index.json``); each weight file's header is
parsed and checked against the file's size before anything is stored, so a
truncated download is refused with the file named. Files are read one piece at
a time, never whole. The manifest and the name are written last: an import that
fails leaves nothing half-published (pieces it stored that no model uses are
collected).

With ``in_place`` the pieces are not copied: the store serves byte ranges of the
user's files, and remembers each file's size and modification time to notice
when one changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.store.models import ModelStore
from node.store.pieces import StoreError
from protocol.manifest import Manifest, ManifestError, ManifestFile, build_manifest, check_path
from protocol.model_limits import ModelTooLarge, check_files
from protocol.safetensors import SafetensorsError, TensorInfo, header_length, parse_header

__all__ = ["ImportError_", "hash_file", "import_directory", "model_files"]

# What a model directory may carry besides its weights; other weight formats
# (.bin, .pt, .gguf, ...) and subdirectories are left out.
_SMALL_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".md")
_SMALL_NAMES = ("LICENSE",)  # without a suffix in most Hugging Face repos; /api/show reads it
_SMALL_LIMIT = 64 * 2**20
Progress = Callable[[str, int, int], None]  # (file, bytes done in it, its size)


class ImportError_(StoreError):
    """A directory that cannot be imported as a model (the message says why)."""


def model_files(root: Path) -> tuple[list[str], list[str]]:
    """(weight files, other files) of a model directory, checked; ImportError_ if it is not one."""
    if not root.is_dir():
        raise ImportError_(f"{root} is not a directory")
    if not (root / "config.json").is_file():
        raise ImportError_(f"{root} has no config.json: not a Hugging Face model directory")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            weights = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImportError_(f"{index} is malformed ({exc})") from None
        missing = [w for w in weights if not (root / w).is_file()]
        if missing:
            raise ImportError_(f"{index} lists {missing[0]}, which is not in {root}")
    else:
        weights = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    if not weights:
        raise ImportError_(f"{root} holds no *.safetensors weights (convert .bin/.pt weights first)")
    others = sorted(
        p.name for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in weights
        and (p.suffix in _SMALL_SUFFIXES or p.name in _SMALL_NAMES) and p.stat().st_size <= _SMALL_LIMIT
    )
    for name in (*weights, *others):
        try:
            check_path(name)
        except ManifestError as exc:
            raise ImportError_(str(exc)) from None
    return weights, others


def _header(path: Path, name: str) -> tuple[dict[str, TensorInfo], int]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        first = fh.read(8)
        length = header_length(first, name, size)
        data = first + fh.read(length)
    return parse_header(data, name, size), 8 + length


def hash_file(path: Path, piece_size: int, keep: Callable[[str, bytes], None] | None,
               progress: Progress | None, name: str) -> tuple[int, list[str]]:
    size = path.stat().st_size
    hashes: list[str] = []
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(piece_size):
            piece = hashlib.sha256(chunk).hexdigest()
            if keep is not None:
                keep(piece, chunk)
            hashes.append(piece)
            done += len(chunk)
            if progress is not None:
                progress(name, done, size)
    if done != size:
        raise ImportError_(f"{path} changed while it was being read; try again")
    return size, hashes


def _summary(root: Path, tensors: list[TensorInfo]) -> dict[str, Any]:
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ImportError_(f"{root / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ImportError_(f"{root / 'config.json'} should be a JSON object")
    params = 0
    for t in tensors:
        count = 1
        for d in t.shape:
            count *= d
        params += count
    architectures = config.get("architectures")
    summary: dict[str, Any] = {
        "format": "safetensors",
        "architecture": architectures[0] if isinstance(architectures, list) and architectures else None,
        "parameters": params,
    }
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "torch_dtype",
                "max_position_embeddings", "tie_word_embeddings"):
        value = config.get(key)
        if isinstance(value, str | int | float | bool) or value is None:
            summary[key] = value
    return summary


def import_directory(
    store: ModelStore, root: Path, *, name: str, piece_size: int, in_place: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Import the model at ``root`` under ``name``; returns its manifest."""
    root = Path(root).expanduser().absolute()
    weights, others = model_files(root)
    tensors: list[TensorInfo] = []
    data_starts: dict[str, int] = {}
    for w in weights:
        try:
            found, data_starts[w] = _header(root / w, w)
        except SafetensorsError as exc:
            raise ImportError_(f"{root}: {exc}") from None
        tensors.extend(found.values())
    try:  # what peers would refuse to fetch is refused here, before anything is stored
        check_files([(w, (root / w).stat().st_size, data_starts[w]) for w in weights]
                    + [(o, (root / o).stat().st_size, None) for o in others], gguf=False, model=str(root))
    except ModelTooLarge as exc:
        raise ImportError_(str(exc)) from None
    summary = _summary(root, tensors)
    if in_place:
        keep = None
    else:
        total = sum((root / f).stat().st_size for f in (*weights, *others))
        store.pieces.check_space(total)
        keep = store.pieces.write
    written: set[str] = set()

    def keep_and_note(piece: str, data: bytes) -> None:
        assert keep is not None
        keep(piece, data)
        written.add(piece)

    files: list[ManifestFile] = []
    stats: dict[str, list[int]] = {}
    try:
        for rel in (*others, *weights):
            path = root / rel
            info = path.stat()
            size, hashes = hash_file(path, piece_size, keep_and_note if keep else None, progress, rel)
            files.append(ManifestFile(rel, size, tuple(hashes), data_starts.get(rel)))
            stats[rel] = [info.st_size, info.st_mtime_ns]
        manifest = build_manifest(files, sorted(tensors, key=lambda t: (t.file, t.offset)),
                                  piece_size=piece_size, summary=summary)
        store.add(manifest, name=name, in_place={"root": str(root), "files": stats} if in_place else None)
        store.mark_imported(manifest.model_id)
    except BaseException:
        store.collect_garbage()  # nothing half-published: drop what only this import stored
        raise
    return manifest
