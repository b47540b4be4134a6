"""The data dir's two daemon files: the lock that gives one data dir one daemon, and the runtime file.

``DataDirLock`` is a ``flock`` on ``daemon.lock``: the kernel releases it when a
daemon dies, so a crash never leaves a stale lock. ``daemon.json`` holds what a
running daemon knows about itself that the config may not say (the ports it got
when the config asked for port 0); the CLI, the demo and the tests read it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from node.system.files import atomic_write

__all__ = ["LOCK_FILE", "RUNTIME_FILE", "DataDirLock", "LockedError", "read_runtime", "remove_runtime", "write_runtime"]

LOCK_FILE = "daemon.lock"
RUNTIME_FILE = "daemon.json"


class LockedError(Exception):
    """Another daemon holds the data dir (the message says what to do)."""


class DataDirLock:
    """An exclusive lock on the data dir, so two daemons never share one."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LockedError(
                f"another enjambre daemon (pid {other}) is already running with data dir "
                f"{self.path.parent}; stop it first (`systemctl stop enjambre` or kill {other}), "
                "or give this one its own config and data dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_runtime(data_dir: Path, data: dict[str, Any]) -> None:
    atomic_write(Path(data_dir) / RUNTIME_FILE, json.dumps(data))


def read_runtime(data_dir: Path) -> dict[str, Any] | None:
    """What a running daemon wrote about itself (actual ports when the config said 0)."""
    try:
        data = json.loads((Path(data_dir) / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_runtime(data_dir: Path) -> None:
    (Path(data_dir) / RUNTIME_FILE).unlink(missing_ok=True)
