"""``nodectl run``: one answer to a prompt, or an interactive chat like ``ollama run``.

With a prompt (or one on stdin) the answer streams to stdout and the command exits.
On a terminal without one, a chat: ``>>> `` reads a message (a block between
``\"\"\"`` lines spans several), the whole history goes to ``POST /api/chat`` each
turn and the answer streams back; ``/set``, ``/show``, ``/clear``, ``/bye`` and ``/?``
as in Ollama. Ctrl-C during an answer closes the HTTP stream, which ends the
daemon's session at its next write, and returns to the prompt.

Before an answer, a model that ``/api/ps`` does not list yet is loaded with its progress
on stderr; while the answer is awaited or pauses, stderr shows what is happening to the
model (node/cli_progress.py). Only the answer goes to stdout.

The pure parts (``parse_parameter``, ``apply_set``, ``MultiLine``) are tested alone;
``Turn`` prints one streamed answer (and the thinking, when asked for).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from node.cli_progress import Loaded, Spinner, draws, ensure_loaded, ps_status
from node.client import CliError, call, stream

__all__ = ["ChatError", "ChatState", "MultiLine", "apply_set", "chat", "parse_parameter", "run_once"]

# Ollama's names and types for /set parameter; stop takes one or more strings.
PARAMETERS: dict[str, type] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
    "seed": int, "num_predict": int, "num_ctx": int, "stop": list,
}
THINK_VALUES = ("true", "false", "low", "medium", "high")
_DIM, _RESET = "\x1b[2m", "\x1b[0m"

HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, top_k, top_p, min_p, repeat_penalty,
                              seed, num_predict, num_ctx, stop)
  /set system TEXT            Set the system message
  /set verbose | quiet        Show or hide the timings after each answer
  /set think | nothink        Ask the model to think, or not
  /set format json | noformat Ask for JSON output, or not
  /show info | parameters | template | modelfile | license | system
  /clear                      Clear the conversation
  /bye                        Exit (or Ctrl + d)
  /?, /help                   This help

Use \"\"\" to begin and end a multi-line message."""


class ChatError(ValueError):
    """A line the chat prints before going on (a bad command, a bad value)."""


# ---------------------------------------------------------------------------- pure parts


def parse_parameter(name: str, values: list[str]) -> tuple[str, Any]:
    """``/set parameter NAME VALUE...`` -> (name, value typed as Ollama types it)."""
    kind = PARAMETERS.get(name)
    if kind is None:
        raise ChatError(f"unknown parameter {name!r}; the parameters are {', '.join(PARAMETERS)}")
    if not values:
        raise ChatError(f"give a value: /set parameter {name} VALUE")
    if kind is list:
        return name, list(values)
    if len(values) != 1:
        raise ChatError(f"{name} takes one value, got {len(values)}")
    try:
        return name, kind(values[0])
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ChatError(f"{name} must be {what}, got {values[0]!r}") from None


@dataclass
class ChatState:
    """What a chat sends each turn."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    system: str | None = None
    verbose: bool = False
    think: bool | str | None = None
    hide_thinking: bool = False
    format: str | None = None
    keep_alive: str | None = None

    def body(self) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": system + self.messages, "stream": True}
        if self.options:
            body["options"] = dict(self.options)
        for key, value in (("think", self.think), ("format", self.format), ("keep_alive", self.keep_alive)):
            if value is not None:
                body[key] = value
        return body

    @property
    def shows_thinking(self) -> bool:
        return self.think not in (None, False) and not self.hide_thinking


def _unquote(text: str) -> str:
    for quote in ('"""', '"', "'"):
        if len(text) >= 2 * len(quote) and text.startswith(quote) and text.endswith(quote):
            return text[len(quote):-len(quote)]
    return text


def apply_set(state: ChatState, text: str) -> str:
    """Apply ``/set TEXT`` (TEXT without the ``/set``) to ``state``; returns what to print."""
    words = text.split()
    if not words:
        raise ChatError("usage: /set parameter NAME VALUE | system TEXT | verbose | quiet (see /?)")
    key, rest = words[0], words[1:]
    if key == "parameter":
        if not rest:
            raise ChatError("usage: /set parameter NAME VALUE")
        name, value = parse_parameter(rest[0], rest[1:])
        state.options[name] = value
        return f"Set parameter {name!r} to {' '.join(rest[1:])!r}"
    if key == "system":
        system = _unquote(text.split(None, 1)[1].strip()) if rest else ""
        if not system:
            raise ChatError("usage: /set system TEXT")
        state.system = system
        return "Set system message."
    if key not in ("verbose", "quiet", "think", "nothink", "format", "noformat"):
        raise ChatError(f"unknown /set {key!r}; type /? for help")
    if rest and key != "format":
        raise ChatError(f"/set {key} takes no value")
    if key in ("verbose", "quiet"):
        state.verbose = key == "verbose"
        return f"Set {key!r} mode."
    if key in ("think", "nothink"):
        state.think = key == "think"
        return "Set 'think' mode." if state.think else "Set 'nothink' mode."
    if key == "format":
        if rest != ["json"]:
            raise ChatError("usage: /set format json")
        state.format = "json"
        return "Set format to 'json' mode."
    state.format = None  # noformat
    return "Disabled format."


class MultiLine:
    """Assembles a message typed between ``\"\"\"`` lines, as ``ollama run`` does:
    ``\"\"\"first`` opens a block (keeping ``first``), ``last\"\"\"`` closes it."""

    def __init__(self) -> None:
        self._lines: list[str] | None = None

    @property
    def open(self) -> bool:
        return self._lines is not None

    def reset(self) -> None:
        self._lines = None

    def feed(self, line: str) -> str | None:
        """The whole message once it is complete, else None (more lines wanted)."""
        if self._lines is None:
            if not line.startswith('"""'):
                return line
            rest = line[3:]
            if rest.endswith('"""'):
                return rest[:-3]
            self._lines = [rest] if rest else []
            return None
        if not line.endswith('"""'):
            self._lines.append(line)
            return None
        lines = self._lines + ([line[:-3]] if line[:-3] else [])
        self._lines = None
        return "\n".join(lines)


# ---------------------------------------------------------------------------- one answer


def render_stats(final: dict[str, Any], first_s: float | None) -> list[str]:
    """Ollama's --verbose summary, plus the time to the first token and the nodes."""

    def seconds(key: str) -> float:
        value = final.get(key, 0)
        return value / 1e9 if isinstance(value, int | float) else 0.0

    def rate(count_key: str, duration_key: str) -> str:
        count, dur = final.get(count_key, 0), seconds(duration_key)
        return f"{count / dur if dur and isinstance(count, int | float) else 0:.2f} tok/s"

    nodes = final.get("nodes")
    nodes = nodes if isinstance(nodes, list) else []
    rows = [
        ("total duration", f"{seconds('total_duration'):.3f}s"),
        ("load duration", f"{seconds('load_duration'):.3f}s"),
        ("time to first token", f"{first_s or 0:.3f}s"),
        ("prompt eval count", f"{final.get('prompt_eval_count', 0)} token(s)"),
        ("prompt eval duration", f"{seconds('prompt_eval_duration'):.3f}s"),
        ("prompt eval rate", rate("prompt_eval_count", "prompt_eval_duration")),
        ("eval count", f"{final.get('eval_count', 0)} token(s)"),
        ("eval duration", f"{seconds('eval_duration'):.3f}s"),
        ("eval rate", rate("eval_count", "eval_duration")),
        ("nodes", ", ".join(str(n)[:12] for n in nodes)),
    ]
    return [f"{name + ':':<22}{value}" for name, value in rows]


class Turn:
    """Prints one streamed answer: the thinking (when shown) as Ollama does, then the text;
    ``waiting`` (shown on stderr while no piece comes) is erased before each piece."""

    def __init__(self, out: TextIO, *, show_thinking: bool, waiting: Spinner | None = None) -> None:
        self.out, self.show_thinking, self.waiting = out, show_thinking, waiting
        self.dim = out.isatty()
        self.answer = ""
        self.thinking_open = False
        self.first: float | None = None
        self._t0 = time.monotonic()

    def _write(self, text: str) -> None:
        with self.waiting.writing(text) if self.waiting is not None else contextlib.nullcontext():
            self.out.write(text)
            self.out.flush()

    def push(self, message: dict[str, Any]) -> None:
        thinking, content = message.get("thinking"), message.get("content")
        if (thinking or content) and self.first is None:
            self.first = time.monotonic() - self._t0
        if isinstance(thinking, str) and thinking and self.show_thinking:
            if not self.thinking_open:
                self._write((_DIM if self.dim else "") + "Thinking...\n")
                self.thinking_open = True
            self._write(thinking)
        if isinstance(content, str) and content:
            self.close_thinking()
            self.answer += content
            self._write(content)

    def close_thinking(self) -> None:
        if self.thinking_open:
            self._write("\n...done thinking.\n\n" + (_RESET if self.dim else ""))
            self.thinking_open = False


def stream_answer(args: argparse.Namespace, body: dict[str, Any], turn: Turn) -> dict[str, Any] | None:
    """Stream one /api/chat answer into ``turn``; the final line, or None when Ctrl-C
    stopped it (the stream is closed, so the daemon frees the session)."""
    events = stream(args, "POST", "/api/chat", body)
    try:
        with contextlib.closing(events), turn.waiting or contextlib.nullcontext():
            for event in events:
                if "error" in event:
                    raise CliError(str(event["error"]))
                message = event.get("message")
                turn.push(message if isinstance(message, dict) else {})
                if event.get("done"):
                    return event
    except KeyboardInterrupt:
        return None
    finally:
        turn.close_thinking()
    raise CliError("the daemon stopped answering before the end of the answer; see its log")


def state_from(args: argparse.Namespace) -> ChatState:
    options: dict[str, Any] = {}
    for key, value in (("temperature", args.temperature), ("seed", args.seed), ("num_predict", args.num_predict)):
        if value is not None:
            options[key] = value
    think: bool | str | None = None
    if args.think is not None:
        think = {"true": True, "false": False}.get(args.think, args.think)
    if args.hidethinking:
        think = think if think not in (None, False) else True
    return ChatState(args.model, options=options, verbose=args.verbose, think=think,
                     hide_thinking=args.hidethinking, format=args.format, keep_alive=args.keepalive)


def waiting_for(args: argparse.Namespace, model: str, loaded: Loaded) -> Spinner:
    """What stderr shows while an answer of ``model`` is awaited: a spinner with the model's
    status on a terminal, else a line per new status."""
    return Spinner(sys.stderr, ps_status(args, model, loaded.digest), draw=draws(sys.stderr),
                   track=draws(sys.stdout))


def with_load(final: dict[str, Any], load_s: float) -> dict[str, Any]:
    """The final line with the time this command spent loading the model counted in, as
    Ollama counts the load in a request that had to load."""
    if not load_s:
        return final
    ns = int(load_s * 1e9)
    durations = {}
    for key in ("load_duration", "total_duration"):
        value = final.get(key)
        durations[key] = (value if isinstance(value, int) else 0) + ns
    return {**final, **durations}


def run_once(args: argparse.Namespace, prompt: str) -> int:
    """``nodectl run MODEL PROMPT``: load the model if needed, stream the answer to stdout
    and exit."""
    if not prompt.strip():
        raise CliError("the prompt is empty: give one as an argument or on stdin")
    state = state_from(args)
    state.options.setdefault("num_predict", 256)
    state.messages.append({"role": "user", "content": prompt})
    loaded = ensure_loaded(args, state.model, sys.stderr)
    turn = Turn(sys.stdout, show_thinking=state.shows_thinking, waiting=waiting_for(args, state.model, loaded))
    final = stream_answer(args, state.body(), turn)
    sys.stdout.write("\n")
    if final is None:
        return 130  # stopped with Ctrl-C, as a shell reports SIGINT
    if args.verbose:
        print("\n".join(render_stats(with_load(final, loaded.load_s), turn.first)), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- the chat


class Chat:
    """The interactive loop over a ChatState; reads with input() (readline when importable)."""

    def __init__(self, args: argparse.Namespace, state: ChatState) -> None:
        self.args, self.state = args, state
        self.reader = MultiLine()

    def show(self) -> dict[str, Any]:
        result: dict[str, Any] = call(self.args, "POST", "/api/show", {"model": self.state.model})
        return result

    def run(self) -> int:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() then edits lines and keeps a history)
        while True:
            try:
                line = input("... " if self.reader.open else ">>> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                self.reader.reset()
                print("\nUse Ctrl + d or /bye to exit.\n")
                continue
            try:
                if not self.reader.open and line.startswith("/"):
                    if self.command(line.strip()) == "bye":
                        return 0
                    continue
                message = self.reader.feed(line)
                if message is not None and message.strip():
                    self.turn(message)
            except KeyboardInterrupt:  # during /show: back to the prompt
                print()

    def command(self, line: str) -> str | None:
        word, _, rest = line.partition(" ")
        try:
            if word == "/bye":
                return "bye"
            if word == "/clear":
                self.state.messages.clear()
                print("Cleared session context")
            elif word == "/set":
                print(apply_set(self.state, rest))
            elif word == "/show":
                print(self.render_show(rest.strip()))
            elif word in ("/?", "/help"):
                print(HELP)
            else:
                print(f"Unknown command {word!r}. Type /? for help")
        except (ChatError, CliError) as exc:
            print(f"error: {exc}")
        return None

    def render_show(self, what: str) -> str:
        from node.cli_models import render_show, show_section

        if what == "system":
            return self.state.system or "No system message was specified."
        if what == "parameters":
            mine = [f"{k:<30} {v}" for k, v in self.state.options.items()]
            model = self.show().get("parameters") or ""
            return "\n".join(["User defined parameters:", *(mine or ["(none)"]), "",
                              "Model defined parameters:", model or "(none)"])
        if what == "info":
            return render_show(self.show(), sections=("Model", "Capabilities"))
        if what in ("template", "modelfile", "license"):
            return show_section(self.show(), what)
        raise ChatError("usage: /show info | parameters | template | modelfile | license | system")

    def turn(self, text: str) -> None:
        self.state.messages.append({"role": "user", "content": text})
        try:  # loaded again with its progress shown when it was unloaded since the last answer
            loaded = ensure_loaded(self.args, self.state.model, sys.stderr)
        except CliError as exc:
            self.state.messages.pop()
            print(f"error: {exc}")
            return
        except KeyboardInterrupt:  # Ctrl-C during the load: back to the prompt
            self.state.messages.pop()
            print()
            return
        turn = Turn(sys.stdout, show_thinking=self.state.shows_thinking,
                    waiting=waiting_for(self.args, self.state.model, loaded))
        try:
            final = stream_answer(self.args, self.state.body(), turn)
        except CliError as exc:
            self.state.messages.pop()  # never reached the model: the next message replaces it
            print(f"error: {exc}")
            return
        print("\n")
        if final is None:  # Ctrl-C: Ollama keeps the question and drops the partial answer
            return
        self.state.messages.append({"role": "assistant", "content": turn.answer})
        if self.state.verbose:
            print("\n".join(render_stats(with_load(final, loaded.load_s), turn.first)) + "\n", file=sys.stderr)


def chat(args: argparse.Namespace) -> int:
    """``nodectl run MODEL`` on a terminal: the model is loaded (its progress shown) before
    the first prompt, as ``ollama run`` does."""
    state = state_from(args)
    call(args, "POST", "/api/show", {"model": state.model})  # an unknown model: one line, exit 1
    ensure_loaded(args, state.model, sys.stderr)
    return Chat(args, state).run()
