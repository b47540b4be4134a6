"""What a request asks the answer to follow, as a grammar the tail samples within.

Ollama's ``format`` (``"json"`` or a JSON schema), OpenAI's ``response_format``
(``json_object``, or ``json_schema`` with its ``schema``) and ``tool_choice`` that must
call (``required`` or a named function) each become an llguidance grammar: the tail
(node/pipeline/grammar.py) masks every token the grammar does not allow, so the answer
always parses and follows the schema, and a forced tool call always names an offered
function with arguments that match its parameters. JSON is written with fixed separators
(``", "`` and ``": "``, no other whitespace): a model left free to add whitespace may add
it forever. A schema is checked here, before any node does work: one llguidance cannot
follow is a 400 that says why.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from node.pipeline.grammar import parser_limits

__all__ = ["FormatError", "check", "json_grammar", "ollama_format", "openai_format", "tool_grammar"]

MAX_SCHEMA_BYTES = 256 * 2**10
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class FormatError(ValueError):
    """A format the answer cannot be held to; the text is safe to send back."""


def _schema(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what} must be a JSON schema (an object)")
    try:
        size = len(json.dumps(value))
    except (TypeError, ValueError):
        raise FormatError(f"{what} must be a JSON schema (an object)") from None
    if size > MAX_SCHEMA_BYTES:
        raise FormatError(f"{what} takes at most {MAX_SCHEMA_BYTES // 1024} KiB")
    return value


def json_grammar(schema: dict[str, Any]) -> str:
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_STYLE))  # type: ignore[arg-type]
    except ValueError as exc:
        raise FormatError(f"not a JSON schema: {exc}") from None


def check(grammar: str, what: str) -> str:
    """``grammar`` when llguidance can follow it; FormatError naming ``what`` otherwise.
    Compiling a large schema takes a while (llguidance lets go of the GIL): call it in a thread."""
    error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=parser_limits())
    if error:
        raise FormatError(f"{what} cannot be followed: {error.strip()[:400]}")
    return grammar


def ollama_format(value: Any) -> str | None:
    """Ollama's ``format``: "json" (any JSON object) or a JSON schema; None when absent."""
    if value in (None, ""):
        return None
    if value == "json":
        return json_grammar(ANY_OBJECT)
    if isinstance(value, str):
        raise FormatError('format must be "json" or a JSON schema')
    return json_grammar(_schema(value, "format"))


def openai_format(value: Any) -> str | None:
    """OpenAI's ``response_format``; None for text or when absent."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(ANY_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise FormatError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        if not isinstance(spec.get("strict", False), bool) and spec.get("strict") is not None:
            raise FormatError("response_format json_schema.strict must be true or false")
        return json_grammar(_schema(spec.get("schema", ANY_OBJECT), "response_format json_schema.schema"))
    raise FormatError('response_format type must be "text", "json_object" or "json_schema"')


def tool_grammar(tools: list[dict[str, Any]], style: str, only: str | None = None) -> str:
    """A grammar for one call of ``tools`` (just ``only`` when named) in the words the
    model's template teaches (node/api/tools.py's styles), its arguments following the
    function's parameters."""
    chosen = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    if not chosen:
        raise FormatError(f"tool_choice names {only!r}, which is not among the request's tools")
    key = "parameters" if style == "json" else "arguments"
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
                       "required": ["name", key], "additionalProperties": False} for f in chosen],
            "x-guidance": _JSON_STYLE}
    body = "%json " + json.dumps(call)
    if style == "hermes":
        lark = f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {body}\n'
    elif style == "mistral":
        lark = f'start: "[" call "]"\ncall: {body}\n'
    else:
        lark = f"start: call\ncall: {body}\n"
    return str(llguidance.LLMatcher.grammar_from_lark(lark))
