"""Errors of a stage (no JAX here: the worker and the daemon import them at start-up)."""

from __future__ import annotations

__all__ = ["StageBusy", "StageError"]


class StageError(Exception):
    """A step this stage cannot run (the text goes back to the sender)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StageBusy(StageError):
    """Every session slot (or the step queue) of the stage is full."""
