#!/usr/bin/env python3
"""Benchmark distributed generation between real local daemons, in one run.

    python scripts/bench_pipeline.py [--shape qwen0.5b|quick] [--tokens 64] [--json]

A random model in the Qwen2.5-0.5B shape, float32 (``quick``: a tiny one, to check
the script), served by real ``nodectl serve`` daemons on 127.0.0.1. Keys of the JSON:
- single_node_tok_s / two_node_tok_s / three_node_tok_s: one greedy stream's decode
  tokens/s with the model whole on one node, split over two, over three;
- one_stream_tok_s / two_stream_aggregate_tok_s: two nodes, each daemon pinned to its
  own core (taskset), one stream against the sum of two concurrent streams' tokens/s
  (two_node_tok_s runs unpinned, sharing the cores as the single node does);
- eight_stream_aggregate_tok_s, itl_p50_ms, itl_p99_ms: eight concurrent streams on
  the three-node chain, total tokens/s and the inter-token latency seen by clients;
- ttft_1node_s / ttft_3node_s: time to first token of a 512-token prompt;
- recovery_s: the longest pause in a stream when the middle node is SIGKILLed (its
  pieces already on the spare node), with the new stages' compile time in meta;
- load_3node_s / load_1node_s: `nodectl load` when only one node holds the model
  (the swarm brings the others their ranges) and on one node from its own store.
Tokens/s come from the daemon's own eval_count / eval_duration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KEYS = ("single_node_tok_s", "two_node_tok_s", "three_node_tok_s", "one_stream_tok_s",
        "two_stream_aggregate_tok_s", "eight_stream_aggregate_tok_s", "itl_p50_ms", "itl_p99_ms",
        "ttft_1node_s", "ttft_3node_s", "recovery_s", "load_3node_s", "load_1node_s")
SLOTS, CHUNK = 8, 256
ENV = {"PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"}


def make_model(root: Path, shape: str) -> Path:
    from node.testing.tinymodel import make_tiny_model

    tiny = make_tiny_model(root / "tok", layers=2)
    if shape == "quick":
        return make_tiny_model(root / "model", layers=6, hidden=64, intermediate=128)
    import bench_engine

    out = root / "model"
    bench_engine.write_checkpoint(bench_engine.SHAPES["qwen0.5b"], out)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # prompts use ids < 512
        shutil.copy(tiny / name, out / name)
    return out


def stream(node: Any, prompt: str, n: int, marks: list[float] | None = None,
           on_line: Any = None) -> dict[str, Any]:
    body = {"model": "bench", "prompt": prompt,
            "raw": True, "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": n}}
    req = urllib.request.Request(f"http://{node.api}/api/generate", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    final: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=1800) as resp:
        for i, raw in enumerate(resp):
            line = json.loads(raw)
            if marks is not None:
                marks.append(time.monotonic())
            if on_line is not None:
                on_line(i)
            if "error" in line:
                raise RuntimeError(line["error"])
            if line.get("done"):
                final = line
    return final


def tok_s(final: dict[str, Any]) -> float:
    return float(final["eval_count"]) / (final["eval_duration"] / 1e9)


def cluster(root: Path, n: int, lend: int | None, context: int, cores: list[str] | None = None) -> Any:
    from node.testing.localcluster import LocalCluster

    root.mkdir(parents=True, exist_ok=True)
    c = LocalCluster(root, env=ENV)
    engine = {"max_context": context, "max_sessions": SLOTS, "prefill_chunk": CHUNK, "queue": 16,
              "compute_dtype": "float32", "step_timeout": 120.0}
    for i in range(n):
        if cores is not None:
            wrapper = root / f"python-core{cores[i]}"
            wrapper.write_text(f'#!/bin/sh\nexec taskset -c {cores[i]} {sys.executable} "$@"\n')
            wrapper.chmod(0o755)
            c.python = str(wrapper)
        resources = {"max_memory": lend or 8 * 2**30}
        node = c.add_node(config={"resources": resources, "engine": engine})
        c.start(node, timeout=120)
    c.python = sys.executable
    c.wait_converged(timeout=120)
    return c


def nodectl(node: Any, *args: str) -> str:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                         timeout=3600, env={**os.environ, "ENJAMBRE_CONFIG": str(node.config)})
    if out.returncode != 0:
        raise RuntimeError(f"nodectl {args[0]}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def pull(c: Any, model: Path) -> None:
    nodectl(c.nodes[0], "pull", str(model), "--name", "bench", "--piece-size", "4MiB")
    time.sleep(1.5)


def timed_load(node: Any) -> float:
    t0 = time.monotonic()
    nodectl(node, "load", "bench")
    return time.monotonic() - t0


def plan_of(node: Any) -> list[dict[str, Any]]:
    return list(json.loads(nodectl(node, "ps", "--json"))["models"][0]["plan"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from node.testing.plans import lend_for_split

    res: dict[str, Any] = dict.fromkeys(KEYS)
    meta: dict[str, Any] = {"shape": args.shape, "cpus": os.cpu_count(), "tokens": args.tokens, "notes": []}
    short = "1 2 3 4 5 6 7 8"
    n = args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root, args.shape)
        long_prompt = _prompt_of(model, 512)
        context = 1024
        lends = {k: lend_for_split(model, k, context=context, slots=SLOTS, prefill_chunk=CHUNK) for k in (2, 3)}
        meta["lend_bytes"] = lends

        def say(text: str) -> None:
            print(f"  {text}", file=sys.stderr, flush=True)

        # One node: the whole model, no network.
        with cluster(root / "one", 1, None, context) as c:
            pull(c, model)
            res["load_1node_s"] = timed_load(c.nodes[0])
            stream(c.nodes[0], short, 4)  # warm
            res["single_node_tok_s"] = tok_s(stream(c.nodes[0], short, n))
            res["ttft_1node_s"] = _ttft(c.nodes[0], long_prompt)
        say("one node done")
        # Two nodes sharing the machine's cores, like the single node.
        with cluster(root / "two", 2, lends[2], context) as c:
            pull(c, model)
            timed_load(c.nodes[1])
            stream(c.nodes[1], short, 4)
            res["two_node_tok_s"] = tok_s(stream(c.nodes[1], short, n))
        say("two nodes done")
        # Two nodes, each pinned to its own core: does a second stream fill the pipeline?
        with cluster(root / "pinned", 2, lends[2], context, cores=["0", "1"]) as c:
            pull(c, model)
            timed_load(c.nodes[1])
            meta["two_node_pinned_plan"] = [[s["start"], s["end"]] for s in plan_of(c.nodes[1])]
            stream(c.nodes[1], short, 4)
            res["one_stream_tok_s"] = tok_s(stream(c.nodes[1], short, n))
            finals: list[dict[str, Any]] = [{}, {}]
            threads = [threading.Thread(target=lambda i=i: finals.__setitem__(i, stream(c.nodes[1], f"{i} 9 8", n)))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            res["two_stream_aggregate_tok_s"] = sum(tok_s(f) for f in finals)
        say("two pinned nodes done")
        # Three nodes plus a spare (for the recovery), only the first holding the model.
        with cluster(root / "three", 4, lends[3], context) as c:
            pull(c, model)
            driver = c.nodes[0]
            res["load_3node_s"] = timed_load(driver)
            plan = plan_of(driver)
            meta["three_node_plan"] = [[s["start"], s["end"]] for s in plan]
            stream(driver, short, 4)
            res["three_node_tok_s"] = tok_s(stream(driver, short, n))
            res["ttft_3node_s"] = _ttft(driver, long_prompt)
            marks: list[list[float]] = [[] for _ in range(8)]
            finals8: list[dict[str, Any]] = [{} for _ in range(8)]
            threads = [threading.Thread(target=lambda i=i: finals8.__setitem__(
                i, stream(driver, f"{i} 5 {i}", n, marks[i]))) for i in range(8)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            res["eight_stream_aggregate_tok_s"] = sum(f["eval_count"] for f in finals8) / wall
            gaps = sorted(b - a for m in marks for a, b in itertools.pairwise(m[:-1]))  # token lines only
            if gaps:
                res["itl_p50_ms"] = statistics.median(gaps) * 1e3
                res["itl_p99_ms"] = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1e3
            say("eight streams done")
            # Recovery: the spare already holds the middle range's pieces.
            middle = next(x for x in c.nodes if x.node_id == plan[1]["node_id"])
            spare = next(x for x in c.nodes if x.node_id not in {s["node_id"] for s in plan})
            nodectl(spare, "pull", "bench")
            driver = next(x for x in c.nodes if x is not middle and x is not spare)
            stamps: list[float] = []

            def kill(i: int) -> None:
                if i == 10:
                    os.kill(middle.proc.pid, signal.SIGKILL)

            stream(driver, short, max(n, 40), stamps, on_line=kill)
            pauses = [b - a for a, b in itertools.pairwise(stamps)]
            res["recovery_s"] = max(pauses[9:]) if len(pauses) > 9 else None
            meta["plan_after_recovery"] = [[s["start"], s["end"]] for s in plan_of(driver)]
            meta["recovery_stage_load_s"], meta["recovery_stage_compile_s"] = _last_stage_times(spare)
        say("three nodes done")
    meta["targets"] = verdicts(res)
    return {**res, "meta": meta}


def _last_stage_times(node: Any) -> tuple[float | None, float | None]:
    """(load_s, compile_s) of the last stage this node loaded, from its log."""
    found: tuple[float | None, float | None] = (None, None)
    for line in node.log_path.read_text(errors="replace").splitlines():
        if '"stage_ready"' in line:
            try:
                event = json.loads(line)
                found = (float(event["load_s"]), float(event["compile_s"]))
            except (ValueError, KeyError):
                continue
    return found


def _prompt_of(model: Path, tokens: int) -> str:
    """A raw prompt of exactly `tokens` tokens for this model's tokenizer."""
    from node.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(model)
    words = ["casa", "perro", "sol", "mar", "luz", "pan", "río", "cielo"]
    text = ""
    i = 0
    while len(tok.encode(text)) < tokens:
        text += words[i % len(words)] + " "
        i += 1
    ids = tok.encode(text)[:tokens]
    out = tok.decode(ids)
    assert len(tok.encode(out)) <= tokens + 8
    return out


def _ttft(node: Any, prompt: str) -> float:
    marks: list[float] = []
    t0 = time.monotonic()
    stream(node, prompt, 2, marks)
    return marks[0] - t0


def verdicts(res: dict[str, Any]) -> dict[str, str]:
    out = {}

    def ratio(name: str, a: Any, b: Any, target: float) -> None:
        if a and b:
            r = a / b
            out[name] = f"{'met' if r >= target else 'missed'} ({r:.2f} >= {target})"

    ratio("two_vs_one_node", res["two_node_tok_s"], res["single_node_tok_s"], 0.9)
    ratio("three_vs_one_node", res["three_node_tok_s"], res["single_node_tok_s"], 0.9)
    ratio("two_streams_vs_one", res["two_stream_aggregate_tok_s"], res["one_stream_tok_s"], 1.6)
    if res["recovery_s"] is not None:
        out["recovery"] = f"{'met' if res['recovery_s'] < 5 else 'missed'} ({res['recovery_s']:.1f} s < 5 s + compile)"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["qwen0.5b", "quick"], default="qwen0.5b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args)
    print(f"{'metric':32s}{'value':>12s}")
    for k in KEYS:
        v = result[k]
        print(f"{k:32s}{'-' if v is None else format(v, '12.3f'):>12s}")
    for name, verdict in result["meta"]["targets"].items():
        print(f"  {name:28s}{verdict}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
