"""Tool calling for both APIs: the tools a request offers, the messages that carry calls and
results back, and the calls found in what the model wrote.

Tools reach the model through its own chat template (the ``tools`` variable that the
templates of Qwen2.5/Qwen3, Llama 3.1+, Mistral and Hermes-style models read); a model
whose template never mentions tools gets a 400 naming the model. The model writes a call
in the format its template teaches, which ``style_of`` reads off the template:

* ``hermes`` (Qwen, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call;
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
* ``json`` (Llama 3.1+): the whole answer is ``{"name": ..., "parameters": {...}}``.

``CallParser`` takes the answer's text as it streams: text before a call goes out at once
(a possible start of a call is held back until it is one or is not), a call is collected
until it ends, and ``finish`` gives the text and the calls. A call naming a function the
request did not offer, or whose JSON does not parse, stays text. Pure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["CallParser", "ToolCall", "ToolError", "chat_messages", "parse_tools", "style_of", "template_knows_tools"]

MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 * 2**10
MAX_CALLS = 64
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's start of a call


class ToolError(ValueError):
    """A request's tools or tool messages are malformed; the text is safe to send back."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """The request's ``tools`` as OpenAI-shaped function specs (Ollama's are the same shape)."""
    if value is None or value == []:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {MAX_TOOLS} functions")
    if len(json.dumps(value)) > MAX_TOOLS_BYTES:
        raise ToolError(f"tools take at most {MAX_TOOLS_BYTES // 1024} KiB")
    out, seen = [], set()
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or _NAME.match(name) is None:
            raise ToolError(f"tools[{i}] needs a name of 1 to 64 letters, digits, _ . : or -")
        if name in seen:
            raise ToolError(f"tool {name!r} is listed twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"tool {name!r}: parameters must be a JSON Schema object")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise ToolError(f"tool {name!r}: description must be a string")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": params}})
    return out


def template_knows_tools(template: str | None) -> bool:
    return template is not None and re.search(r"\btools\b", template) is not None


def style_of(template: str | None) -> str:
    """How the model writes a call, read off its chat template."""
    text = template or ""
    if HERMES_OPEN in text:
        return "hermes"
    if MISTRAL_OPEN in text:
        return "mistral"
    return "json"


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):  # OpenAI sends arguments as a JSON string
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ToolError(f"{where}: arguments must be a JSON object") from None
    if not isinstance(value, dict):
        raise ToolError(f"{where}: arguments must be a JSON object")
    return value


def _content(value: Any, i: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI's content parts: only text ones
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ToolError(f"message {i}: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ToolError(f"message {i}: content must be a string")


def chat_messages(value: Any, *, max_chars: int) -> list[dict[str, Any]]:
    """A request's messages, checked, as chat templates read them: an assistant message's
    ``tool_calls`` with arguments as objects, a tool result with its function's name."""
    if not isinstance(value, list) or not value or len(value) > 4096:
        raise ToolError("messages must be a non-empty list of {role, content}")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # OpenAI call id -> function name
    total = 0
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ToolError("every message needs a string role and content")
        role = m["role"]
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ToolError(f"unknown message role {role[:32]!r}")
        if m.get("images") not in (None, []):
            raise ToolError("images are not supported yet (text models only)")
        if "content" not in m and not m.get("tool_calls"):
            raise ToolError("every message needs a string role and content")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _content(m.get("content"), i)}
        calls = m.get("tool_calls")
        if calls not in (None, []):
            if role != "assistant" or not isinstance(calls, list) or len(calls) > MAX_CALLS:
                raise ToolError(f"message {i}: tool_calls belong to an assistant message (at most {MAX_CALLS})")
            msg["tool_calls"] = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ToolError(f"message {i}: each tool call needs function.name")
                args = _arguments(fn.get("arguments", {}), f"message {i}, call {fn['name'][:64]!r}")
                msg["tool_calls"].append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
                if isinstance(call.get("id"), str):
                    names[call["id"]] = fn["name"]
                    msg["tool_calls"][-1]["id"] = call["id"]
        if role == "tool":
            name = m.get("tool_name") or m.get("name") or names.get(str(m.get("tool_call_id")))
            if name is not None:
                if not isinstance(name, str):
                    raise ToolError(f"message {i}: tool_name must be a string")
                msg["name"] = name
            if isinstance(m.get("tool_call_id"), str):
                msg["tool_call_id"] = m["tool_call_id"]
        total += len(msg["content"])
        out.append(msg)
    if total > max_chars:
        raise ToolError("the messages are too long")
    return out


def _call(value: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or name not in names or not isinstance(args, dict):
        return None
    return ToolCall(name, args)


def _calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls a JSON text holds (an object, or a list of them), None if it holds none."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(v, names) for v in items[:MAX_CALLS]]
    return [c for c in calls if c is not None] if calls and all(calls) else None


class CallParser:
    def __init__(self, style: str, names: set[str]) -> None:
        self.style = style
        self.names = names
        self._held = ""  # text not sent yet: a possible call, or its start
        self._started = False  # what is held is a call being written
        self._sent_any = False

    def feed(self, text: str) -> str:
        """Text that can go out now."""
        self._held += text
        if self._started:
            return ""
        if self.style == "json":
            stripped = self._held.lstrip()
            if not self._sent_any and stripped.startswith(("{", "[", PYTHON_TAG)):
                self._started = True
                return ""
            if not self._sent_any and PYTHON_TAG.startswith(stripped):
                return ""  # blank so far, or the start of Llama's <|python_tag|>
            return self._release(len(self._held))
        tag = HERMES_OPEN if self.style == "hermes" else MISTRAL_OPEN
        at = self._held.find(tag)
        if at >= 0:
            self._started = True
            return self._release(at)
        if self.style == "mistral" and not self._sent_any and self._held.lstrip().startswith("[{"):
            self._started = True  # the [TOOL_CALLS] token itself may be decoded away
            return ""
        keep = next((k for k in range(min(len(tag) - 1, len(self._held)), 0, -1)
                     if tag.startswith(self._held[-k:])), 0)
        return self._release(len(self._held) - keep)

    def _release(self, n: int) -> str:
        if not self._sent_any and not self._held[:n].strip():
            return ""  # only blanks so far: they go out with what follows, or not at all
        out, self._held = self._held[:n], self._held[n:]
        self._sent_any = self._sent_any or bool(out.strip())
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the text still held, the calls) at the end of the answer."""
        held, self._held = self._held, ""
        if not self._started:
            return held, []
        if self.style == "hermes":
            calls: list[ToolCall] = []
            for block in re.findall(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)", held,
                                    flags=re.S)[:MAX_CALLS]:
                found = _calls(block.strip(), self.names)
                if found is None:
                    return held, []
                calls += found
            return ("", calls) if calls else (held, [])
        body = held.strip()
        for prefix in (MISTRAL_OPEN, PYTHON_TAG):
            if body.startswith(prefix):
                body = body[len(prefix):].strip()
        found = _calls(body, self.names)
        return ("", found) if found else (held, [])
