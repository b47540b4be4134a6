"""A model's manifest, like a .torrent info dict: its files, its tensors, its pieces, its id.

A model is a list of files (config.json, tokenizer files, ``*.safetensors``, ...).
Each file is cut into pieces of ``piece_size`` bytes (the last one shorter) and
each piece is named by its sha256; for every weight file the manifest also lists
where each tensor lies (from the safetensors header), so a node that serves a
range of layers can fetch only the pieces that hold them. The model id is the
sha256 of the manifest's canonical encoding (sorted-key, compact, ASCII JSON):
a manifest received from any peer is checked against the id asked for before
anything in it is used.

Pieces are per file (BitTorrent v2 style): a piece never spans two files, so a
file can be served as verified byte ranges of itself where it lies (``--in-place``)
and exported byte for byte. Pure: bytes in, manifests out.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.safetensors import TensorInfo

__all__ = [
    "MANIFEST_VERSION",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "ManifestError",
    "ManifestFile",
    "PieceRef",
    "build_manifest",
    "check_path",
    "parse_manifest",
]

MANIFEST_VERSION = 1
# A 70B model in 4 MiB pieces is ~35,000 pieces (2.3 MB of hashes) and ~800 tensors.
MAX_MANIFEST_BYTES = 32 * 2**20
MAX_FILES = 4096
MAX_PIECES = 1 << 21
MAX_TENSORS = 1 << 18
MIN_PIECE_SIZE = 16 * 1024
MAX_PIECE_SIZE = 64 * 2**20
_HASH = re.compile(r"^[0-9a-f]{64}$")
_SUMMARY_KEYS = 64


class ManifestError(ValueError):
    """A manifest that cannot be used (the message says why)."""


@dataclass(frozen=True, slots=True)
class ManifestFile:
    path: str  # relative, "/"-separated, checked by check_path
    size: int
    pieces: tuple[str, ...]  # sha256 hex of each piece, in order
    data_start: int | None = None  # a weight file: where its tensor data begins (after the header)


@dataclass(frozen=True, slots=True)
class PieceRef:
    index: int  # in the whole model
    file: int  # index into Manifest.files
    offset: int  # in the file
    length: int
    digest: str


@dataclass(frozen=True)
class Manifest:
    piece_size: int
    files: tuple[ManifestFile, ...]
    tensors: tuple[TensorInfo, ...]
    summary: Mapping[str, Any]  # architecture, layers, parameters... (for listings)
    encoded: bytes
    model_id: str

    @property
    def pieces(self) -> list[PieceRef]:
        out: list[PieceRef] = []
        for f, entry in enumerate(self.files):
            for j, digest in enumerate(entry.pieces):
                offset = j * self.piece_size
                out.append(PieceRef(len(out), f, offset, min(self.piece_size, entry.size - offset), digest))
        return out

    @property
    def num_pieces(self) -> int:
        return sum(len(f.pieces) for f in self.files)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file_index(self, path: str) -> int:
        for i, entry in enumerate(self.files):
            if entry.path == path:
                return i
        raise ManifestError(f"model {self.model_id[:12]} has no file {path!r}")

    def pieces_for_ranges(self, ranges: Iterable[tuple[str, int, int]]) -> set[int]:
        """The pieces that hold the byte ranges ``(file, offset, length)``."""
        first: list[int] = []
        total = 0
        for entry in self.files:
            first.append(total)
            total += len(entry.pieces)
        out: set[int] = set()
        for path, offset, length in ranges:
            f = self.file_index(path)
            if length <= 0:
                continue
            lo, hi = offset // self.piece_size, (offset + length - 1) // self.piece_size
            out.update(first[f] + j for j in range(lo, min(hi, len(self.files[f].pieces) - 1) + 1))
        return out


def check_path(path: Any) -> str:
    """A file path from a manifest, refused unless it is plainly inside the model."""
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise ManifestError(f"bad file path {path!r}")
    parts = path.split("/")
    if (path.startswith("/") or "\\" in path or "\x00" in path
            or any(p in ("", ".", "..") or len(p) > 255 or not p.isprintable() for p in parts)):
        raise ManifestError(f"file path {path!r} is not a plain relative path inside the model")
    return path


def build_manifest(
    files: Iterable[ManifestFile], tensors: Iterable[TensorInfo], *, piece_size: int,
    summary: Mapping[str, Any] | None = None,
) -> Manifest:
    """Encode a manifest canonically and name it by its hash."""
    files = tuple(files)
    by_name = {f.path: i for i, f in enumerate(files)}
    document = {
        "version": MANIFEST_VERSION,
        "piece_size": piece_size,
        "files": [
            {"path": f.path, "size": f.size, "pieces": list(f.pieces), "data_start": f.data_start} for f in files
        ],
        "tensors": [[t.name, by_name[t.file], t.dtype, list(t.shape), t.offset, t.length] for t in tensors],
        "summary": dict(summary or {}),
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return parse_manifest(encoded)


def parse_manifest(data: bytes, *, expected_id: str | None = None) -> Manifest:
    """Check and decode a manifest; with ``expected_id`` it must hash to that model id."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"a manifest is bytes of at most {MAX_MANIFEST_BYTES} bytes")
    model_id = hashlib.sha256(data).hexdigest()
    if expected_id is not None and model_id != expected_id:
        raise ManifestError(f"the manifest hashes to {model_id[:12]}, not to the model id {expected_id[:12]} asked for")
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"the manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"not a version {MANIFEST_VERSION} manifest")
    piece_size = doc.get("piece_size")
    if not isinstance(piece_size, int) or isinstance(piece_size, bool) or not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE:
        raise ManifestError(f"piece size {piece_size!r} is outside {MIN_PIECE_SIZE}..{MAX_PIECE_SIZE}")
    files = _files(doc.get("files"), piece_size)
    tensors = _tensors(doc.get("tensors"), files)
    summary = doc.get("summary")
    if not isinstance(summary, dict) or len(summary) > _SUMMARY_KEYS:
        raise ManifestError("the manifest's summary must be a small map")
    return Manifest(piece_size, files, tensors, summary, bytes(data), model_id)


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _files(entries: Any, piece_size: int) -> tuple[ManifestFile, ...]:
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_FILES:
        raise ManifestError(f"a manifest lists 1 to {MAX_FILES} files")
    out: list[ManifestFile] = []
    seen: set[str] = set()
    pieces = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise ManifestError("a file entry must be a map")
        path = check_path(entry.get("path"))
        if path in seen:
            raise ManifestError(f"file {path!r} is listed twice")
        seen.add(path)
        size = _count(entry.get("size"), f"the size of {path!r}")
        hashes = entry.get("pieces")
        if not isinstance(hashes, list) or len(hashes) != math.ceil(size / piece_size):
            raise ManifestError(f"file {path!r} of {size} bytes needs {math.ceil(size / piece_size)} pieces")
        if not all(isinstance(h, str) and _HASH.match(h) for h in hashes):
            raise ManifestError(f"file {path!r} has a piece hash that is not 64 hex digits")
        data_start = entry.get("data_start")
        if data_start is not None and _count(data_start, f"data_start of {path!r}") > size:
            raise ManifestError(f"data_start of {path!r} is past its end")
        pieces += len(hashes)
        if pieces > MAX_PIECES:
            raise ManifestError(f"a manifest has at most {MAX_PIECES} pieces")
        out.append(ManifestFile(path, size, tuple(hashes), data_start))
    return tuple(out)


def _tensors(entries: Any, files: tuple[ManifestFile, ...]) -> tuple[TensorInfo, ...]:
    if not isinstance(entries, list) or len(entries) > MAX_TENSORS:
        raise ManifestError(f"a manifest lists at most {MAX_TENSORS} tensors")
    out: list[TensorInfo] = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 6:
            raise ManifestError("a tensor entry is [name, file, dtype, shape, offset, length]")
        name, f, dtype, shape, offset, length = entry
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
            raise ManifestError(f"malformed tensor entry {str(entry)[:80]}")
        if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < len(files):
            raise ManifestError(f"tensor {name!r} names file {f!r}, which is not in the manifest")
        dims = tuple(_count(d, f"a dimension of {name!r}") for d in shape)
        begin, size = _count(offset, f"the offset of {name!r}"), _count(length, f"the length of {name!r}")
        if begin + size > files[f].size:
            raise ManifestError(f"tensor {name!r} runs past the end of {files[f].path!r}")
        out.append(TensorInfo(name, files[f].path, dtype, dims, begin, size))
    return tuple(out)
