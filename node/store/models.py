"""The models this node knows: manifests, names, which pieces it holds, and reading them back.

Under the data dir::

    models/<model id>.json          the manifest, exactly the bytes that hash to the id
    models/<model id>.inplace.json  an --in-place import: the directory and each file's size and mtime
    models/names.json               "name:tag" -> model id
    pieces/ab/abcd...               the pieces (node/store/pieces.py)

A piece of an --in-place model is a byte range of the user's own file, verified
against its hash every time it is read; a file whose size or modification time
changed since the import is refused (re-import it), so nothing stale is served.
``read_range`` assembles any byte range of a model file from pieces, which is how
the engine reads weights straight from the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from node.store.pieces import CorruptPiece, PieceStore, StoreError, digest
from node.system.files import atomic_write
from protocol.manifest import Manifest, ManifestError, PieceRef, parse_manifest

__all__ = ["ModelStore", "normalize_name"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}(:[a-z0-9][a-z0-9._-]{0,63})?$")
_ID = re.compile(r"^[0-9a-f]{8,64}$")


def normalize_name(name: str) -> str:
    """Ollama-style ``name[:tag]`` with ``latest`` as the default tag; ValueError if invalid."""
    text = name.strip().lower()
    if not _NAME.match(text):
        raise ValueError(
            f"{name!r} is not a model name: use letters, digits, '.', '_', '-' and '/', "
            "with an optional ':tag' (e.g. qwen2.5:0.5b)"
        )
    return text if ":" in text else f"{text}:latest"


class ModelStore:
    def __init__(self, data_dir: Path, *, reserve: int = 256 * 2**20) -> None:
        self.root = Path(data_dir) / "models"
        self.pieces = PieceStore(Path(data_dir) / "pieces", reserve=reserve)
        self._manifests: dict[str, Manifest] = {}
        self._sources: dict[str, dict[str, Any] | None] = {}  # in-place sources, read once

    # ------------------------------------------------------------------ manifests and names

    def add(self, manifest: Manifest, *, name: str | None = None, in_place: dict[str, Any] | None = None) -> None:
        """Record a manifest (and its in-place source and name), each written atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / f"{manifest.model_id}.json", manifest.encoded)
        if in_place is not None:
            atomic_write(self.root / f"{manifest.model_id}.inplace.json", json.dumps(in_place))
        self._sources.pop(manifest.model_id, None)
        self._manifests[manifest.model_id] = manifest
        if name is not None:
            names = self.names()
            names[normalize_name(name)] = manifest.model_id
            atomic_write(self.root / "names.json", json.dumps(names, sort_keys=True, indent=1))

    def loaded(self, model_id: str) -> Manifest | None:
        """The manifest if it is already parsed (a dict lookup: never reads or hashes)."""
        return self._manifests.get(model_id)

    def manifest(self, model_id: str) -> Manifest:
        """The manifest, read, hashed and parsed from disk the first time (a large one takes
        a fraction of a second: on the event loop, ask ``loaded`` first, else a thread)."""
        cached = self._manifests.get(model_id)
        if cached is not None:
            return cached
        path = self.root / f"{model_id}.json"
        if not _ID.match(model_id) or not path.is_file():
            raise StoreError(f"model {model_id[:12]} is not on this node")
        try:
            manifest = parse_manifest(path.read_bytes(), expected_id=model_id)
        except ManifestError as exc:
            raise StoreError(f"the stored manifest of {model_id[:12]} is damaged ({exc}); pull the model again") from None
        self._manifests[model_id] = manifest
        return manifest

    def model_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if _ID.match(p.stem) and len(p.stem) == 64)

    def names(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / "names.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}

    def resolve(self, name_or_id: str) -> str | None:
        """The model id for a name, an id or a unique id prefix (8+ hex digits) held here."""
        text = name_or_id.strip().lower()
        names = self.names()
        try:
            named = names.get(normalize_name(text))
        except ValueError:
            named = None
        if named is not None:
            return named
        if _ID.match(text):
            matches = [m for m in self.model_ids() if m.startswith(text)]
            if len(matches) == 1:
                return matches[0]
        return None

    def imported(self, model_id: str) -> bool:
        """True for a model imported on this node (not fetched from peers)."""
        return (self.root / f"{model_id}.imported").exists() or self._in_place(model_id) is not None

    def mark_imported(self, model_id: str) -> None:
        atomic_write(self.root / f"{model_id}.imported", b"")

    def names_of(self, model_id: str) -> list[str]:
        return sorted(n for n, m in self.names().items() if m == model_id)

    def added_at(self, model_id: str) -> float | None:
        """When the manifest was recorded here (seconds since the epoch), None if it is not."""
        try:
            return (self.root / f"{model_id}.json").stat().st_mtime if _ID.match(model_id) else None
        except OSError:
            return None

    # ------------------------------------------------------------------ pieces

    def _in_place(self, model_id: str) -> dict[str, Any] | None:
        # Read once per model (serving a piece used to read and parse this file each time).
        if model_id in self._sources:
            return self._sources[model_id]
        try:
            data = json.loads((self.root / f"{model_id}.inplace.json").read_text())
        except (OSError, ValueError):
            data = None
        source = data if isinstance(data, dict) else None
        self._sources[model_id] = source
        return source

    def has_piece(self, manifest: Manifest, piece: PieceRef) -> bool:
        if self.pieces.has(piece.digest):
            return True
        source = self._in_place(manifest.model_id)
        return source is not None and self._source_file(source, manifest.files[piece.file].path) is not None

    def held(self, manifest: Manifest) -> set[int]:
        """Indices of the pieces this node can serve (in-place files unchanged, or stored)."""
        source = self._in_place(manifest.model_id)
        ok_files = set()
        if source is not None:
            ok_files = {i for i, f in enumerate(manifest.files) if self._source_file(source, f.path) is not None}
        return {p.index for p in manifest.pieces if p.file in ok_files or self.pieces.has(p.digest)}

    def read_piece(self, manifest: Manifest, piece: PieceRef) -> bytes:
        """A piece's bytes, verified against its hash (from the store, or the in-place file)."""
        if self.pieces.has(piece.digest):
            try:
                return self.pieces.read(piece.digest)
            except CorruptPiece:
                if self._in_place(manifest.model_id) is None:
                    raise
        source = self._in_place(manifest.model_id)
        if source is None:
            raise StoreError(f"piece {piece.index} of model {manifest.model_id[:12]} is not on this node")
        path = self._source_file(source, manifest.files[piece.file].path)
        if path is None:
            raise StoreError(
                f"{manifest.files[piece.file].path} changed since model {manifest.model_id[:12]} was imported "
                "in place; import it again (`nodectl pull DIR --in-place`)"
            )
        with path.open("rb") as fh:
            fh.seek(piece.offset)
            data = fh.read(piece.length)
        if digest(data) != piece.digest:
            raise CorruptPiece(f"{path} no longer matches the imported model; import it again")
        return data

    def write_piece(self, piece: PieceRef, data: bytes | memoryview) -> None:
        self.pieces.write(piece.digest, data)

    def _source_file(self, source: dict[str, Any], rel: str) -> Path | None:
        stats = source.get("files", {}).get(rel)
        root = source.get("root")
        if not isinstance(stats, list) or not isinstance(root, str):
            return None
        path = Path(root) / rel
        try:
            info = path.stat()
        except OSError:
            return None
        return path if [info.st_size, info.st_mtime_ns] == stats else None

    # ------------------------------------------------------------------ reading files back

    def read_range(self, manifest: Manifest, file: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of one of the model's files, from verified pieces."""
        f = manifest.file_index(file)
        entry = manifest.files[f]
        if offset < 0 or length < 0 or offset + length > entry.size:
            raise StoreError(f"{file} has {entry.size} bytes; {length} at {offset} is outside it")
        pieces = manifest.file_pieces(f)
        out = bytearray()
        size = manifest.piece_size
        for j in range(offset // size, (offset + length - 1) // size + 1 if length else 0):
            data = self.read_piece(manifest, manifest.pieces[pieces[j]])
            lo = max(offset - j * size, 0)
            hi = min(offset + length - j * size, len(data))
            out += data[lo:hi]
        return bytes(out)

    def range_reader(self, manifest: Manifest, *, cached: int = 2) -> RangeReader:
        """A reader of byte ranges for loading a model: each piece is read and verified
        once while consecutive tensors share it (the last ``cached`` pieces are kept),
        and ``read_into`` copies straight into the caller's buffer."""
        return RangeReader(self, manifest, cached)

    def file_chunks(self, manifest: Manifest, file: str) -> Iterator[bytes]:
        """A whole file, piece by piece, verified (for export and for serving it)."""
        for index in manifest.file_pieces(manifest.file_index(file)):
            yield self.read_piece(manifest, manifest.pieces[index])

    def export(self, manifest: Manifest, dest: Path) -> None:
        """Write the model's original files into ``dest``, byte for byte."""
        for entry in manifest.files:
            target = Path(dest) / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            with tmp.open("wb") as fh:
                for chunk in self.file_chunks(manifest, entry.path):
                    fh.write(chunk)
            tmp.replace(target)

    # ------------------------------------------------------------------ removal

    def remove(self, model_id: str, *, name: str | None = None) -> list[str]:
        """Forget a name (or every name of the model); once no name refers to the model, drop its
        manifest and collect the pieces no other model uses. Returns the names removed."""
        names = self.names()
        removed = [n for n, m in names.items() if m == model_id and (name is None or n == normalize_name(name))]
        for n in removed:
            del names[n]
        atomic_write(self.root / "names.json", json.dumps(names, sort_keys=True, indent=1))
        if model_id not in names.values():
            (self.root / f"{model_id}.json").unlink(missing_ok=True)
            (self.root / f"{model_id}.inplace.json").unlink(missing_ok=True)
            (self.root / f"{model_id}.imported").unlink(missing_ok=True)
            self._manifests.pop(model_id, None)
            self._sources.pop(model_id, None)
            self.collect_garbage()
        return removed

    def collect_garbage(self, keep: Iterable[str] = ()) -> int:
        """Delete pieces no manifest refers to (``keep``: pieces of a fetch in progress)."""
        wanted = set(keep)
        for model_id in self.model_ids():
            try:
                wanted.update(p.digest for p in self.manifest(model_id).pieces)
            except StoreError:
                continue
        dropped = 0
        for piece in list(self.pieces):
            if piece not in wanted:
                self.pieces.remove(piece)
                dropped += 1
        return dropped


class RangeReader:
    """See ModelStore.range_reader. Not thread-safe: one loader at a time."""

    def __init__(self, store: ModelStore, manifest: Manifest, cached: int) -> None:
        self.store, self.manifest, self.cached = store, manifest, max(1, cached)
        self._cache: dict[int, bytes] = {}

    def _piece(self, ref: PieceRef) -> bytes:
        data = self._cache.get(ref.index)
        if data is None:
            data = self.store.read_piece(self.manifest, ref)
            if len(self._cache) >= self.cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[ref.index] = data
        return data

    def read_into(self, file: str, offset: int, buffer: memoryview) -> None:
        f = self.manifest.file_index(file)
        entry = self.manifest.files[f]
        length = len(buffer)
        if offset < 0 or offset + length > entry.size:
            raise StoreError(f"{file} has {entry.size} bytes; {length} at {offset} is outside it")
        size, pieces, done = self.manifest.piece_size, self.manifest.file_pieces(f), 0
        for j in range(offset // size, (offset + length - 1) // size + 1 if length else 0):
            data = memoryview(self._piece(self.manifest.pieces[pieces[j]]))
            lo = max(offset - j * size, 0)
            hi = min(offset + length - j * size, len(data))
            buffer[done : done + hi - lo] = data[lo:hi]
            done += hi - lo

    def __call__(self, file: str, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(file, offset, memoryview(out))
        return bytes(out)
