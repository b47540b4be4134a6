"""The reasoning splitter and the parsers of Ollama's keep_alive and think."""

from __future__ import annotations

import math

import pytest

from node.api.generate import BadRequest, parse_keep_alive, parse_think
from node.api.thinking import ThinkSplitter, opens_thinking


def run(pieces: list[str], *, thinking: bool = False) -> tuple[str, str]:
    s = ThinkSplitter(thinking=thinking)
    outs = [s.push(p) for p in pieces] + [s.flush()]
    return "".join(t for t, _ in outs), "".join(c for _, c in outs)


@pytest.mark.parametrize("cut", range(1, 30))
def test_tags_cut_anywhere_between_pieces(cut: int) -> None:
    text = "\n<think>I add 2 and 2.</think>\n\nFour."
    assert run([text[:cut], text[cut:]]) == ("I add 2 and 2.", "Four.")
    assert run(list(text)) == ("I add 2 and 2.", "Four.")


def test_text_without_reasoning_is_all_content() -> None:
    assert run(["  Hola", ", ", "<think>no</think>"]) == ("", "  Hola, <think>no</think>")
    assert run(["<thi", "nk"]) == ("", "<think")  # a tag never finished is text
    assert run(["<b>bold</b>"]) == ("", "<b>bold</b>")


def test_a_prompt_that_opened_the_block_starts_in_thinking() -> None:
    assert run(["let me see", "</thi", "nk>", " 4"], thinking=True) == ("let me see", "4")
    assert run(["never closed </th"], thinking=True) == ("never closed </th", "")
    assert opens_thinking("<|assistant|>\n<think>\n") and not opens_thinking("<think>x</think>")
    assert not opens_thinking("assistant\n")


def test_keep_alive_durations_like_ollamas() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("300ms") == pytest.approx(0.3) and parse_keep_alive(45.5) == 45.5
    assert parse_keep_alive("-1") == math.inf and parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("-5m") == math.inf
    for bad in ("soon", "5 minutes", "5mm", True, [], "m", "nan"):
        with pytest.raises(BadRequest, match="keep_alive"):
            parse_keep_alive(bad)


def test_think_values() -> None:
    assert parse_think(None) is None and parse_think(True) and parse_think(False) is False
    assert parse_think("high") is True
    with pytest.raises(BadRequest, match="think"):
        parse_think("maybe")
