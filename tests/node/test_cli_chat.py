"""The chat's pure parts: /set lines, typed parameters, \"\"\" blocks, the thinking printout."""

from __future__ import annotations

import io
from typing import Any

import pytest

from node.cli import build_parser
from node.cli_chat import (
    ChatError,
    ChatState,
    MultiLine,
    Turn,
    apply_set,
    parse_parameter,
    render_stats,
    state_from,
)


@pytest.mark.parametrize(("name", "values", "expected"), [
    ("temperature", ["0"], 0.0),
    ("top_k", ["40"], 40),
    ("top_p", ["0.5"], 0.5),
    ("min_p", ["0.05"], 0.05),
    ("repeat_penalty", ["1.1"], 1.1),
    ("seed", ["-1"], -1),
    ("num_predict", ["8"], 8),
    ("num_ctx", ["2048"], 2048),
    ("stop", ["<|eot_id|>"], ["<|eot_id|>"]),
    ("stop", ["a", "b"], ["a", "b"]),
])
def test_parameters_are_typed_like_ollama(name: str, values: list[str], expected: Any) -> None:
    assert parse_parameter(name, values) == (name, expected)


@pytest.mark.parametrize(("name", "values", "message"), [
    ("nonsense", ["1"], "unknown parameter 'nonsense'"),
    ("top_k", ["4.5"], "top_k must be an integer, got '4.5'"),
    ("temperature", ["hot"], "temperature must be a number, got 'hot'"),
    ("seed", [], "give a value"),
    ("seed", ["1", "2"], "seed takes one value"),
])
def test_bad_parameters_say_what_is_wrong(name: str, values: list[str], message: str) -> None:
    with pytest.raises(ChatError, match=message):
        parse_parameter(name, values)


def test_set_lines_change_the_state_and_the_body() -> None:
    state = ChatState("m")
    assert apply_set(state, "parameter temperature 0") == "Set parameter 'temperature' to '0'"
    assert apply_set(state, "parameter stop END  STOP") == "Set parameter 'stop' to 'END STOP'"
    assert apply_set(state, 'system "You are   terse."') == "Set system message."
    assert apply_set(state, "verbose") == "Set 'verbose' mode." and state.verbose
    assert apply_set(state, "quiet") == "Set 'quiet' mode." and not state.verbose
    apply_set(state, "format json")
    apply_set(state, "think")
    state.messages.append({"role": "user", "content": "hi"})
    assert state.body() == {
        "model": "m", "stream": True, "think": True, "format": "json",
        "messages": [{"role": "system", "content": "You are   terse."}, {"role": "user", "content": "hi"}],
        "options": {"temperature": 0.0, "stop": ["END", "STOP"]},
    }
    apply_set(state, "noformat")
    apply_set(state, "nothink")
    assert "format" not in state.body() and state.body()["think"] is False


@pytest.mark.parametrize(("line", "message"), [
    ("", "usage: /set"),
    ("parameter", "usage: /set parameter"),
    ("parameter nonsense 1", "unknown parameter 'nonsense'"),
    ("system", "usage: /set system"),
    ("verbose please", "takes no value"),
    ("format yaml", "usage: /set format json"),
    ("colour red", "unknown /set 'colour'"),
])
def test_bad_set_lines(line: str, message: str) -> None:
    with pytest.raises(ChatError, match=message):
        apply_set(ChatState("m"), line)


def feed_all(lines: list[str]) -> list[str | None]:
    reader = MultiLine()
    return [reader.feed(line) for line in lines]


@pytest.mark.parametrize(("lines", "results"), [
    (["hola"], ["hola"]),
    (['"""', "one", "two", '"""'], [None, None, None, "one\ntwo"]),
    (['"""one', "two", 'three"""'], [None, None, "one\ntwo\nthree"]),
    (['"""inline"""'], ["inline"]),
    (['"""', "", "after a blank", '"""'], [None, None, None, "\nafter a blank"]),
    (['say """ later'], ['say """ later']),
])
def test_multiline_blocks(lines: list[str], results: list[str | None]) -> None:
    assert feed_all(lines) == results


def test_multiline_reset_drops_the_block() -> None:
    reader = MultiLine()
    assert reader.feed('"""half') is None and reader.open
    reader.reset()
    assert not reader.open and reader.feed("fresh") == "fresh"


def test_thinking_is_printed_as_ollama_does_and_kept_out_of_the_answer() -> None:
    out = io.StringIO()
    turn = Turn(out, show_thinking=True)
    for piece in ({"thinking": "hmm"}, {"thinking": " ok"}, {"content": "Yes"}, {"content": "."}):
        turn.push(piece)
    assert out.getvalue() == "Thinking...\nhmm ok\n...done thinking.\n\nYes."
    assert turn.answer == "Yes." and turn.first is not None
    hidden = io.StringIO()
    quiet = Turn(hidden, show_thinking=False)
    quiet.push({"thinking": "hmm"})
    quiet.push({"content": "Yes"})
    assert hidden.getvalue() == "Yes"


def test_stats_have_rates_counts_and_nodes() -> None:
    lines = render_stats({"prompt_eval_count": 10, "prompt_eval_duration": 500_000_000, "eval_count": 8,
                          "eval_duration": 2_000_000_000, "nodes": ["a" * 64, "b" * 64]}, 0.25)
    text = "\n".join(lines)
    assert "prompt eval rate:     20.00 tok/s" in text and "eval rate:            4.00 tok/s" in text
    assert "time to first token:  0.250s" in text and f"nodes:                {'a' * 12}, {'b' * 12}" in text


def test_run_flags_reach_the_request() -> None:
    args = build_parser().parse_args(["run", "m", "--think", "high", "--format", "json", "--keepalive", "5m",
                                      "--temperature", "0", "--seed", "3"])
    assert state_from(args).body() == {"model": "m", "messages": [], "stream": True, "think": "high", "format": "json",
                                       "keep_alive": "5m", "options": {"temperature": 0.0, "seed": 3}}
    hidden = state_from(build_parser().parse_args(["run", "m", "--hidethinking"]))
    assert hidden.body()["think"] is True and not hidden.shows_thinking
    shown = state_from(build_parser().parse_args(["run", "m", "--think"]))
    assert shown.body()["think"] is True and shown.shows_thinking
