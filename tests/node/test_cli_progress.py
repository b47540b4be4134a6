"""What `nodectl run` shows on stderr while it waits: the load's lines, when a pause is shown,
the spinner drawn and erased around the answer, and stdout holding only the answer."""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Iterator
from typing import Any

import pytest

from node import cli_chat, cli_progress
from node.cli_chat import Turn, stream_answer
from node.cli_progress import LoadProgress, Spinner, advance, ensure_loaded, find_model, pause_due
from node.client import CliError

PLANNED = {"status": "planned", "epoch": 7, "stages": [
    {"node": "node0", "node_id": "a" * 64, "layers": [0, 6]},
    {"node": "node3", "node_id": "b" * 64, "layers": [6, 24]},
    {"node": "node2", "node_id": "c" * 64, "layers": [24, 30]}]}


def ready(node: str, a: int, b: int) -> dict[str, Any]:
    return {"status": "ready", "node": node, "node_id": node * 8, "layers": [a, b], "load_s": 1.25, "compile_s": 3.0}


def test_each_load_event_has_its_line_and_the_spinner_its_status() -> None:
    p = LoadProgress("m")
    assert p.status == "loading m"
    steps: list[tuple[dict[str, Any], str | None, str]] = [
        ({"status": "waiting for a node that holds model 3f2a"}, "waiting for a node that holds model 3f2a",
         "waiting for a node that holds model 3f2a"),
        ({"status": "pulling 3f2a", "total": 200, "completed": 50}, "pulling 3f2a", "pulling 3f2a 25%"),
        ({"status": "pulling 3f2a", "total": 200, "completed": 150}, None, "pulling 3f2a 75%"),  # said already
        (PLANNED, "plan: node0 0-6, node3 6-24, node2 24-30",
         "loading layers 0-6 on node0, 6-24 on node3, 24-30 on node2 (0 of 3 ready)"),
        (ready("node0", 0, 6), "layers 0-6 ready on node0 (load 1.2 s, compile 3.0 s; 1 of 3 ready)",
         "loading layers 6-24 on node3, 24-30 on node2 (1 of 3 ready)"),
        (ready("node2", 24, 30), "layers 24-30 ready on node2 (load 1.2 s, compile 3.0 s; 2 of 3 ready)",
         "loading layers 6-24 on node3 (2 of 3 ready)"),
        ({"status": "waiting", "detail": "waiting for layers 6-24 (compiling)", "epoch": 7},
         "waiting for layers 6-24 (compiling)", "waiting for layers 6-24 (compiling)"),
        (ready("node3", 6, 24), "layers 6-24 ready on node3 (load 1.2 s, compile 3.0 s; 3 of 3 ready)",
         "all 3 node(s) ready"),
        ({"status": "success", "name": "m", "plan": [{"node": "node0", "start": 0, "end": 6},
                                                    {"node": "node3", "start": 6, "end": 24}]},
         "loaded m on 2 node(s): node0 0-6, node3 6-24", "loaded m on 2 node(s): node0 0-6, node3 6-24"),
        ({"done": True}, None, "loaded m on 2 node(s): node0 0-6, node3 6-24"),  # not a load event
    ]
    for event, line, status in steps:
        assert (p.feed(event), p.status) == (line, status), event


def test_an_adopted_plan_and_hostile_names() -> None:
    p = LoadProgress("m")
    event = {"status": "adopted", "epoch": 3, "stages": [{"node": "evil\x1b[2Jname", "layers": [0, 3]},
                                                          {"node_id": "f" * 64, "layers": [3, 4]},
                                                          {"node": "bad", "layers": "0-3"}]}
    assert p.feed(event) == f"the cluster already runs it: evil?[2Jname 0-3, {'f' * 12} 3-4"
    assert p.feed({"status": "ready", "node": "x", "layers": None}) is None


@pytest.mark.parametrize(("waited", "got_first", "due"), [
    (0.0, False, False), (0.29, False, False), (0.3, False, True),  # before the first piece: soon
    (0.5, True, False), (0.99, True, False), (1.0, True, True), (30.0, True, True),  # a pause: after a second
])
def test_when_a_wait_is_shown(waited: float, got_first: bool, due: bool) -> None:
    assert pause_due(waited, got_first) is due


@pytest.mark.parametrize(("name", "digest", "found"), [
    ("m", None, "d1"), ("m:latest", None, "d1"), ("other:v2", None, "d2"), ("other", None, None),
    ("m", "d2", "d2"), ("nothing", "d1", "d1"), ("m", "d3", None),
])
def test_the_model_is_found_in_ps(name: str, digest: str | None, found: str | None) -> None:
    models = [{"name": "m", "model": "m", "digest": "d1"}, "junk", {"name": "other:v2", "digest": "d2"}]
    entry = find_model(models, name, digest)
    assert (entry["digest"] if entry else None) == found
    assert find_model(None, "m") is None


@pytest.mark.parametrize(("column", "text", "width", "after"), [
    (0, "hello", 80, 5), (5, " world\nab", 80, 2), (0, "\x1b[2mThinking...\n", 80, 0), (3, "\tx", 80, 9),
    (78, "abc", 80, 1), (0, "x" * 80, 80, 80), (80, "y", 80, 1), (79, "日", 80, 2), (0, "e\u0301", 80, 1),
    (4, "\r", 80, 0),
])
def test_the_column_where_the_answer_stops(column: int, text: str, width: int, after: int) -> None:
    assert advance(column, text, width) == after


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_spinner_is_drawn_in_pauses_and_erased_before_each_piece() -> None:
    clock, out, err = Clock(), io.StringIO(), io.StringIO()
    status = {"text": ""}
    spinner = Spinner(err, lambda: status["text"], draw=True, track=True, clock=clock)
    turn = Turn(out, show_thinking=False, waiting=spinner)
    spinner.refresh()
    assert err.getvalue() == ""  # the request just went: nothing yet
    clock.now += 0.5
    spinner.refresh()  # before the first piece: the spinner alone, at the line's start
    assert err.getvalue() == "\r⠋\x1b[K"
    turn.push({"content": "Hello"})
    assert err.getvalue().endswith("\r\x1b[K")
    clock.now += 0.5
    spinner.refresh()
    assert err.getvalue().endswith("\r\x1b[K")  # half a second between pieces is not a pause
    status["text"] = "recovering: node node1 failed"
    clock.now += 1.0
    spinner.refresh()  # mid-line: drawn on the next line, the answer left as it is
    assert err.getvalue().endswith("\r\n⠙ recovering: node node1 failed\x1b[K")
    status["text"] = "re-planned: node0 0-6, node3 6-24"
    spinner.refresh()  # redrawn in place
    assert err.getvalue().endswith("\r⠹ re-planned: node0 0-6, node3 6-24\x1b[K")
    turn.push({"content": " world"})  # erased, then back up to the end of "Hello"
    assert err.getvalue().endswith("\r\x1b[K\x1b[A\x1b[6G")
    assert out.getvalue() == "Hello world"  # stdout: the answer only


def test_without_a_terminal_each_new_status_is_one_plain_line() -> None:
    clock, err = Clock(), io.StringIO()
    status = {"text": ""}
    spinner = Spinner(err, lambda: status["text"], draw=False, clock=clock)
    clock.now += 5
    spinner.refresh()
    assert err.getvalue() == ""  # an empty status: nothing, however long
    status["text"] = "recovering: node node1 failed"
    spinner.refresh()
    spinner.refresh()
    status["text"] = "re-planned: node0 0-6, node3 6-24"
    spinner.refresh()
    with spinner.writing("ok"):
        pass
    spinner.refresh()  # a short wait after a piece: nothing
    assert err.getvalue() == "recovering: node node1 failed\nre-planned: node0 0-6, node3 6-24\n"
    assert "\x1b" not in err.getvalue() and "\r" not in err.getvalue()


def test_a_failing_status_poll_is_ignored() -> None:
    def broken() -> str:
        raise CliError("no daemon")

    clock, err = Clock(), io.StringIO()
    spinner = Spinner(err, broken, draw=True, clock=clock)
    clock.now += 1
    spinner.refresh()
    assert err.getvalue() == "\r⠋\x1b[K"


def fake_stream(events: list[tuple[float, dict[str, Any]]]) -> Any:
    def stream(*_: Any) -> Iterator[dict[str, Any]]:
        for pause, event in events:
            time.sleep(pause)
            yield event

    return stream


def test_a_paused_stream_shows_the_status_from_a_thread_and_stdout_stays_clean(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_chat, "stream", fake_stream([
        (0.0, {"message": {"content": "Two"}}),
        (1.6, {"message": {"content": " plus"}}),  # the stream pauses: a node died
        (0.0, {"message": {"content": ""}, "done": True}),
    ]))
    for draw in (False, True):
        out, err = io.StringIO(), io.StringIO()
        spinner = Spinner(err, lambda: "recovering: node node1 failed", draw=draw, track=draw)
        turn = Turn(out, show_thinking=False, waiting=spinner)
        final = stream_answer(argparse.Namespace(), {}, turn)
        assert final is not None and final["done"]
        assert out.getvalue() == "Two plus"
        if draw:
            assert "⠋ recovering: node node1 failed" in err.getvalue() and err.getvalue().endswith("\x1b[K\x1b[A\x1b[4G")
        else:
            assert err.getvalue() == "recovering: node node1 failed\n"


def test_a_model_not_in_ps_is_loaded_with_a_line_per_event(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def call(_args: Any, method: str, path: str, body: Any = None) -> Any:
        asked.append(f"{method} {path}")
        return {"models": [{"name": "loaded-one", "digest": "d0"}]}

    events = [PLANNED, ready("node0", 0, 6), {"status": "success", "name": "m", "digest": "d1", "plan": []}]
    monkeypatch.setattr(cli_progress, "call", call)
    monkeypatch.setattr(cli_progress, "stream", fake_stream([(0.0, e) for e in events]))
    err = io.StringIO()
    loaded = ensure_loaded(argparse.Namespace(), "m", err)
    assert loaded.digest == "d1" and loaded.load_s >= 0
    assert err.getvalue().splitlines() == ["plan: node0 0-6, node3 6-24, node2 24-30",
                                           "layers 0-6 ready on node0 (load 1.2 s, compile 3.0 s; 1 of 3 ready)",
                                           "loaded m"]
    assert ensure_loaded(argparse.Namespace(), "loaded-one", err).digest == "d0"  # listed: no load
    assert asked == ["GET /api/ps", "GET /api/ps"]

    monkeypatch.setattr(cli_progress, "stream", fake_stream([(0.0, PLANNED), (0.0, {"error": "no room for it"})]))
    with pytest.raises(CliError, match="no room for it"):
        ensure_loaded(argparse.Namespace(), "m", io.StringIO())
    monkeypatch.setattr(cli_progress, "stream", fake_stream([(0.0, PLANNED)]))
    with pytest.raises(CliError, match="stopped answering before 'm' was loaded"):
        ensure_loaded(argparse.Namespace(), "m", io.StringIO())


def test_load_pins_from_the_command_line() -> None:
    from node.cli_run import parse_pin
    from node.client import CliError

    assert parse_pin("node2:0-6") == {"node": "node2", "layers": [0, 6]}
    assert parse_pin("node3") == {"node": "node3"}
    for bad in ("", ":0-6", "node2:6-0", "node2:a-b", "node2:3"):
        with pytest.raises(CliError):
            parse_pin(bad)
