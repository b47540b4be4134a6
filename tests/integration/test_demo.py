"""`nodectl demo`, the README's main command: three real daemons split a model and answer,
the console's address is printed, and Ctrl-C stops every daemon cleanly. (`--tiny`: CI
must not depend on the catalogue's download; tests/integration/test_real_model.py runs
SmolLM2 over three nodes.)"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> str:
    assert proc.stdout is not None
    out, deadline = b"", time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {marker!r} after {timeout:.0f} s:\n{out.decode()[-3000:]}"
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if ready:
            out += os.read(proc.stdout.fileno(), 65536)
    return out.decode()


def test_demo_answers_across_three_nodes_and_stops_on_ctrl_c(tmp_path: Path, shared_cache: Path) -> None:
    root = tmp_path / "demo"
    env = {**os.environ, "XDG_CACHE_HOME": str(shared_cache), "ENJAMBRE_BENCH_SECONDS": "0.2",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "demo", "--tiny", "--keep", "--dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        out = read_until(proc, b"Ctrl-C stops them", 400)
        assert "tiny random model" in out  # said plainly
        plan = re.search(r"plan: (.*)", out)
        assert plan is not None and len(re.findall(r"node\d \[\d, \d\)", plan.group(1))) == 3, out
        assert out.count("tok/s") >= 2 and out.count("nodes: ") >= 2
        assert re.search(r"web console: http://127\.0\.0\.1:\d+/", out)
        assert "ollama:" in out and "hf:" in out and ".gguf" in out
        pids = [json.loads((root / f"node{i}" / "data" / "daemon.json").read_text())["pid"] for i in range(3)]
        assert all(psutil.pid_exists(p) for p in pids)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to a terminal's foreground group
        rest = read_until(proc, b"done", 60)
        assert proc.wait(30) == 0 and "stopping the nodes" in rest
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
