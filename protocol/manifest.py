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
and exported byte for byte.

A manifest comes from any member, so its cost is proportional to its bytes and
bounded by them: it is at most ``MAX_MANIFEST_BYTES``, parsed in one pass, and the
piece list, each file's first piece and the index of paths are built once, when the
manifest is (a node receiving a peer's manifest parses it off its event loop), so
every lookup after that (a piece by index, a file by path) is O(1). Which sizes of
files a node will fetch is protocol/model_limits.py. Pure: bytes in, manifests out.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from protocol.safetensors import TensorInfo

__all__ = [
    "MANIFEST_VERSION",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "ManifestError",
    "ManifestFile",
    "PieceList",
    "PieceRef",
    "build_manifest",
    "check_path",
    "parse_manifest",
]

MANIFEST_VERSION = 1
# A 70B model in 4 MiB pieces is ~35,000 pieces (2.3 MB of hashes) and ~800 tensors.
MAX_MANIFEST_BYTES = 32 * 2**20
MAX_FILES = 4096
# What MAX_MANIFEST_BYTES of hashes can hold (67 bytes a piece); a 1 TB model in 4 MiB
# pieces is 250k.
MAX_PIECES = 1 << 19
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


class PieceList(Sequence[PieceRef]):
    """A model's pieces in order, each made when it is asked for: by index in O(log files)
    (a bisection of each file's first piece), and no object kept per piece (half a million
    of them took 0.6 s to build, most of it the garbage collector's)."""

    __slots__ = ("_files", "_first", "_size")

    def __init__(self, files: tuple[ManifestFile, ...], first: tuple[int, ...], piece_size: int) -> None:
        self._files, self._first, self._size = files, first, piece_size

    def __len__(self) -> int:
        return self._first[-1]

    @overload
    def __getitem__(self, index: int) -> PieceRef: ...
    @overload
    def __getitem__(self, index: slice) -> list[PieceRef]: ...
    def __getitem__(self, index: int | slice) -> PieceRef | list[PieceRef]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        count = self._first[-1]
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"piece {index} of {count}")
        # The last file that starts at or before the piece (files without pieces share a start).
        f = bisect_right(self._first, index, 0, len(self._files)) - 1
        return self._ref(index, f, index - self._first[f])

    def __iter__(self) -> Iterator[PieceRef]:
        index = 0
        for f, entry in enumerate(self._files):
            for j in range(len(entry.pieces)):
                yield self._ref(index, f, j)
                index += 1

    def _ref(self, index: int, f: int, j: int) -> PieceRef:
        entry, offset = self._files[f], j * self._size
        return PieceRef(index, f, offset, min(self._size, entry.size - offset), entry.pieces[j])


@dataclass(frozen=True)
class Manifest:
    piece_size: int
    files: tuple[ManifestFile, ...]
    tensors: tuple[TensorInfo, ...]
    summary: Mapping[str, Any]  # architecture, layers, parameters... (for listings)
    encoded: bytes
    model_id: str
    # Derived once in __post_init__ (see the module's docstring), never compared.
    pieces: PieceList = field(init=False, repr=False, compare=False)
    total_size: int = field(init=False, repr=False, compare=False)
    _first: tuple[int, ...] = field(init=False, repr=False, compare=False)  # each file's first piece, and the count
    _paths: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        first = [0]
        for entry in self.files:
            first.append(first[-1] + len(entry.pieces))
        object.__setattr__(self, "_first", tuple(first))
        object.__setattr__(self, "pieces", PieceList(self.files, self._first, self.piece_size))
        object.__setattr__(self, "total_size", sum(f.size for f in self.files))
        object.__setattr__(self, "_paths", {f.path: i for i, f in enumerate(self.files)})

    @property
    def num_pieces(self) -> int:
        return len(self.pieces)

    def file_index(self, path: str) -> int:
        index = self._paths.get(path)
        if index is None:
            raise ManifestError(f"model {self.model_id[:12]} has no file {path!r}")
        return index

    def file_pieces(self, f: int) -> range:
        """The indices (in the whole model) of file ``f``'s pieces, in order."""
        return range(self._first[f], self._first[f + 1])

    def pieces_for_ranges(self, ranges: Iterable[tuple[str, int, int]]) -> set[int]:
        """The pieces that hold the byte ranges ``(file, offset, length)``."""
        out: set[int] = set()
        for path, offset, length in ranges:
            f = self.file_index(path)
            if length <= 0:
                continue
            lo, hi = offset // self.piece_size, (offset + length - 1) // self.piece_size
            out.update(self._first[f] + j for j in range(lo, min(hi, len(self.files[f].pieces) - 1) + 1))
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
