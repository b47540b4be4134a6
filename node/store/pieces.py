"""Content-addressed pieces on disk: ``pieces/ab/abcd...`` under the data dir, named by sha256.

A piece is written to a temporary file, fsynced and renamed into place only after
its bytes hash to its name, and it is hashed again every time it is read: a piece
damaged on disk is deleted and reported (``CorruptPiece``), never served, so the
caller fetches it again. Identical pieces (zero padding, shared tokenizer files)
are stored once. A write that would leave less than ``reserve`` bytes free on
the disk is refused with a clear error before anything is written.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from node.system.files import atomic_write

__all__ = ["CorruptPiece", "DiskFull", "PieceStore", "StoreError", "digest"]


class StoreError(Exception):
    """A model store problem the user can act on (the message says what)."""


class CorruptPiece(StoreError):
    """A stored piece no longer matches its hash; it has been deleted."""


class DiskFull(StoreError):
    """Not enough free disk for what is about to be written."""


def digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class PieceStore:
    def __init__(self, root: Path, *, reserve: int = 256 * 2**20) -> None:
        self.root = Path(root)
        self.reserve = reserve

    def path(self, piece: str) -> Path:
        return self.root / piece[:2] / piece

    def has(self, piece: str) -> bool:
        return self.path(piece).is_file()

    def read(self, piece: str) -> bytes:
        """The piece's bytes, verified; CorruptPiece (and the file deleted) if they changed."""
        path = self.path(piece)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"piece {piece[:12]} is not in the store") from None
        if digest(data) != piece:
            path.unlink(missing_ok=True)
            raise CorruptPiece(f"piece {piece[:12]} was damaged on disk; it was deleted and will be fetched again")
        return data

    def write(self, piece: str, data: bytes | memoryview) -> None:
        """Store a piece whose bytes must hash to ``piece``."""
        if digest(data) != piece:
            raise CorruptPiece(f"bytes given for piece {piece[:12]} do not hash to it")
        if self.has(piece):
            return
        self.check_space(len(data))
        atomic_write(self.path(piece), bytes(data), mode=0o600)

    def remove(self, piece: str) -> None:
        self.path(piece).unlink(missing_ok=True)

    def check_space(self, nbytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free - nbytes < self.reserve:
            raise DiskFull(
                f"not enough disk space in {self.root}: {nbytes} bytes to write, {free} free, and "
                f"{self.reserve} must stay free; free some space (`nodectl rm` a model) or move the data dir"
            )

    def __iter__(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                for entry in sub.iterdir():
                    if len(entry.name) == 64 and not entry.name.startswith("."):
                        yield entry.name

    def bytes_held(self) -> int:
        return sum(self.path(p).stat().st_size for p in self)

