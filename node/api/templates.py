"""Chat templates rendered off the event loop, in a renderer process, under a budget.

A model's chat template comes from whoever published the model. ``TemplateRenderer`` sends
each render to one small persistent process (node/engine/chat_template.py: no JAX, no
tokenizer, its address space and CPU seconds capped by the kernel) and waits for the answer
without blocking the loop. A template that goes past the budget (``RENDER_SECONDS`` of wall
time, ``MEMORY_MIB`` of memory, ``max_output`` characters, or the size checks on ``+``,
``*``, ``**`` and ``range``) is refused with a message that names the model and the budget;
on a timeout the process is killed and a fresh one starts with the next render. The verdict
is kept per template for ``VERDICT_SECONDS`` so the model's next requests fail at once, and
logged once. A request whose messages are large (over ``BLAME_INPUT_CHARS``) that goes past
the budget is refused alone: its size, not the template, may be the cause.

Why a process and not a thread: a thread cannot be stopped, and the sandbox cannot bound
what C code does in one call (a ``'%0*d'`` format, a 2**n loop of string doublings); the
kernel can. A render costs a round trip over a pipe (measured in scripts/bench_templates.py).

The settings are module constants for now (node/config_schema.py is not this module's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from node.engine.chat_template import template_key

__all__ = ["Budget", "RenderError", "TemplateOverBudget", "TemplateRenderer", "Verdicts"]

log = structlog.get_logger("enjambre.api")

RENDER_SECONDS = 2.0
MEMORY_MIB = 256
OUTPUT_FLOOR_CHARS = 2**20
OUTPUT_PER_INPUT_CHAR = 4
VERDICT_SECONDS = 600.0
BLAME_INPUT_CHARS = 64 * 2**10
START_SECONDS = 30.0  # importing jinja2 on a loaded machine
_HEADER = struct.Struct(">I")
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the node package
_BOOT = f"import sys; sys.path.insert(0, {_ROOT!r}); from node.engine.chat_template import main; main()"


class RenderError(Exception):
    """A chat template could not render these messages (the text says why, for the user)."""


class TemplateOverBudget(RenderError):
    """A chat template went past its budget, now or recently."""


@dataclass(frozen=True)
class Budget:
    seconds: float = RENDER_SECONDS
    memory_mib: int = MEMORY_MIB
    output_floor: int = OUTPUT_FLOOR_CHARS
    output_per_input_char: int = OUTPUT_PER_INPUT_CHAR
    verdict_seconds: float = VERDICT_SECONDS
    blame_input_chars: int = BLAME_INPUT_CHARS

    def max_output(self, input_chars: int) -> int:
        return self.output_floor + self.output_per_input_char * input_chars

    def describe(self, input_chars: int) -> str:
        return (f"{self.seconds:g} s, {self.memory_mib} MiB of memory and "
                f"{self.max_output(input_chars) / 2**20:.1f} M characters of output")


class Verdicts:
    """Templates refused lately: template key -> why, until it expires (a bounded map)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic,
                 kept: int = 256) -> None:
        self._seconds, self._clock, self._kept = seconds, clock, kept
        self._refused: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str) -> str | None:
        entry = self._refused.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._refused[key]
            return None
        return entry[0]

    def record(self, key: str, reason: str) -> None:
        self._refused[key] = (reason, self._clock() + self._seconds)
        self._refused.move_to_end(key)
        while len(self._refused) > self._kept:
            self._refused.popitem(last=False)


class _Stopped(Exception):
    """The renderer process did not answer in time, or died."""


class _Renderer:
    """One renderer process and the pipe to it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._in, self._out = proc.stdin, proc.stdout

    @classmethod
    async def start(cls, memory_mib: int) -> _Renderer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", _BOOT, str(os.getpid()), str(memory_mib * 2**20),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        renderer = cls(proc)
        try:
            async with asyncio.timeout(START_SECONDS):
                ready = await renderer.read(1024)
        except (TimeoutError, _Stopped):
            await renderer.stop()
            raise RuntimeError(f"the chat template renderer did not start within {START_SECONDS:g} s "
                               f"(exit code {proc.returncode})") from None
        if not isinstance(ready, dict) or "ready" not in ready:
            await renderer.stop()
            raise RuntimeError(f"the chat template renderer said {str(ready)[:200]!r} when it started")
        return renderer

    async def read(self, max_bytes: int) -> Any:
        try:
            (size,) = _HEADER.unpack(await self._out.readexactly(_HEADER.size))
            if size > max_bytes:  # checked before it is read: the process is not trusted
                raise _Stopped(f"the renderer sent {size} bytes, more than the {max_bytes} allowed")
            data = await self._out.readexactly(size)
            return json.loads(data.decode("utf-8", "surrogatepass"))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Stopped("the renderer process died") from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Stopped(f"the renderer sent a broken answer: {exc}") from exc

    async def ask(self, request: bytes, max_reply_bytes: int) -> Any:
        try:
            self._in.write(_HEADER.pack(len(request)) + request)
            await self._in.drain()
        except ConnectionError as exc:
            raise _Stopped("the renderer process died") from exc
        return await self.read(max_reply_bytes)

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


class TemplateRenderer:
    """Renders chat templates in a renderer process, one at a time, under `budget`."""

    def __init__(self, budget: Budget | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget or Budget()
        self.verdicts = Verdicts(self.budget.verdict_seconds, clock)
        self._renderer: _Renderer | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        """The renderer process's id while one runs."""
        return None if self._renderer is None else self._renderer.proc.pid

    async def render(self, model: str, template: str, variables: dict[str, Any]) -> str:
        """The text `template` renders from `variables`.

        Raises TemplateOverBudget when it goes past the budget (or did lately), RenderError
        when the template fails on these messages, RuntimeError when no renderer can start.
        """
        key = template_key(template)
        self._refuse_if_judged(model, key)
        payload = json.dumps(variables, ensure_ascii=False)
        max_output = self.budget.max_output(len(payload))
        request = (f'{{"variables": {payload}, "template": {json.dumps(template, ensure_ascii=False)}, '
                   f'"max_output": {max_output}, "seconds": {self.budget.seconds!r}}}')
        async with self._lock:
            self._refuse_if_judged(model, key)  # a request queued behind the one that overran
            answer = await self._exchange(request.encode("utf-8", "surrogatepass"), max_output)
        if isinstance(answer.get("text"), str):
            return str(answer["text"])
        if "error" in answer:
            raise RenderError(str(answer["error"]))
        reason = str(answer.get("budget", f"the renderer answered {str(answer)[:200]!r}"))
        if len(payload) > self.budget.blame_input_chars:
            raise TemplateOverBudget(self._refusal(model, reason, len(payload), "alone"))
        self.verdicts.record(key, reason)
        log.warning("chat template over budget; refusing it", model=model, template=key[:16],
                    reason=reason, budget=self.budget.describe(len(payload)),
                    refused_s=self.budget.verdict_seconds)
        raise TemplateOverBudget(self._refusal(model, reason, len(payload), "now"))

    def _refuse_if_judged(self, model: str, key: str) -> None:
        reason = self.verdicts.get(key)
        if reason is not None:
            raise TemplateOverBudget(self._refusal(model, reason, 0, "earlier"))

    async def _exchange(self, request: bytes, max_output: int) -> dict[str, Any]:
        """The renderer's answer; a renderer that went past the budget or died is stopped
        (the next render starts another) and the answer says why."""
        if self._renderer is None:
            self._renderer = await _Renderer.start(self.budget.memory_mib)
        renderer = self._renderer
        try:
            async with asyncio.timeout(self.budget.seconds):
                answer = await renderer.ask(request, 6 * max_output + 4096)
            if isinstance(answer, dict) and "budget" not in answer:
                return answer
            # a process that reached a bound may keep the memory it reached: start afresh
            failed = (str(answer["budget"]) if isinstance(answer, dict)
                      else f"the renderer answered {str(answer)[:200]!r}")
        except TimeoutError:
            failed = f"it did not finish within {self.budget.seconds:g} s"
        except _Stopped as exc:
            failed = str(exc)
        except BaseException:  # cancelled mid-exchange: the pipe is out of step
            self._renderer = None
            await asyncio.shield(renderer.stop())
            raise
        self._renderer = None
        await renderer.stop()
        code = renderer.proc.returncode
        return {"budget": failed if code in (None, -9) else f"{failed} (exit code {code})"}

    def _refusal(self, model: str, reason: str, input_chars: int, when: str) -> str:
        """The user's message: `when` is "now", "earlier" (a kept verdict) or "alone" (these
        messages were large, so only this request is refused)."""
        head = f"model {model!r}: its chat template went past its budget"
        if when == "alone":
            return (f"{head} ({self.budget.describe(input_chars)}) on these {input_chars} characters "
                    f"of messages: {reason}; send fewer or shorter messages")
        budget = "" if when == "earlier" else f" ({self.budget.describe(input_chars)})"
        return (f"{head}{budget} {when}: {reason}. The template is refused for "
                f"{self.budget.verdict_seconds / 60:g} min after that; it comes with the model, so ask "
                'its publisher for a fixed one, or send raw prompts (/api/generate with "raw": true)')

    async def close(self) -> None:
        """Stop the renderer process (the next render starts another)."""
        async with self._lock:
            renderer, self._renderer = self._renderer, None
        if renderer is not None:
            await renderer.stop()
