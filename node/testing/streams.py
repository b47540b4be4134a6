"""Clients of a local cluster's generation API for the chaos trials: POST and read a whole
NDJSON answer, and greedy streams read line by line on their own threads, recording when
each line came (the longest pause), the text, and how each ended. Never raise: what went
wrong is in the result's ``error``."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from node.testing.localcluster import LocalCluster, LocalNode

__all__ = ["LINE_TIMEOUT", "Stream", "StreamResult", "failure", "json_line", "post_lines", "run_streams"]

LINE_TIMEOUT = 60.0  # no line for this long: the stream hangs


@dataclass
class StreamResult:
    """One streamed generation as the client saw it."""

    entry: str  # the node it entered through
    prompt: str
    status: int = 0  # HTTP status (0: no answer)
    completed: bool = False  # HTTP 200, a final line with done, no error line
    text: str = ""
    lines: int = 0
    pause_s: float = 0.0  # the longest gap between two lines
    first_line_s: float | None = None  # from the request to the first line
    lines_at_kill: int | None = None
    error: str = ""
    times: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("times")
        return out



def post_lines(cluster: LocalCluster, node: LocalNode, path: str, body: Mapping[str, Any],
                timeout: float) -> tuple[int, list[dict[str, Any]]]:
    """POST a JSON body and read the whole NDJSON (or JSON) answer; the socket timeout
    bounds each read and the caller's deadline the whole."""
    conn = cluster.connection(node, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        deadline = time.monotonic() + timeout
        lines: list[dict[str, Any]] = []
        while raw := resp.readline():
            if raw.strip():
                lines.append(json_line(raw))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} on {node.root.name} did not end in {timeout:.0f} s")
        return resp.status, lines
    finally:
        conn.close()


def json_line(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"error": f"not JSON: {raw[:200]!r}"}
    return value if isinstance(value, dict) else {"error": f"not an object: {raw[:200]!r}"}


def failure(what: str, status: int, lines: list[dict[str, Any]]) -> str | None:
    """The message for an answer that did not end in success, or None."""
    err = next((x["error"] for x in lines if "error" in x), None)
    if status != 200 or err is not None or not lines or lines[-1].get("status") != "success":
        return f"{what}: HTTP {status}: {err or (lines[-1] if lines else 'empty answer')}"
    return None


class Stream(threading.Thread):
    """A greedy /api/generate streamed through one node, read line by line on a thread."""

    def __init__(self, cluster: LocalCluster, node: LocalNode, model: Any, prompt: str,
                 deadline: float) -> None:
        super().__init__(name=f"stream-{node.root.name}", daemon=True)
        self.cluster, self.node, self.model, self.deadline = cluster, node, model, deadline
        self.result = StreamResult(node.root.name, prompt)
        self.sock: socket.socket | None = None
        self.stopped = False

    def run(self) -> None:
        r, t0 = self.result, time.monotonic()
        body = {"model": self.model.name, "prompt": r.prompt, "raw": self.model.raw, "stream": True,
                "options": {"temperature": 0, "num_predict": self.model.num_predict}}
        conn = self.cluster.connection(self.node, timeout=LINE_TIMEOUT)
        done = False
        try:
            conn.request("POST", "/api/generate", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            self.sock = conn.sock
            resp = conn.getresponse()
            r.status = resp.status
            while raw := resp.readline():
                if not raw.strip():
                    continue
                r.times.append(time.monotonic())
                line = json_line(raw)
                if "error" in line:
                    r.error = f"{'HTTP ' + str(r.status) + ': ' if r.status != 200 else 'error line: '}{line['error']}"
                    break
                r.text += str(line.get("response", ""))
                done = line.get("done") is True
                if done:
                    break
            if not done and not r.error:
                r.error = f"the stream ended after {len(r.times)} lines without a final done line"
        except TimeoutError:
            r.error = f"no line for {LINE_TIMEOUT:.0f} s after {len(r.times)} lines (a hang)"
        except Exception as exc:  # a trial never raises; the message says what
            r.error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if self.stopped and not done:
            r.error = f"no end after {self.deadline - t0:.0f} s ({len(r.times)} lines): a hang"
        r.lines = len(r.times)
        r.first_line_s = round(r.times[0] - t0, 3) if r.times else None
        r.pause_s = round(max((b - a for a, b in zip(r.times, r.times[1:], strict=False)), default=0.0), 3)
        r.completed = r.status == 200 and done and not r.error

    def stop(self) -> None:
        """Unblock a read that waits past the deadline (shutdown wakes a blocked recv)."""
        self.stopped = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def run_streams(cluster: LocalCluster, entries: list[LocalNode], model: Any, deadline: float, *,
                 kill: Callable[[list[Stream]], None] | None = None) -> list[StreamResult]:
    streams = [Stream(cluster, node, model, prompt, deadline)
               for node, prompt in zip(entries, model.prompts, strict=True)]
    for s in streams:
        s.start()
    try:
        if kill is not None:
            kill(streams)
    finally:
        for s in streams:
            s.join(max(0.0, deadline - time.monotonic()))
        for s in streams:
            if s.is_alive():
                s.stop()
                s.join(10)
    return [s.result for s in streams]
