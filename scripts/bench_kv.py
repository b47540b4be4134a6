"""Measure the KV cache's dtype and the attention read: accuracy, bytes and decode time.

    python scripts/bench_kv.py [--model smollm2|random|both] [--steps 64]
        [--positions 300,530,1000] [--only accuracy|speed] [--json]

- accuracy: for each cache dtype (float16, bfloat16) against the float32 cache, on the
  same weights: free-running greedy decoding for --steps tokens after a prompt (tokens
  equal to the float32 cache's, and the first step that differs), and teacher-forced on
  the float32 cache's tokens the largest |logit difference| over every step and the
  vocabulary, and how often the argmax agrees;
- bytes: the cache per slot at context 4096 (Partition.new_cache(1).nbytes);
- speed: batch-1 greedy tail steps, ms per token, with a session holding each of
  --positions tokens, per cache dtype and key bucket rule (--kv float16:pow2,...: the
  engine's half octaves, powers of two, whole blocks, or 1.5x steps), the best of
  --rounds rounds of 16 steps, the variants taking turns.

Models: "smollm2" is the real SmolLM2-135M-Instruct (the catalogue's Q4_1 GGUF,
dequantized, float32 compute); "random" the same shape (hidden 576, 30 layers, 9 heads,
3 kv heads) with random weights (bench_engine.random_partition).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from node.engine.buckets import pow2_bucket

CONTEXT = 4096
DTYPES = ("float32", "float16", "bfloat16")
SMOLLM2_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def smollm2_partition() -> tuple[Any, list[int]]:
    from node.engine import PartitionSpec, WeightSource, load_config, load_partition
    from node.engine.tokenizer import Tokenizer
    from node.gguf.catalog import fetch, lookup
    from node.gguf.sidecar import write_sidecars

    entry = lookup("smollm2:135m")
    assert entry is not None
    path = fetch(entry)
    side = write_sidecars(path, Path(tempfile.mkdtemp(prefix="bench-kv-")))
    config = load_config(side)
    prompt = Tokenizer.from_model_dir(side).encode_chat(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    )
    part = load_partition(WeightSource.from_gguf(path), config, PartitionSpec.whole(config),
                          dtype="float32", max_context=CONTEXT, kv_dtype="float32")
    return part, prompt


def random_model() -> tuple[Any, list[int]]:
    from bench_engine import random_partition

    from node.engine.config import parse_config

    cfg = parse_config(SMOLLM2_SHAPE)
    part = random_partition(cfg, "float32", CONTEXT)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 32).tolist()
    return dataclasses.replace(part, kv_dtype="float32"), prompt


def with_kv(part: Any, kv_dtype: str) -> Any:
    """The same weights with a cache of another dtype (a new Partition, shared params)."""
    return dataclasses.replace(part, kv_dtype=kv_dtype)


def greedy_logits(part: Any, prompt: list[int], steps: int, forced: list[int] | None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits [steps, vocab] of each step; with `forced`, the tokens
    fed are those (teacher forcing), the returned ones still each step's argmax."""
    cache = part.new_cache(1)
    cache, logits = part.prefill(cache, np.asarray(prompt))
    out, rows = [], []
    pos = len(prompt)
    for i in range(steps):
        row = np.asarray(logits, np.float32).reshape(-1)
        rows.append(row)
        tok = int(row.argmax())
        out.append(tok)
        feed = forced[i] if forced is not None else tok
        cache, logits = part.decode(cache, np.asarray([feed]), [0], [pos])
        pos += 1
    return out, np.stack(rows)


def accuracy(part: Any, prompt: list[int], steps: int) -> dict[str, Any]:
    ref, ref_logits = greedy_logits(part, prompt, steps, None)
    res: dict[str, Any] = {}
    for kv in DTYPES[1:]:
        p = with_kv(part, kv)
        free, _ = greedy_logits(p, prompt, steps, None)
        forced, logits = greedy_logits(p, prompt, steps, ref)
        diff = np.abs(logits - ref_logits)
        flips = [i for i, (a, b) in enumerate(zip(forced, ref, strict=True)) if a != b]
        top2 = np.sort(ref_logits, axis=1)[:, -2:]
        first = next((i for i, (a, b) in enumerate(zip(free, ref, strict=True)) if a != b), None)
        res[kv] = {
            "greedy_equal": free == ref,
            "first_difference": first,
            "max_logit_diff": float(diff.max()),
            "mean_logit_diff": float(diff.mean()),
            "logit_range": float(np.ptp(ref_logits, axis=1).mean()),
            # How close the float32 cache's top two logits were where the argmax flipped.
            "flip_margins": [float(top2[i, 1] - top2[i, 0]) for i in flips],
            "forced_argmax_agree": float(np.mean([a == b for a, b in zip(forced, ref, strict=True)])),
        }
    return res


RULES = ("engine", "pow2", "block", "x1.5")  # engine: CacheGeometry.key_length (half octaves)


class _Geometry:
    """A CacheGeometry whose key bucket follows another rule (host side only)."""

    def __init__(self, geom: Any, rule: str) -> None:
        self.geom, self.rule = geom, rule

    def __getattr__(self, name: str) -> Any:
        return getattr(self.geom, name)

    def key_length(self, need: int) -> int:
        g = self.geom
        if self.rule == "engine":
            return int(g.key_length(need))
        if self.rule == "pow2":
            size = pow2_bucket(need, floor=2 * g.block)
        elif self.rule == "block":
            size = max(2 * g.block, -(-need // g.block) * g.block)
        else:  # 2^k and 1.5 * 2^k, multiples of the block
            size = 2 * g.block
            while size < need:
                half = size // 2 if size & (size - 1) == 0 else size // 3
                size = size + half
        return int(min(size, g.length))


def _stepper(part: Any, pos: int, steps: int) -> Any:
    from node.engine import SamplingParams
    from node.engine.sampling import SamplerState

    vocab = part.config.vocab_size
    cache = part.new_cache(1)
    prompt = np.random.default_rng(pos).integers(0, vocab, pos - steps // 2)
    cache, _ = part.prefill(cache, prompt)
    state = SamplerState(SamplingParams(), vocab)
    box = [cache]

    def run() -> float:
        p, tok = len(prompt), 1
        t = time.perf_counter()
        for _ in range(steps):
            box[0], got = part.tail_step(box[0], np.asarray([tok]), [0], [p], [state])
            tok = int(got.tokens[0])
            p += 1
        return (time.perf_counter() - t) / steps

    run()  # compiles
    return run


def decode_ms(parts: dict[str, Any], positions: list[int], rounds: int = 5, steps: int = 16) -> dict[str, dict[int, float]]:
    """ms per token of each variant at each position: the best of `rounds` rounds, the
    variants taking turns within each round (the machine's load drifts)."""
    runs = {(name, pos): _stepper(part, pos, steps) for name, part in parts.items() for pos in positions}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for key, run in runs.items():
            best[key] = min(best[key], run())
    return {name: {pos: round(1000 * best[(name, pos)], 2) for pos in positions} for name in parts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "random", "both"), default="both")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--positions", default="300,530,1000")
    ap.add_argument("--only", choices=("accuracy", "speed"))
    ap.add_argument("--kv", default=",".join(DTYPES), help="cache dtypes to time, each with an optional key bucket rule "
                    f"(dtype:rule, rule one of {', '.join(RULES)}; default engine)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    models = ("smollm2", "random") if args.model == "both" else (args.model,)
    res: dict[str, Any] = {}
    for name in models:
        part, prompt = smollm2_partition() if name == "smollm2" else random_model()
        got: dict[str, Any] = {"bytes_per_slot": {kv: with_kv(part, kv).new_cache(1).nbytes for kv in DTYPES}}
        if args.only != "speed":
            got["accuracy"] = accuracy(part, prompt, args.steps)
        if args.only != "accuracy":
            positions = [int(x) for x in args.positions.split(",")]
            variants = {}
            for v in args.kv.split(","):
                kv, _, rule = v.partition(":")
                p = with_kv(part, kv)
                p.geom = _Geometry(p.geom, rule or "engine")
                variants[v] = p
            got["decode_ms"] = decode_ms(variants, positions, args.rounds)
        res[name] = got
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for name, got in res.items():
        print(f"== {name}")
        print("cache bytes per slot (context 4096):",
              ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in got["bytes_per_slot"].items()))
        for kv, a in got.get("accuracy", {}).items():
            print(f"{kv:9s} greedy equal {a['greedy_equal']} (first diff {a['first_difference']}), "
                  f"max |dlogit| {a['max_logit_diff']:.4g}, mean {a['mean_logit_diff']:.3g} "
                  f"(logit range {a['logit_range']:.3g}), forced argmax agree {a['forced_argmax_agree']:.3f}"
                  f" (top-2 margins where flipped: {[round(m, 5) for m in a['flip_margins']]})")
        for kv, ms in got.get("decode_ms", {}).items():
            print(f"{kv:9s} decode ms/token at " + ", ".join(f"{p}: {v}" for p, v in ms.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
