"""What ``nodectl run`` shows on stderr while it waits: a load's progress, and what is
happening to the model while an answer pauses (a node loading, compiling, a recovery).

The pure parts are tested alone: ``LoadProgress`` turns ``POST /api/load``'s events into
text (a line per event for pipes and logs, one status for the spinner), ``pause_due``
says when a wait is worth showing, ``find_model`` picks a model's ``GET /api/ps`` entry,
``advance`` follows the terminal column where the answer's last line ends. ``Spinner``
is the I/O side: a thread that draws (on a terminal) or prints (elsewhere) while the
main thread blocks reading the stream; ``Spinner.writing`` erases it before a piece of
the answer goes to stdout, so stdout holds only the answer.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import unicodedata
from argparse import Namespace
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from node.client import CliError, call, stream

__all__ = ["FRAMES", "LoadProgress", "Loaded", "Spinner", "advance", "clean", "draws", "ensure_loaded", "find_model",
           "pause_due", "ps_status"]

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # Ollama's spinner
FRAME_S = 0.1
FIRST_DELAY_S = 0.3  # before the first piece: a quick answer shows nothing
PAUSE_DELAY_S = 1.0  # between pieces: a token is rarely this slow unless something happened
POLL_S = 0.5
_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean(value: Any, limit: int = 48) -> str:
    """``value`` as one printable line (node names and statuses come from other machines)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(value)[:limit])


def draws(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that understands moving the cursor."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed, or no file behind it
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


# ---------------------------------------------------------------------------- pure parts


def _layers(value: Any) -> tuple[int, int] | None:
    if isinstance(value, list | tuple) and len(value) == 2 and all(type(x) is int for x in value):
        return value[0], value[1]
    return None


def _stages(raw: Any) -> list[tuple[str, int, int]]:
    """[(node, start, end)] of a "planned" or "adopted" event's stages (bad entries skipped)."""
    out = []
    for s in raw if isinstance(raw, list) else []:
        layers = _layers(s.get("layers")) if isinstance(s, Mapping) else None
        if layers is not None:
            out.append((clean(s.get("node") or str(s.get("node_id", "?"))[:12]), *layers))
    return out


def _layout(stages: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{node} {a}-{b}" for node, a, b in stages)


def _seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) and not isinstance(value, bool) else "? s"


@dataclass
class LoadProgress:
    """Follows one ``POST /api/load``: ``feed`` each event; it returns the line to print for
    it (None: nothing new) and keeps ``status``, the spinner's text of the moment."""

    model: str
    status: str = ""
    stages: list[tuple[str, int, int]] = field(default_factory=list)
    ready: set[tuple[str, int, int]] = field(default_factory=set)
    _said: str = ""

    def __post_init__(self) -> None:
        self.status = self.status or f"loading {clean(self.model)}"

    def _loading(self) -> str:
        left = [s for s in self.stages if s not in self.ready]
        done = f"({len(self.ready)} of {len(self.stages)} ready)"
        if not left:
            return f"all {len(self.stages)} node(s) ready"
        (node, a, b), *rest = left
        more = "".join(f", {x}-{y} on {n}" for n, x, y in rest)
        return f"loading layers {a}-{b} on {node}{more} {done}"

    def feed(self, event: Mapping[str, Any]) -> str | None:
        status = event.get("status")
        line: str | None = None
        if status == "planned":
            self.stages, self.ready = _stages(event.get("stages")), set()
            line, self.status = f"plan: {_layout(self.stages)}", self._loading()
        elif status == "ready":
            layers = _layers(event.get("layers"))
            if layers is None:
                return None
            stage = (clean(event.get("node") or str(event.get("node_id", "?"))[:12]), *layers)
            self.ready.add(stage)
            if stage not in self.stages:
                self.stages.append(stage)
            self.status = self._loading()
            line = (f"layers {stage[1]}-{stage[2]} ready on {stage[0]} (load {_seconds(event.get('load_s'))}, "
                    f"compile {_seconds(event.get('compile_s'))}; {len(self.ready)} of {len(self.stages)} ready)")
        elif status == "waiting":
            line = self.status = clean(event.get("detail") or "waiting for the plan's nodes", 160)
        elif status == "adopted":
            self.stages = _stages(event.get("stages"))
            self.ready = set(self.stages)
            line = f"the cluster already runs it: {_layout(self.stages)}"
            self.status = line
        elif status == "success":
            plan = [(clean(s.get("node") or str(s.get("node_id", "?"))[:12]), s.get("start"), s.get("end"))
                    for s in event.get("plan") or [] if isinstance(s, Mapping)]
            where = f" on {len(plan)} node(s): " + ", ".join(f"{n} {a}-{b}" for n, a, b in plan) if plan else ""
            line = self.status = f"loaded {clean(event.get('name') or self.model)}{where}"
        elif isinstance(status, str) and status:  # a pull's lines: the pieces this node lacks
            line = clean(status, 160)
            total, done = event.get("total"), event.get("completed")
            if isinstance(total, int) and isinstance(done, int) and total > 0:
                self.status = f"{line} {min(100, 100 * done // total)}%"
            else:
                self.status = line
        if line is None or line == self._said:  # a pull repeats its line as its bytes come
            return None
        self._said = line
        return line


def pause_due(waited_s: float, got_first: bool) -> bool:
    """Whether a wait of ``waited_s`` since the request (or the last piece) is shown."""
    return waited_s >= (PAUSE_DELAY_S if got_first else FIRST_DELAY_S)


def _bare(name: str) -> str:
    return name.removesuffix(":latest")


def find_model(models: Any, name: str, digest: str | None = None) -> Mapping[str, Any] | None:
    """The ``/api/ps`` entry of the model ``run`` asked for: by digest once known, else by name."""
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, Mapping):
            continue
        if digest is not None:
            if entry.get("digest") == digest:
                return entry
        elif _bare(name) in (_bare(str(entry.get("name"))), _bare(str(entry.get("model")))):
            return entry
    return None


def _cells(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Cf", "Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def advance(column: int, text: str, width: int) -> int:
    """The column after writing ``text`` from ``column`` on a terminal ``width`` cells wide:
    0 at the start of a line, ``width`` when the line is full (the next cell wraps)."""
    for ch in _CSI.sub("", text):
        if ch in "\r\n":
            column = 0
        elif ch == "\t":
            column = min(width, (column // 8 + 1) * 8) if column < width else 8
        elif ch.isprintable():
            cells = _cells(ch)
            if cells and column + cells > width:
                column = 0
            column += cells
    return column


# ---------------------------------------------------------------------------- drawing


def _width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80
    return max(20, columns) if columns else 80  # 0: a terminal that does not say


class Spinner:
    """Shows a wait on ``err`` from a thread. ``status()`` says what is happening (polled
    every ``poll_s`` while a wait is shown); a wait is shown once ``pause_due`` (or at once
    with ``delay=False``). On a terminal a spinner line is drawn and redrawn in place; elsewhere
    one plain line per new status text (nothing while the status is empty). With ``track``
    (stdout is the same terminal) the answer's column is followed: a spinner during a pause
    mid-line goes on the next line and the cursor comes back to where the answer stopped."""

    def __init__(self, err: TextIO, status: Callable[[], str], *, draw: bool, delay: bool = True,
                 poll_s: float = POLL_S, track: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.err, self._status, self.draw, self.delay, self.poll_s = err, status, draw, delay, poll_s
        self.track, self.clock = track, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = clock()
        self._got_first = False
        self._column = 0  # where the answer's last line ends, when stdout is this terminal
        self._shown: str | None = None  # the text on screen now, or None
        self._said = ""  # plain mode: the last status printed this pause
        self._frame = 0
        self._text = ""
        self._polled_at = float("-inf")

    def __enter__(self) -> Spinner:
        self._thread = threading.Thread(target=self._run, name="nodectl-spinner", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._erase()

    @contextlib.contextmanager
    def writing(self, text: str) -> Iterator[None]:
        """Around a write of ``text`` to stdout: the spinner is erased first and stays away."""
        with self._lock:
            self._erase()
            yield
            self._last, self._said = self.clock(), ""
            if text:
                self._got_first = True
            if self.track:
                self._column = advance(self._column, text, _width(self.err))

    def refresh(self) -> None:
        """Redraw now (the status changed), rather than at the next frame."""
        with self._lock:
            self._tick(self.clock(), poll=True)

    # -- the thread

    def _run(self) -> None:
        while not self._stop.wait(FRAME_S):
            if self._poll_due():  # before the frame: a pause's first frame says what it is
                text = self._safe_status()  # outside the lock: a request to the daemon
                with self._lock:
                    self._text, self._polled_at = text, self.clock()
            with self._lock:
                if self._stop.is_set():
                    return
                self._tick(self.clock(), poll=False)

    def _poll_due(self) -> bool:
        with self._lock:
            now = self.clock()
            return self._due(now) and now - self._polled_at >= self.poll_s

    def _safe_status(self) -> str:
        try:
            return clean(self._status(), 200)
        except Exception:  # advisory: a failed look at the model never ends the answer
            return self._text

    def _due(self, now: float) -> bool:
        return not self.delay or pause_due(now - self._last, self._got_first)

    def _tick(self, now: float, *, poll: bool) -> None:
        if poll:
            self._text = self._safe_status()
        if not self._due(now):
            return
        if not self.draw:
            if self._text and self._text != self._said:
                self._said = self._text
                self.err.write(self._text + "\n")
                self.err.flush()
            return
        frame = FRAMES[self._frame % len(FRAMES)]
        self._frame += 1
        room = _width(self.err) - 1
        line = f"{frame} {self._text}".rstrip()[:room]
        prefix = "\r"
        if self._shown is None and 0 < self._column:
            prefix = "\r\n"  # mid-line: below the answer, which is left as it is
        self.err.write(f"{prefix}{line}\x1b[K")
        self.err.flush()
        self._shown = line

    def _erase(self) -> None:
        if self._shown is None:
            return
        back = ""
        width = _width(self.err)
        if 0 < self._column < width:  # up to the answer's line, to the cell after its end
            back = f"\x1b[A\x1b[{self._column + 1}G"
        # At column == width the answer's next character wraps to this line's start anyway.
        self.err.write(f"\r\x1b[K{back}")
        self.err.flush()
        self._shown = None


# ---------------------------------------------------------------------------- talking to the daemon


@dataclass(frozen=True)
class Loaded:
    """The model ``run`` talks to: its digest (None when /api/ps never named it) and the
    seconds this command spent loading it (0 when it was loaded already)."""

    digest: str | None
    load_s: float = 0.0


def ensure_loaded(args: Namespace, name: str, err: TextIO) -> Loaded:
    """The model, loaded through ``POST /api/load`` with its progress on ``err`` when
    ``/api/ps`` does not list it yet; the load's error is a CliError."""
    entry = find_model(call(args, "GET", "/api/ps").get("models"), name)
    if entry is not None:
        return Loaded(str(entry.get("digest") or "") or None)
    t0 = time.monotonic()
    progress = LoadProgress(name)
    spinner = Spinner(err, lambda: progress.status, draw=True, delay=False, poll_s=FRAME_S) if draws(err) else None
    events = stream(args, "POST", "/api/load", {"model": name})
    with contextlib.closing(events), spinner or contextlib.nullcontext():
        for event in events:
            if "error" in event:
                raise CliError(str(event["error"]))
            line = progress.feed(event)
            if spinner is not None:
                spinner.refresh()
            elif line is not None:
                err.write(line + "\n")
                err.flush()
            if event.get("status") == "success":
                return Loaded(str(event.get("digest") or "") or None, time.monotonic() - t0)
    raise CliError(f"the daemon stopped answering before {name!r} was loaded; see its log")


def ps_status(args: Namespace, name: str, digest: str | None) -> Callable[[], str]:
    """A poll of what is happening to the model now (its /api/ps ``status``), quick to give up."""
    quick = Namespace(**{**vars(args), "timeout": 2.0})

    def status() -> str:
        entry = find_model(call(quick, "GET", "/api/ps").get("models"), name, digest)
        return str(entry.get("status") or "") if entry is not None else ""

    return status
