"""`nodectl run`, `show` and `cp` against the shared three-node cluster (tests/helpers/faces.py).

The chat is driven through a pseudo-terminal, as a person would type it: /set lines,
a greedy answer equal to the single-process engine's, a \"\"\" block, /show info,
/clear, Ctrl-C at the prompt and during an answer, /bye. The copy made here gets its
own name and is removed again by that name only (the model and its pieces stay). A
second small model is pulled, run (loaded first, with its progress on stderr) and
unloaded again, so the cluster holds only faces-model afterwards.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from node.engine.tokenizer import Tokenizer
from node.testing.tinymodel import make_tiny_model
from tests.helpers.faces import MODEL, Faces

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
PROMPT = b">>> "
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


_EXPECTED: dict[tuple[str, int], str] = {}


def expected(faces: Faces, content: str, n: int) -> str:
    """The engine's greedy answer with Ollama's default repeat_penalty (1.1), computed once."""
    if (content, n) not in _EXPECTED:
        tok = faces.tokenizer
        ids = faces.reference(tok.encode_chat([{"role": "user", "content": content}]), n, penalty=1.1)
        _EXPECTED[content, n] = tok.decode(ids)
    return _EXPECTED[content, n]


# The child takes the terminal as its controlling one (so ^C is SIGINT to it), then runs nodectl.
_TAKE_TERMINAL = ("import fcntl, runpy, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                  "sys.argv[0] = 'nodectl'; runpy.run_module('node.cli', run_name='__main__')")


class Terminal:
    """`nodectl run MODEL` on a pseudo-terminal; every read is bounded."""

    def __init__(self, faces: Faces, *args: str) -> None:
        env = {**os.environ, "ENJAMBRE_CONFIG": str(faces.entry.config), "TERM": "dumb"}
        self.fd, child = os.openpty()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _TAKE_TERMINAL, "run", MODEL, *args],
                                         stdin=child, stdout=child, stderr=child, env=env, cwd=ROOT,
                                         start_new_session=True)
        finally:
            os.close(child)
        self.buffer = b""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.buffer += data
        return bool(data)

    def until(self, marker: bytes, timeout: float = 120.0) -> str:
        """Everything up to and including ``marker`` (ANSI codes dropped, \\r\\n as \\n). The
        timeout is generous: the first answer compiles on every stage, on shared cores."""
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 1.0)) and self.exited()):
                raise AssertionError(f"no {marker!r} within {timeout} s; got {self.buffer[-2000:]!r}")
        at = self.buffer.index(marker) + len(marker)
        out, self.buffer = self.buffer[:at], self.buffer[at:]
        return _ANSI.sub("", out.decode("utf-8", "replace")).replace("\r\n", "\n")

    def line(self, text: str, *, wait: bytes = PROMPT, timeout: float = 120.0) -> str:
        """Type a line; what it printed before the next ``wait`` (the echo removed)."""
        os.write(self.fd, text.encode() + b"\r")
        out = self.until(wait, timeout)
        echo, _, rest = out.partition("\n")
        assert echo.endswith(text), out
        return rest[: -len(wait)]

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def wait(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while not self.exited():
            assert time.monotonic() < deadline, f"nodectl run did not exit; output {self.buffer[-2000:]!r}"
            self._read(0.2)
        return self.proc.returncode

    def close(self) -> None:
        if not self.exited():
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def sessions(faces: Faces) -> int:
    status, body = faces.request("GET", "/api/ps")
    assert status == 200
    return sum(m["sessions"] for m in json.loads(body)["models"])


def test_interactive_chat_on_a_terminal(faces: Faces) -> None:
    hola = expected(faces, "hola", 8)
    block = expected(faces, "hola\nque tal", 8)
    term = Terminal(faces)
    try:
        term.until(PROMPT)
        assert term.line("/set parameter temperature 0") == "Set parameter 'temperature' to '0'\n"
        assert term.line("/set parameter num_predict 8") == "Set parameter 'num_predict' to '8'\n"
        assert "unknown parameter 'nonsense'" in term.line("/set parameter nonsense 1")
        assert term.line("hola") == hola + "\n\n"
        assert term.line("/set format json") == "Set format to 'json' mode.\n"
        term.line("/set parameter num_predict 200")
        answer = term.line("hola")
        assert isinstance(json.loads(answer), dict), answer  # a random model, held to JSON
        term.line("/set noformat")
        term.line("/set parameter num_predict 8")
        assert term.line("/clear") == "Cleared session context\n"
        term.line('"""', wait=b"... ")
        term.line("hola", wait=b"... ")
        term.line("que tal", wait=b"... ")
        assert term.line('"""') == block + "\n\n"
        info = term.line("/show info")
        assert "architecture" in info and "llama" in info and "completion" in info
        assert "Available Commands" in term.line("/?")

        os.write(term.fd, b"\x03")  # at the prompt: a hint, not an exit
        assert "Use Ctrl + d or /bye to exit." in term.until(PROMPT)

        term.line("/clear")
        term.line("/set verbose")
        term.line("/set parameter num_predict 2000")
        os.write(term.fd, b"cuenta hasta cien\r")
        term.until(b"cuenta hasta cien\r\n")
        term._read(60.0)  # the first piece of the answer
        os.write(term.fd, b"\x03")
        stopped = term.until(PROMPT)
        assert "eval count" not in stopped, "the answer ended before Ctrl-C; ask for a longer one"
        deadline = time.monotonic() + 15
        while sessions(faces) and time.monotonic() < deadline:  # the daemon frees the session
            time.sleep(0.2)
        assert sessions(faces) == 0

        term.line("/clear")
        term.line("/set quiet")
        term.line("/set parameter num_predict 8")
        assert term.line("hola") == hola + "\n\n"  # the chat still answers, from a clean history
        os.write(term.fd, b"/bye\r")
        assert term.wait() == 0
    finally:
        term.close()


def run_cli(faces: Faces, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENJAMBRE_CONFIG": str(faces.entry.config)}
    return subprocess.run([sys.executable, "-m", "node.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_run_with_a_prompt_or_stdin(faces: Faces) -> None:
    hola = expected(faces, "hola", 8)
    out = faces.nodectl("run", MODEL, "hola", "--verbose", "--temperature", "0", "--num-predict", "8")
    assert out.stdout == hola + "\n"
    for key in ("tok/s", "time to first token", "prompt eval count", "eval count:"):
        assert key in out.stderr
    nodes = re.search(r"nodes: +(.*)", out.stderr)
    assert nodes is not None and sorted(nodes.group(1).split(", ")) == sorted(n.node_id[:12] for n in faces.nodes)
    piped = run_cli(faces, "run", MODEL, "--temperature", "0", "--num-predict", "8", stdin="hola")
    assert piped.returncode == 0 and piped.stdout == hola + "\n", piped.stderr
    # Asked to think, the tiny model never closes its <think>: all of it is thinking.
    greedy = ("--temperature", "0", "--num-predict", "8")
    thinking = faces.nodectl("run", MODEL, "hola", "--think", *greedy).stdout
    assert thinking.startswith("Thinking...\n") and thinking.endswith("\n...done thinking.\n\n\n"), thinking
    assert "Thinking" not in faces.nodectl("run", MODEL, "hola", "--hidethinking", *greedy).stdout


def _loaded_names(faces: Faces) -> list[str]:
    return [m["name"] for m in json.loads(faces.request("GET", "/api/ps")[1])["models"]]


def test_run_loads_a_model_first_showing_its_progress(faces: Faces, tmp_path: Path) -> None:
    small = make_tiny_model(tmp_path / "run-model", layers=2, hidden=32, intermediate=64, vocab_size=288)
    faces.nodectl("pull", str(small))
    assert "run-model" not in _loaded_names(faces)
    tok = Tokenizer.from_model_dir(small)
    want = tok.decode(faces.reference(tok.encode_chat([{"role": "user", "content": "hola"}]), 6, penalty=1.1,
                                      model_dir=small))
    try:
        out = faces.nodectl("run", "run-model", "hola", "--verbose", "--temperature", "0", "--num-predict", "6")
        assert out.stdout == want + "\n"  # only the answer: the progress went to stderr
        err = out.stderr
        assert "\x1b" not in err and "\r" not in err  # not a terminal: plain lines, no control codes
        plan = re.search(r"^plan: ((?:node\d \d-\d(?:, )?)+)$", err, re.M)
        assert plan is not None, err
        stages = re.findall(r"(node\d) (\d)-(\d)", plan.group(1))
        assert stages[0][1] == "0" and stages[-1][2] == "2", err  # the layers, all of them
        for node, a, b in stages:
            assert re.search(rf"^layers {a}-{b} ready on {node} \(load [\d.]+ s, compile [\d.]+ s; \d of "
                             rf"{len(stages)} ready\)$", err, re.M), err
        assert re.search(r"^loaded run-model on \d node\(s\): node\d 0-", err, re.M), err
        assert err.index("plan: ") < err.index("loaded run-model") < err.index("total duration")
        load = re.search(r"load duration: +([\d.]+)s", err)
        assert load is not None and float(load.group(1)) > 0, err  # this command's load counts
        again = faces.nodectl("run", "run-model", "hola", "--temperature", "0", "--num-predict", "6")
        assert again.stdout == want + "\n" and again.stderr == ""  # loaded: nothing to show
    finally:
        faces.request("POST", "/api/unload", {"model": "run-model"})
        _eventually(lambda: "run-model" not in _loaded_names(faces))
    assert MODEL in _loaded_names(faces)


def test_run_errors_are_one_line(faces: Faces) -> None:
    for args in (("run", "no-such-model", "hola"), ("run", MODEL, "hola", "--format", "yaml")):
        out = faces.nodectl(*args, check=False)
        assert out.returncode == 1 and out.stdout.strip() == "", out
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("nodectl: "), out.stderr
    assert "not found" in faces.nodectl("run", "no-such-model", "hola", check=False).stderr
    empty = run_cli(faces, "run", MODEL, stdin="  ")
    assert empty.returncode == 1 and "the prompt is empty" in empty.stderr


def test_show(faces: Faces) -> None:
    data = json.loads(faces.nodectl("show", MODEL, "--json").stdout)
    _, tags = faces.request("GET", "/api/tags")
    listed = next(m for m in json.loads(tags)["models"] if m["name"] == f"{MODEL}:latest")
    assert data["details"] == {"parent_model": "", **listed["details"]}
    info = data["model_info"]
    assert info["general.architecture"] == "llama" and info["llama.block_count"] == 3
    assert info["llama.embedding_length"] == 64 and info["general.parameter_count"] == listed["parameters"]
    # The faces template takes tools and opens <think> when asked to (tests/helpers/faces.py).
    assert data["template"] == faces.tokenizer.chat_template
    assert data["capabilities"] == ["completion", "tools", "thinking"]
    assert '"<|eot_id|>"' in data["parameters"] and data["modelfile"].startswith("# Modelfile")
    assert f"FROM {MODEL}:latest" in data["modelfile"] and "license" not in data
    text = faces.nodectl("show", MODEL, node=faces.nodes[2]).stdout  # a node that holds only its layers
    for word in ("Model", "architecture", "llama", "context length", "4096", "embedding length", "Capabilities",
                 "completion", "tools", "Parameters", "<|eot_id|>"):
        assert word in text, text
    assert faces.nodectl("show", MODEL, "--template").stdout == f"{faces.tokenizer.chat_template}\n"
    missing = faces.nodectl("show", "no-such-model", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr and "'no-such-model' not found" in missing.stderr
    for body in (b"{", b"[]", json.dumps({"model": 5}).encode(), json.dumps({"model": MODEL, "verbose": 1}).encode()):
        status, answer = faces.request("POST", "/api/show", body)
        assert status == 400 and "error" in json.loads(answer), (body, answer)


def _tag_names(faces: Faces, node: Any = None) -> list[str]:
    out = faces.nodectl("list", "--json", node=node)
    return [m["name"] for m in json.loads(out.stdout)["models"]]


def _eventually(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the cluster did not catch up"
        time.sleep(0.3)


def test_copy_gives_another_name_everywhere_and_removing_it_keeps_the_model(faces: Faces) -> None:
    out = faces.nodectl("cp", MODEL, "some-copy")
    assert out.stdout.strip() == f"copied {MODEL!r} to 'some-copy'"
    status, body = faces.request("POST", "/api/show", {"model": "some-copy"})
    assert status == 200 and "FROM some-copy:latest" in json.loads(body)["modelfile"]
    _eventually(lambda: "some-copy:latest" in _tag_names(faces, node=faces.nodes[1]))
    elsewhere = json.loads(faces.nodectl("show", "some-copy", "--json", node=faces.nodes[1]).stdout)
    assert elsewhere["model_info"]["general.architecture"] == "llama"  # the name resolves on every node
    status, body = faces.request("POST", "/api/chat", {"model": "some-copy", "stream": False, "messages": [
        {"role": "user", "content": "hola"}], "options": {"temperature": 0, "num_predict": 8}})
    assert status == 200 and json.loads(body)["message"]["content"] == expected(faces, "hola", 8)

    for args, message in ((("cp", MODEL, "Bad Name!"), "is not a model name"),
                          (("cp", MODEL, "some-copy"), "already exists"),
                          (("cp", "no-such-model", "other-copy"), "404")):
        bad = faces.nodectl(*args, check=False)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr
    bad_bodies: list[Any] = [{"source": MODEL}, {"source": 1, "destination": "x"}, []]
    for bad_body in bad_bodies:
        status, _ = faces.request("POST", "/api/copy", bad_body)
        assert status == 400

    status, empty = faces.request("POST", "/api/copy", {"source": "some-copy", "destination": "other-copy:v2"})
    assert (status, empty) == (200, b"")  # Ollama's answer; a copy of a copy is one more name
    status, body = faces.request("DELETE", "/api/delete", {"model": "other-copy:v2"})
    assert status == 200 and json.loads(body)["names"] == ["other-copy:v2"]

    removed = faces.nodectl("rm", "some-copy")
    assert "removed the name some-copy" in removed.stdout and f"{MODEL}:latest" in removed.stdout
    assert "some-copy:latest" not in _tag_names(faces) and f"{MODEL}:latest" in _tag_names(faces)
    _eventually(lambda: "some-copy:latest" not in _tag_names(faces, node=faces.nodes[1]))
    status, _ = faces.request("POST", "/api/show", {"model": "some-copy"})
    assert status == 404
    assert sum(1 for _ in json.loads(faces.request("GET", "/api/ps")[1])["models"]) == 1  # still loaded
