"""A stage that only embeds: an encoder model (BERT) loaded whole on this node.

It answers ``embed`` steps that carry a whole input (an encoder attends in both
directions, so a vector needs every token at once): the vector comes back at once and
nothing is kept, so there are no sessions, no slots to free and no cache. Any other
step is refused ``bad_step`` saying the model only embeds. It has the face of
``StageRunner`` that the worker uses (submit, sessions, free, sweep, start, close).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from node.pipeline.stage import StageResult
from node.pipeline.stage_errors import StageBusy, StageError
from protocol.pipeline import Step

__all__ = ["EncoderRunner"]


class EncoderRunner:
    is_first = True
    is_last = True

    def __init__(self, partition: Any, *, slots: int, executor: ThreadPoolExecutor, session_idle: float,
                 clock: Callable[[], float] = time.monotonic, owner_cap: Callable[[str], int] | None = None) -> None:
        """``partition``: a node.engine.bert.BertEncoder (config, max_context, embed)."""
        del session_idle  # nothing is kept between steps
        self.partition = partition
        self.slots = slots
        self.sessions: dict[str, Any] = {}  # always empty: a step leaves nothing behind
        self._executor = executor
        self._clock = clock
        self.owner_cap = owner_cap or (lambda _owner: slots)
        self._waiting = 0
        self.steps_run = 0
        self.used_at = clock()

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def free(self, session: str, owner: str | None = None) -> bool:
        return False

    def sweep(self) -> list[str]:
        return []

    def owned_by(self, owner: str) -> int:
        return 0

    async def submit(self, step: Step, owner: str = "") -> StageResult:
        self.used_at = self._clock()
        if step.kind != "embed":
            raise StageError("bad_step", "this model is an embedding model: it only embeds (no text generation)")
        if step.start != 0 or not step.last:
            raise StageError("bad_step", "an encoder embeds a whole input in one step (start 0, last)")
        if self._waiting >= 4 * self.slots:
            raise StageBusy("busy", "too many inputs waiting at this stage")
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            try:
                out = await loop.run_in_executor(self._executor, self.partition.embed, [step.inputs])
            except Exception as exc:  # an engine failure: fail this step, keep serving
                raise StageError("engine_error", f"the engine failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._waiting -= 1
        self.steps_run += 1
        return StageResult(embedding=np.asarray(out[0], np.float32))
