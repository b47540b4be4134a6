#!/usr/bin/env python3
"""Benchmark what apps use: constrained decoding, embeddings and forced tool calls, through a
real local daemon's HTTP API.

    python scripts/bench_api.py [--tokens 96] [--rounds 3] [--json]

Keys of the JSON:
- free_tok_s / constrained_tok_s / constrained_vs_free: SmolLM2-135M-Instruct (the real
  Q4_1 GGUF, the catalogue's), one greedy stream's decode tokens/s without and with a JSON
  schema held by the grammar (the daemon's eval_count / eval_duration; best of --rounds,
  alternating), and their ratio (the target is >= 0.9);
- embed_per_s: SmolLM2's embeddings of 64 short inputs in one /api/embed request;
- tool_call_ttft_s / tool_call_s: time to the first streamed chunk of a forced tool call
  (OpenAI's API, tool_choice "required": the grammar is compiled for the request, the first
  token masked) and to the chunk carrying the call (a call goes out whole, once it parses),
  on a tiny random model whose template takes tools (SmolLM2's does not): enjambre's
  overhead, not a model's speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEYS = ("free_tok_s", "constrained_tok_s", "constrained_vs_free", "embed_per_s", "tool_call_ttft_s", "tool_call_s")
ENV = {"PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"}
# A long free-text field: the constrained answer runs as long as the free one.
STORY = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": {"type": "string"}},
         "required": ["title", "story"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False}}}


def post(node: Any, path: str, body: dict[str, Any], timeout: float = 1800) -> Any:
    req = urllib.request.Request(f"http://{node.api}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def nodectl(node: Any, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(node.config)], check=True,
                   capture_output=True, timeout=1800)


def decode_rate(node: Any, tokens: int, schema: dict[str, Any] | None) -> float:
    body: dict[str, Any] = {"model": "smollm2", "stream": False, "messages": [
        {"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON with a title and the story."}],
        "options": {"temperature": 0, "num_predict": tokens}}
    if schema is not None:
        body["format"] = schema
    done = post(node, "/api/chat", body)
    if schema is not None:
        if done["done_reason"] == "stop":  # complete: it parses
            json.loads(done["message"]["content"])
    return float(done["eval_count"]) / (done["eval_duration"] / 1e9)


def tool_times(node: Any) -> tuple[float, float]:
    """(time to the first streamed chunk, time to the chunk carrying the call)."""
    body = {"model": "tools-tiny", "stream": True, "max_tokens": 200, "tool_choice": "required", "tools": [TOOL],
            "messages": [{"role": "user", "content": "hola"}]}
    req = urllib.request.Request(f"http://{node.api}/v1/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    first = call = None
    seen: list[bytes] = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            seen.append(raw)
            if raw.startswith(b"data: {") and first is None:
                first = time.monotonic() - t0
            if b'"tool_calls"' in raw and call is None:
                call = time.monotonic() - t0
    assert first is not None and call is not None, f"no tool call came: {b''.join(seen)[-1500:]!r}"
    return first, call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from node.gguf.catalog import fetch, lookup
    from node.testing.localcluster import LocalCluster
    from node.testing.tinymodel import make_tiny_model
    from tests.helpers.faces import TOOLS_BLOCK

    entry = lookup("smollm2:135m")
    assert entry is not None
    gguf = fetch(entry)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = make_tiny_model(root / "tools-tiny", layers=2, hidden=64, intermediate=128)
        cfg_path = tiny / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = TOOLS_BLOCK + cfg["chat_template"]
        cfg_path.write_text(json.dumps(cfg))
        cluster = LocalCluster(root / "cluster", env=ENV)
        try:
            node = cluster.add_node(config={"resources": {"max_memory": 4 * 2**30}})
            cluster.start(node)
            nodectl(node, "pull", str(gguf), "--name", "smollm2")
            nodectl(node, "pull", str(tiny), "--name", "tools-tiny")
            decode_rate(node, 8, None)  # load and compile both ways first
            decode_rate(node, 8, STORY)
            free: list[float] = []
            held: list[float] = []
            for _ in range(args.rounds):
                free.append(decode_rate(node, args.tokens, None))
                held.append(decode_rate(node, args.tokens, STORY))
            inputs = [f"sentence number {i} about the sea" for i in range(64)]
            post(node, "/api/embed", {"model": "smollm2", "input": inputs[:2]})  # warm
            t0 = time.monotonic()
            out = post(node, "/api/embed", {"model": "smollm2", "input": inputs})
            embed_s = time.monotonic() - t0
            assert len(out["embeddings"]) == 64
            tool_times(node)  # the model loads and compiles
            times = [tool_times(node) for _ in range(3)]
        finally:
            cluster.close()
    result = {"free_tok_s": max(free), "constrained_tok_s": max(held),
              "constrained_vs_free": max(held) / max(free), "embed_per_s": 64 / embed_s,
              "tool_call_ttft_s": min(t[0] for t in times), "tool_call_s": min(t[1] for t in times),
              "meta": {"model": "SmolLM2-135M-Instruct Q4_1 (f32 compute)", "tokens": args.tokens,
                       "rounds": args.rounds, "free_all": free, "constrained_all": held}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'key':<22} value")
        for key in KEYS:
            print(f"{key:<22} {result[key]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
