"""Reading a local GGUF file's header (protocol/gguf.py does the parsing)."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.gguf import MAX_HEADER_BYTES, GGUFHeader, parse_gguf

__all__ = ["read_header"]


def read_header(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> GGUFHeader:
    """The header of the GGUF file at ``path``; GGUFError if it is not a usable one, or if its
    header is over ``max_header_bytes`` (refused before more than that is read)."""
    with Path(path).open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size

        def read(offset: int, length: int) -> bytes:
            fh.seek(offset)
            return fh.read(length)

        return parse_gguf(read, size, Path(path).name, max_header_bytes=max_header_bytes)
