"""Structured output and forced tool calls on a real three-node cluster, through the official
clients: the tiny random model, sampled at temperature 1.0, writes whatever it likes, yet with
a schema every answer parses and validates (the tail masks every token the grammar does not
allow), and with ``tool_choice`` that requires a call every answer is a call of an offered
function whose arguments match its parameters."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.helpers.faces import MODEL, Faces

jsonschema = pytest.importorskip("jsonschema")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

# Bounded strings and numbers: a random model left free in a string would fill its token
# budget before it closed it (the grammar holds the form, not the length it does not say).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
# Small: the tiny model's context is 256 tokens, and the template lists the tools in the prompt.
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Lima", "Oslo"]},
                                                                      "days": {"type": "integer", "maximum": 7}},
                                      "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 4}},
                                   "required": ["zone"], "additionalProperties": False}}}
PROMPTS = [f"{word} {i}" for i, word in enumerate(["hola", "dime", "cuenta", "el perro", "la casa"] * 4)]


def test_a_schema_holds_for_twenty_answers_at_temperature_one(faces: Faces) -> None:
    client = ollama.Client(host=faces.url())

    def ask(prompt: str) -> str:
        reply = client.chat(model=MODEL, messages=[{"role": "user", "content": prompt}], format=PERSON,
                            options={"temperature": 1.0, "num_predict": 200}, stream=False)
        return str(reply.message.content)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, PROMPTS))
    for answer in answers:
        jsonschema.validate(json.loads(answer), PERSON)
    assert len(set(answers)) > 1  # sampled, not one canned answer

    done = client.generate(model=MODEL, prompt="el perro", format="json", stream=False,
                           options={"temperature": 0, "num_predict": 200})
    assert isinstance(json.loads(done.response), dict)
    streamed = "".join(p.response for p in client.generate(model=MODEL, prompt="la casa", format=PERSON, stream=True,
                                                              options={"temperature": 1.0, "num_predict": 200}))
    jsonschema.validate(json.loads(streamed), PERSON)


def test_openai_response_format_json_schema(faces: Faces) -> None:
    client = openai.OpenAI(base_url=faces.url("/v1"), api_key="unused", max_retries=0)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hola"}],
                                          response_format=fmt, max_tokens=200)
    jsonschema.validate(json.loads(done.choices[0].message.content or ""), PERSON)
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "dime"}],
                                            response_format=fmt, max_tokens=200, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), PERSON)


def test_tool_choice_required_always_calls_an_offered_function(faces: Faces) -> None:
    client = openai.OpenAI(base_url=faces.url("/v1"), api_key="unused", max_retries=0)
    tools: Any = [WEATHER, TIME]
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    messages: Any = [{"role": "user", "content": "hola"}]
    for _ in range(3):
        done = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                              max_tokens=120)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])  # type: ignore[union-attr]
    named: Any = {"type": "function", "function": {"name": "time"}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=named,
                                                 max_tokens=120, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function is not None and deltas[0].function.name == "time"
    jsonschema.validate(json.loads(deltas[0].function.arguments or ""), by_name["time"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
