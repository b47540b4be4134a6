"""atomic_write: the one way a file is replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node.system.files import atomic_write


def test_writes_replaces_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "secret"
    atomic_write(target, "one\n", mode=0o600)
    assert target.read_text() == "one\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret"]  # no temp files left


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.toml"
    atomic_write(target, "old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
