"""Reading a local GGUF file's header (protocol/gguf.py does the parsing)."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.gguf import GGUFHeader, parse_gguf

__all__ = ["read_header"]


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """The header of the GGUF file at ``path``; GGUFError if it is not a usable one."""
    with Path(path).open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size

        def read(offset: int, length: int) -> bytes:
            fh.seek(offset)
            return fh.read(length)

        return parse_gguf(read, size, Path(path).name)
