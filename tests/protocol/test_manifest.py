"""protocol/manifest.py and protocol/safetensors.py: manifests and headers, every bad input refused."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from protocol.manifest import (
    ManifestError,
    ManifestFile,
    build_manifest,
    check_path,
    parse_manifest,
)
from protocol.safetensors import SafetensorsError, TensorInfo, parse_header

PIECE = 16 * 1024


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_of(files: dict[str, bytes], tensors: list[TensorInfo] = ()) -> object:  # type: ignore[assignment]
    entries = []
    for path, data in files.items():
        pieces = tuple(h(data[i : i + PIECE]) for i in range(0, len(data), PIECE))
        entries.append(ManifestFile(path, len(data), pieces))
    return build_manifest(entries, tensors, piece_size=PIECE, summary={"architecture": "X"})


def test_round_trip_id_and_pieces() -> None:
    m = manifest_of({"config.json": b"{}", "w.safetensors": b"x" * (PIECE * 2 + 5)},
                    [TensorInfo("t", "w.safetensors", "F32", (2,), 8, 8)])
    again = parse_manifest(m.encoded, expected_id=m.model_id)  # type: ignore[attr-defined]
    assert again == m and m.model_id == h(m.encoded)  # type: ignore[attr-defined]
    assert [p.length for p in again.pieces] == [2, PIECE, PIECE, 5]
    assert again.pieces_for_ranges([("w.safetensors", PIECE - 1, 2)]) == {1, 2}
    assert again.pieces_for_ranges([("config.json", 0, 2)]) == {0}
    with pytest.raises(ManifestError, match="not to the model id"):
        parse_manifest(m.encoded, expected_id="0" * 64)  # type: ignore[attr-defined]


def test_pieces_are_built_once_and_found_by_index_or_path() -> None:
    """The piece list was rebuilt on every use: 0.8 s for a 480k-piece manifest, on every
    piece a peer asked for. Now it is made once; a piece is found by index, in any file
    (empty files included), without building the others."""
    m = manifest_of({"empty": b"", "a": b"a" * (PIECE + 1), "also-empty": b"", "b": b"b" * 3, "c": b"c" * PIECE})
    pieces = m.pieces  # type: ignore[attr-defined]
    assert pieces is m.pieces and len(pieces) == m.num_pieces == 4  # type: ignore[attr-defined]
    listed = list(pieces)
    assert [pieces[i] for i in range(4)] == listed and pieces[-1] == listed[3] and pieces[1:3] == listed[1:3]
    assert [(p.file, p.offset, p.length) for p in listed] == [(1, 0, PIECE), (1, PIECE, 1), (3, 0, 3), (4, 0, PIECE)]
    assert [p.digest for p in listed] == [h(b"a" * PIECE), h(b"a"), h(b"bbb"), h(b"c" * PIECE)]
    assert list(m.file_pieces(m.file_index("a"))) == [0, 1] and not m.file_pieces(m.file_index("empty"))  # type: ignore[attr-defined]
    with pytest.raises(IndexError):
        pieces[4]
    with pytest.raises(ManifestError, match="no file 'nope'"):
        m.file_index("nope")  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../b", "a//b", "a\\b", "", ".", "a/./b", "x\x00"])
def test_paths_must_stay_inside_the_model(path: str) -> None:
    with pytest.raises(ManifestError):
        check_path(path)
    assert check_path("sub/dir/config.json") == "sub/dir/config.json"


def _doc(**change: object) -> bytes:
    doc: dict[str, object] = {"version": 1, "piece_size": PIECE, "summary": {},
                              "files": [{"path": "a", "size": 3, "pieces": [h(b"abc")], "data_start": None}],
                              "tensors": []}
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not json", "not valid JSON"),
        (_doc(version=2), "version 1"),
        (_doc(piece_size=10), "piece size"),
        (_doc(files=[]), "1 to"),
        (_doc(files=[{"path": "a", "size": 3, "pieces": []}]), "needs 1 pieces"),
        (_doc(files=[{"path": "a", "size": 3, "pieces": ["zz"]}]), "64 hex"),
        (_doc(files=[{"path": "../a", "size": 3, "pieces": [h(b"abc")]}]), "plain relative"),
        (_doc(tensors=[["t", 0, "F32", [1], 0, 99]]), "past the end"),
        (_doc(tensors=[["t", 5, "F32", [1], 0, 1]]), "not in the manifest"),
    ],
)
def test_bad_manifests_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        parse_manifest(data)


def _st(header: dict[str, object], data_len: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_len


def test_safetensors_header_parsed_with_absolute_offsets() -> None:
    blob = _st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}, "__metadata__": {}}, 16)
    found = parse_header(blob, "w.safetensors", len(blob))
    base = len(blob) - 16
    assert found["a"] == TensorInfo("a", "w.safetensors", "F32", (2,), base, 8)
    assert found["b"].offset == base + 8


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 2**40), "implausible"),
        (struct.pack("<Q", 500) + b"{}", "past the end"),
        (_st({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8), "past the end"),
        (_st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8), "does not match"),
        (_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12), "overlap"),
        (struct.pack("<Q", 3) + b"abc", "not valid JSON"),
        (_st({"a": {"dtype": "F32"}}, 0), "malformed"),
    ],
)
def test_broken_headers_name_the_problem(blob: bytes, match: str) -> None:
    with pytest.raises(SafetensorsError, match=match):
        parse_header(blob, "w.safetensors", len(blob))
