"""Benchmark of a real GGUF model: SmolLM2-135M-Instruct (the catalogue's Q4_1 file).

    python scripts/bench_gguf.py [--new 64] [--rounds 3] [--no-llamacpp] [--no-shape] [--json]

Decode tokens/s at batch 1 (tail steps, greedy) and the peak memory of loading and
serving, for the engine with the GGUF dequantized to float32 and with int8 weights
(engine.weights = "int8"), and llama.cpp (llama-cpp-python) on the same file with the
same threads; the perplexity of the tests' fixed text (tests/helpers/perplexity.txt)
in f32 and int8; and, unless --no-shape, the Qwen2.5-0.5B random shape in f32 against
int8 (scripts/bench_engine.py's checkpoint). The engine's variants are timed in
alternating rounds (best of each): this machine's speed drifts by 15-30% over minutes.

Keys (--json): smollm2_f32_tok_s, smollm2_int8_tok_s, smollm2_llamacpp_tok_s,
smollm2_f32_peak_bytes, smollm2_int8_peak_bytes, int8_perplexity_delta (relative),
int8_vs_f32 (decode speed, 0.5B shape), int8_memory_ratio (weight bytes int8 / f32,
0.5B shape). Targets: int8 decode >= f32, weight memory <= 0.3x, perplexity <= +3%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CONTEXT, CHUNK, PROMPT = 512, 64, 32
TEXT = ROOT / "tests" / "helpers" / "perplexity.txt"


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def _smollm2() -> tuple[Path, Path]:
    from node.gguf.catalog import fetch, lookup
    from node.gguf.sidecar import write_sidecars

    entry = lookup("smollm2:135m")
    assert entry is not None
    path = fetch(entry)
    return path, write_sidecars(path, Path(tempfile.mkdtemp(prefix="bench-gguf-")))


def _tok_s(parts: dict[str, Any], args: argparse.Namespace, interleaved_best: Any, tail_tok_s: Any
           ) -> list[float]:
    """Batch-1 decode tok/s of each partition, best of alternating rounds."""
    steppers = [(lambda p=p: 1.0 / tail_tok_s(p, 1, PROMPT, args.new, None)) for p in parts.values()]
    return [1.0 / t for t in interleaved_best(steppers, args.rounds, 1)]


def _load(source: Any, side: Path, weights: str) -> Any:
    from node.engine import PartitionSpec, load_config, load_partition

    cfg = load_config(side)
    return load_partition(source, cfg, PartitionSpec.whole(cfg), dtype="float32", max_context=CONTEXT,
                          prefill_chunk=CHUNK, weights=weights)


def peak_bytes(weights: str) -> int:
    """In a fresh process: the peak RSS growth of loading SmolLM2 and decoding a few tokens."""
    out = subprocess.run([sys.executable, __file__, "--measure-memory", weights], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _measure_memory(weights: str) -> int:
    import jax

    from node.engine import WeightSource

    path, side = _smollm2()
    jax.numpy.zeros(1).block_until_ready()

    from bench_engine import proc_status

    base = proc_status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    part = _load(WeightSource.from_gguf(path), side, weights)
    from bench_engine import tail_tok_s

    tail_tok_s(part, 1, PROMPT, 4, None)
    return proc_status("VmHWM:") - base


def smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from bench_engine import interleaved_best, llamacpp_decode_tok_s, tail_tok_s

    from node.engine import WeightSource
    from node.engine.runner import Chain, perplexity
    from node.engine.tokenizer import Tokenizer

    path, side = _smollm2()
    parts = {w: _load(WeightSource.from_gguf(path), side, w) for w in ("native", "int8")}
    tok = Tokenizer.from_model_dir(side)
    ids = tok.encode(TEXT.read_text(), add_special_tokens=False)
    ppl = {w: perplexity(Chain([p]), ids) for w, p in parts.items()}
    f32, int8 = _tok_s(parts, args, interleaved_best, tail_tok_s)
    res: dict[str, Any] = {
        "smollm2_f32_tok_s": f32, "smollm2_int8_tok_s": int8,
        "smollm2_f32_perplexity": ppl["native"], "smollm2_int8_perplexity": ppl["int8"],
        "int8_perplexity_delta": ppl["int8"] / ppl["native"] - 1,
        "smollm2_f32_weight_bytes": parts["native"].params.nbytes,
        "smollm2_int8_weight_bytes": parts["int8"].params.nbytes,
    }
    del parts
    res["smollm2_f32_peak_bytes"] = peak_bytes("native")
    res["smollm2_int8_peak_bytes"] = peak_bytes("int8")
    res["smollm2_llamacpp_tok_s"] = None
    if args.llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: no llama.cpp figure", file=sys.stderr)
        else:
            res["smollm2_llamacpp_tok_s"] = llamacpp_decode_tok_s(path, 49152, PROMPT, args.new, _threads())
    return res


def shape(args: argparse.Namespace) -> dict[str, Any]:
    """The Qwen2.5-0.5B random shape, f32 against int8 (decode speed, weight bytes)."""
    from bench_engine import SHAPES, interleaved_best, tail_tok_s, write_checkpoint

    from node.engine import PartitionSpec, WeightSource, load_config, load_partition

    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        write_checkpoint(SHAPES["qwen0.5b"], Path(tmp))
        cfg = load_config(tmp)
        parts = {w: load_partition(WeightSource.from_dir(tmp), cfg, PartitionSpec.whole(cfg), dtype="float32",
                                   max_context=CONTEXT, prefill_chunk=CHUNK, weights=w)
                 for w in ("native", "int8")}
    f32, int8 = _tok_s(parts, args, interleaved_best, tail_tok_s)
    return {"shape_f32_tok_s": f32, "shape_int8_tok_s": int8, "int8_vs_f32": int8 / f32,
            "int8_memory_ratio": parts["int8"].params.nbytes / parts["native"].params.nbytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llamacpp", dest="llamacpp", action="store_false")
    ap.add_argument("--no-shape", dest="shape", action="store_false")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure-memory", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_memory:
        print(_measure_memory(args.measure_memory))
        return 0
    t0 = time.time()
    res = smollm2(args)
    if args.shape:
        res.update(shape(args))
    res["seconds"] = time.time() - t0
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for key, value in res.items():
        text = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
        print(f"{key:28s} {text:>18s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
