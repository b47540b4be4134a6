"""Starting a handler coroutine inside the current callback (eager task start).

A handler that does not block finishes right there, without an extra trip
through the event loop; only one that waits gets a Task. Python 3.12 has this
built in (``eager_start``); on 3.11 the coroutine is advanced by hand to its
first suspension and a Task continues it from there.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["EAGER", "start_eager"]

EAGER = sys.version_info >= (3, 12)


class _Resume:
    """Awaitable that continues a coroutine already advanced to its first suspension."""

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, None]:
        coro, yielded = self._coro, self._yielded
        while True:
            # Hand what the coroutine yielded (a future) to the Task driving us,
            # and pass the Task's wake-up (or exception) back in: `yield from`
            # for a coroutine that was started elsewhere.
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    yielded = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration:
                    return


async def _finish(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    await _Resume(coro, yielded)


def start_eager(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro`` now up to its first wait; the Task that finishes it, or None if it is done."""
    if EAGER:
        task: asyncio.Task[None] = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
        if task.done():
            return None
        return task
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_finish(coro, yielded))
