"""The safetensors header: where each tensor of a file lies, checked against the file's size.

A safetensors file is ``u64 little-endian header length | JSON header | data``; the
header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
relative to the data. ``parse_header`` takes the first bytes of the file (the
caller reads ``8 + header length`` of them) and the file's size, and returns
every tensor with absolute byte offsets, or raises :class:`SafetensorsError`
naming what is wrong: a header longer than the format's 100 MB, not JSON, an
entry of the wrong shape, a range that runs past the end of the file or
disagrees with its dtype and shape, tensors that overlap. Pure: bytes in, tensors
out; the manifest, the store and the engine all read headers through it.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["DTYPE_SIZES", "MAX_HEADER_BYTES", "SafetensorsError", "TensorInfo", "header_length", "parse_header"]

# The format's own reference implementation refuses headers over 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


class SafetensorsError(ValueError):
    """A file that is not a usable safetensors file (the message says why)."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


def header_length(first8: bytes, file_name: str, file_size: int | None) -> int:
    """The JSON header's length from the file's first 8 bytes, checked.

    file_size None: a reader that does not know it (the engine reading byte ranges);
    the checks against the file's end are then left to the reads themselves.
    """
    if len(first8) < 8 or (file_size is not None and file_size < 8):
        raise SafetensorsError(f"{file_name}: too short to be a safetensors file ({file_size} bytes)")
    (length,) = struct.unpack("<Q", first8[:8])
    if length > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{file_name}: a safetensors header of {length} bytes is implausible")
    if file_size is not None and 8 + length > file_size:
        raise SafetensorsError(
            f"{file_name}: the header says it is {length} bytes, past the end of the {file_size}-byte file "
            "(truncated download?)"
        )
    return int(length)


def parse_header(data: bytes, file_name: str, file_size: int | None) -> dict[str, TensorInfo]:
    """Every tensor of one file from its first ``8 + header length`` bytes."""
    length = header_length(data, file_name, file_size)
    if len(data) < 8 + length:
        raise SafetensorsError(f"{file_name}: only {len(data)} bytes of an {8 + length}-byte header given")
    try:
        header = json.loads(data[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SafetensorsError(f"{file_name}: the safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{file_name}: the safetensors header should be a JSON object")
    base = 8 + length
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor(name, meta, file_name, base, file_size)
    spans = sorted((t.offset, t.offset + t.length, t.name) for t in out.values())
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise SafetensorsError(f"{file_name}: tensors {first!r} and {second!r} overlap")
    return out


def _tensor(name: str, meta: Any, file_name: str, base: int, file_size: int | None) -> TensorInfo:
    try:
        dtype = meta["dtype"]
        shape = tuple(meta["shape"])
        begin, end = meta["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{file_name}: malformed header entry for {name!r}") from None
    ints = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, begin, end))
    if not isinstance(dtype, str) or not ints or end < begin:
        raise SafetensorsError(f"{file_name}: malformed header entry for {name!r}")
    if file_size is not None and base + end > file_size:
        raise SafetensorsError(
            f"{file_name}: tensor {name!r} ends at byte {base + end}, past the end of the "
            f"{file_size}-byte file (truncated download?)"
        )
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is not None and end - begin != itemsize * math.prod(shape):
        raise SafetensorsError(f"{file_name}: tensor {name!r}: byte length does not match its shape and dtype")
    return TensorInfo(name, file_name, dtype, shape, base + begin, end - begin)
