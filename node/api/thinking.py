"""Reasoning models' ``<think>...</think>``: the reasoning apart from the answer.

DeepSeek-R1 distills and Qwen3 write their reasoning between ``<think>`` and
``</think>`` before the answer; some chat templates open the block themselves (the
prompt ends in ``<think>``), so the output holds only the closing tag. A splitter is
fed the decoded text as it streams and hands back (thinking, content) pieces; a tag
cut between two pieces is held back until it is whole. Only a block at the very start
of the answer (after whitespace) is reasoning, as Ollama's parser has it; a ``<think>``
later in the text is just text.
"""

from __future__ import annotations

__all__ = ["CLOSE", "OPEN", "ThinkSplitter", "opens_thinking", "split_piece"]

OPEN, CLOSE = "<think>", "</think>"


def opens_thinking(prompt_text: str) -> bool:
    """True when the rendered prompt leaves a reasoning block open for the model to close."""
    text = prompt_text.rstrip()
    return text.endswith(OPEN) and not text.endswith(CLOSE)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ThinkSplitter:
    """Streamed text -> (thinking, content): the text less the tags and the whitespace around them."""

    def __init__(self, *, thinking: bool = False) -> None:
        self._state = "thinking" if thinking else "start"
        self._held = ""

    @property
    def thinking(self) -> bool:
        return self._state == "thinking"

    def push(self, text: str) -> tuple[str, str]:
        held = self._held + text
        thinking, content = "", ""
        while True:
            if self._state == "start":
                head = held.lstrip()
                if not head or (OPEN.startswith(head) and len(head) < len(OPEN)):
                    break  # only whitespace, or maybe the start of "<think>": wait for more
                if head.startswith(OPEN):
                    held, self._state = head[len(OPEN):], "thinking"
                else:
                    self._state = "content"
            elif self._state == "thinking":
                at = held.find(CLOSE)
                if at < 0:
                    keep = _partial_suffix(held, CLOSE)
                    thinking += held[: len(held) - keep]
                    held = held[len(held) - keep:]
                    break
                thinking += held[:at]
                held, self._state = held[at + len(CLOSE):], "after"
            elif self._state == "after":  # the whitespace between the reasoning and the answer
                held = held.lstrip()
                if not held:
                    break
                self._state = "content"
            else:
                content += held
                held = ""
                break
        self._held = held
        return thinking, content

    def flush(self) -> tuple[str, str]:
        """What is still held back when the text ends."""
        held, self._held = self._held, ""
        if self._state == "thinking":
            return held, ""
        return "", "" if self._state == "after" else held


def split_piece(splitter: ThinkSplitter | None, text: str, last: bool = False) -> tuple[str, str]:
    """(content, reasoning) of one streamed piece (``last``: and what was held back);
    without a splitter, the text as generated."""
    if splitter is None:
        return text, ""
    reasoning, content = splitter.push(text)
    if last:
        more_reasoning, more = splitter.flush()
        reasoning, content = reasoning + more_reasoning, content + more
    return content, reasoning
