"""node/api/tools.py on its own: the tools a request offers, the messages that carry calls and
results back into a chat template, and the calls parsed from what models really write
(Qwen2.5's Hermes blocks, Llama 3.1's bare JSON, Mistral's [TOOL_CALLS]), fed in pieces as
they stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.api.tools import (
    CallParser,
    ToolCall,
    ToolError,
    chat_messages,
    parse_tools,
    style_of,
    template_knows_tools,
)
from tests.helpers.chat_templates import LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, QWEN2_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NAMES = {"get_weather", "get_time"}


def _feed(parser: CallParser, text: str, size: int) -> tuple[str, list[ToolCall]]:
    """What a client sees: the text let out piece by piece, then what finish gives."""
    out = "".join(parser.feed(text[i:i + size]) for i in range(0, len(text), size))
    rest, calls = parser.finish()
    return out + rest, calls


def test_styles_are_read_off_the_templates() -> None:
    assert style_of(QWEN2_TEMPLATE) == "hermes"
    assert style_of(MISTRAL_TEMPLATE) == "mistral"
    assert style_of(LLAMA3_TEMPLATE) == "json"
    assert all(template_knows_tools(t) for t in (QWEN2_TEMPLATE, MISTRAL_TEMPLATE, LLAMA3_TEMPLATE))
    assert not template_knows_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_knows_tools(None)


# What the models wrote (recorded from Qwen2.5-Instruct, Llama-3.1/3.2-Instruct and
# Mistral-7B-Instruct-v0.3 asked for Paris's weather; special tokens already decoded away).
RECORDED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', ""),
    ("hermes", 'I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>',
     "I will look it up.\n"),
    ("json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    ("json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    ("json", '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', ""),
    ("mistral", ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]', ""),
]


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize(("style", "text", "before"), RECORDED)
def test_recorded_calls_parse_in_any_pieces(style: str, text: str, before: str, size: int) -> None:
    parser = CallParser(style, NAMES)
    out, calls = _feed(parser, text, size)
    assert out == before
    assert calls[0] == ToolCall("get_weather", {"city": "Paris"})
    if "get_time" in text:
        assert calls[1] == ToolCall("get_time", {"city": "Paris"})


@pytest.mark.parametrize("style", ["hermes", "mistral", "json"])
@pytest.mark.parametrize("text", ["It is sunny in Paris.", "Use [brackets] <b>and</b> {braces} freely.",
                                  "Sure: <tool_cal is not a tag", ""])
def test_plain_answers_stay_text(style: str, text: str) -> None:
    assert _feed(CallParser(style, NAMES), text, 2) == (text, [])


def test_text_streams_until_a_call_begins() -> None:
    parser = CallParser("hermes", NAMES)
    assert parser.feed("Checking") == "Checking"
    assert parser.feed(" now <tool") == " now "  # a possible start is held back
    assert parser.feed("_call>\n{\"name\": ") == ""
    assert parser.feed('"get_time", "arguments": {}}</tool_call>') == ""
    assert parser.finish() == ("", [ToolCall("get_time", {})])
    parser = CallParser("hermes", NAMES)
    assert parser.feed("a <tool") == "a "
    assert parser.feed("box>") == "<toolbox>"  # it was not a call after all


@pytest.mark.parametrize(("style", "text"), [
    ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),  # a function not offered
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'),  # cut short
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>'),
    ("json", '{"answer": 42}'),  # JSON that is not a call
    ("json", '[1, 2, 3]'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": [1]}]'),
])
def test_what_is_not_a_valid_call_stays_text(style: str, text: str) -> None:
    assert _feed(CallParser(style, NAMES), text, 4) == (text, [])


def test_arguments_as_a_json_string_are_read() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
    assert _feed(CallParser("hermes", NAMES), text, 5) == ("", [ToolCall("get_weather", {"city": "Oslo"})])


def test_tools_are_checked() -> None:
    assert parse_tools(None) == parse_tools([]) == []
    (tool,) = parse_tools([{"type": "function", "function": {"name": "f"}}])
    assert tool == {"type": "function", "function": {"name": "f", "description": "",
                                                     "parameters": {"type": "object", "properties": {}}}}
    assert parse_tools([WEATHER]) == [WEATHER]


@pytest.mark.parametrize(("tools", "message"), [
    ({"name": "f"}, "must be a list"),
    ([{"name": "f"}] * 200, "at most 128"),
    (["f"], 'must be {"type": "function"'),
    ([{"type": "retrieval", "function": {"name": "f"}}], 'must be {"type": "function"'),
    ([{"type": "function", "function": {"name": "no spaces"}}], "needs a name"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, "listed twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "JSON Schema object"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "description must be a string"),
    ([{"type": "function", "function": {"name": "f", "description": "x" * 300_000}}], "at most 256 KiB"),
])
def test_bad_tools_are_clear_errors(tools: Any, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        parse_tools(tools)


def test_messages_carry_calls_and_results_as_templates_read_them() -> None:
    openai_turn = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]
    out = chat_messages(openai_turn, max_chars=10_000)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1] == {"role": "user", "content": "Weather in Oslo?"}
    assert out[2]["tool_calls"] == [{"type": "function", "id": "call_1",
                                     "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert out[3] == {"role": "tool", "content": "-3 C", "name": "get_weather", "tool_call_id": "call_1"}
    ollama_turn = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "-3 C"},
    ]
    out = chat_messages(ollama_turn, max_chars=10_000)
    assert out[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert out[2] == {"role": "tool", "content": "-3 C", "name": "get_weather"}


@pytest.mark.parametrize(("messages", "message"), [
    ([], "non-empty list"),
    ([{"role": "user"}], "role and content"),
    ([{"role": "wizard", "content": "x"}], "unknown message role"),
    ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}], "belong to an assistant"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], "function.name"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
     "arguments must be a JSON object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text content"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user", "content": "x" * 101}], "too long"),
])
def test_bad_messages_are_clear_errors(messages: Any, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        chat_messages(messages, max_chars=100)


@pytest.mark.parametrize("template", [QWEN2_TEMPLATE, MISTRAL_TEMPLATE, LLAMA3_TEMPLATE])
def test_a_round_trip_renders_in_each_template(template: str) -> None:
    """Tools, a call and its result reach each real-style template and come out in its words."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from node.engine.tokenizer import Tokenizer

    tok = Tokenizer(HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), chat_template=template)
    messages = chat_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "-3 C"},
    ], max_chars=10_000)
    text = tok.apply_chat_template(messages, tools=parse_tools([WEATHER]), bos_token="<s>", eos_token="</s>")
    assert json.dumps(WEATHER["function"]["description"]) in text  # the tool was offered
    assert "-3 C" in text
    if template is not LLAMA3_TEMPLATE:  # Llama's renders past calls as plain assistant text
        assert '"arguments": {"city": "Oslo"}' in text
