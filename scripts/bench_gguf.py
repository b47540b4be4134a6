"""Benchmark of GGUF files against llama.cpp: SmolLM2-135M-Instruct (the catalogue's Q4_1
file) and a random Qwen2.5-0.5B-shaped model quantized by llama.cpp to Q4_K_M and Q8_0.

    python scripts/bench_gguf.py [--new 64] [--rounds 3] [--no-llamacpp] [--no-shape] [--json]

The engine loads each file with load_partition(weights="native") in float32 compute;
llama.cpp is llama-cpp-python (scripts/llamacpp_ref.py) on the same file, n_threads =
n_threads_batch = this process's CPU affinity count (the CPUs XLA uses). Engine and
llama.cpp measurements alternate, --rounds rounds of each: a tok/s key is the median,
its ``_spread`` key [min, max] (this machine's speed drifts by 15-30% over minutes).
Run it on an idle machine: llama.cpp's threads spin at every barrier, and a process
sharing their cores slows it 10-100x where XLA loses a fraction (a note says when the
load average was above 0.5 at the start, and the speed verdicts say "unreliable").
OMP_WAIT_POLICY=passive in the environment makes llama.cpp tolerate a busy machine
(SmolLM2 at load 4 on 2 cores: 55-60 tok/s against 1-27 by default) at some cost when idle.

Keys (--json, one object; null when not measured, "notes" says why):
- smollm2_tok_s, smollm2_llamacpp_tok_s: batch-1 greedy decode, a 32-token prompt then
  --new timed steps (tail steps for the engine); shape_q4k_tok_s,
  shape_q4k_llamacpp_tok_s, shape_q8_tok_s, shape_q8_llamacpp_tok_s: the same on the
  Qwen2.5-0.5B shape's Q4_K_M and Q8_0 files;
- smollm2_prefill_tok_s, smollm2_llamacpp_prefill_tok_s: a 500-token prompt from an
  empty cache (engine prefill_chunk 512, llama.cpp n_batch 512);
- smollm2_peak_bytes, smollm2_llamacpp_peak_bytes: peak RSS growth of a fresh process
  loading the file and decoding a few tokens (the GGUF's pages llama.cpp maps count);
- smollm2_perplexity, smollm2_llamacpp_perplexity, perplexity_vs_llamacpp (engine /
  llama.cpp - 1): tests/helpers/perplexity.txt as the engine's tokenizer encodes it (no
  BOS), one window from position 0, ids[1:] scored (runner.perplexity's method);
- smollm2_greedy_equal_llamacpp, shape_q4k_..., shape_q8_... (True/False) with
  ..._greedy_first_mismatch (index, null when equal): --new + 3 greedy tokens after the
  same prompt (SmolLM2: the text's first 32 tokens; the shape: random ids);
- q4k_bytes_per_param: the engine's held weight bytes (PartitionParams.nbytes) for the
  Q4_K_M file over the parameter count; shape_q4k_bandwidth_fraction: the weight bytes a
  decode step reads x tok/s / memory_bandwidth_gb_s (and the same for llama.cpp's file
  bytes, shape_q4k_llamacpp_bandwidth_fraction);
- memory_bandwidth_gb_s: this machine's read bandwidth, measured in the same run
  (memory_bandwidth_after_gb_s again at the end; load_average_before: the machine's);
- shape_q4k_types, shape_q8_types: {tensor kind: GGUF types} the quantized files hold,
  shape_q4k_file_bytes_per_param, shape_q8_...: the files' tensor bytes / parameters.
  Hidden 896 is not a multiple of 256: llama.cpp's Q4_K_M falls back to Q5_0 (Q6_K to
  Q8_0) for every matrix with 896-wide rows, so the file is Q5_0 but for ffn_down
  (Q4_K/Q6_K) and token_embd (Q8_0), as real Qwen2.5-0.5B Q4_K_M files are; an engine
  without Q5_0 cannot load it (a note says so, its keys stay null);
- smollm2_int8_tok_s, smollm2_int8_perplexity, int8_perplexity_delta: engine int8
  weights (in the same alternating rounds). The 0.5B shape's int8 keys and SmolLM2's
  int8 peak bytes were dropped: bench_engine.py --only int8 measures them.
Targets: decode >= 1.2x llama.cpp at batch 1 on both models, prefill >= 1.5x,
q4k_bytes_per_param <= 0.6, |perplexity_vs_llamacpp| <= 0.5%.

Without llama-cpp-python the llama.cpp keys are null, and the shape's Q8_0 file is
written by node.testing.gguf_writer instead (no Q4_K_M: that needs llama.cpp's quantizer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CONTEXT, CHUNK, PROMPT, PREFILL = 1024, 512, 32, 500
TEXT = ROOT / "tests" / "helpers" / "perplexity.txt"
TARGETS = {"decode": 1.2, "prefill": 1.5, "q4k_bytes_per_param": 0.6, "perplexity": 0.005}


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def memory_bandwidth_gb_s(mib: int = 512, passes: int = 5) -> float:
    """Read bandwidth: the best of `passes` max-reductions over a `mib` MiB float32 array,
    one slice per CPU of this process (a reduction this cheap keeps up with memory)."""
    a = np.ones(mib * 2**20 // 4, np.float32)
    parts = np.array_split(a, _threads())
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(passes):
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


# -- the files -------------------------------------------------------------------------


def _smollm2() -> tuple[Path, Path]:
    from node.gguf.catalog import fetch, lookup
    from node.gguf.sidecar import write_sidecars

    entry = lookup("smollm2:135m")
    assert entry is not None
    path = fetch(entry)
    return path, write_sidecars(path, Path(tempfile.mkdtemp(prefix="bench-gguf-")))


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet (bytes_to_unicode), byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _placeholder_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE of `vocab` tokens for a random model: the 256 byte symbols, one
    merge, placeholders, <|endoftext|> last. It only has to load everywhere."""
    tokens = [*_byte_alphabet(), "Ġt"]
    tokens += [f"<r{i}>" for i in range(len(tokens), vocab - 1)]
    eos = "<|endoftext|>"
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": vocab - 1, "content": eos, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}],
           "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                 "trim_offsets": False, "use_regex": True},
           "post_processor": None, "decoder": {"type": "ByteLevel"},
           "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": ["Ġ t"]}}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "add_bos_token": False}))


@dataclass(frozen=True)
class ShapeFiles:
    q4k: Path | None  # LLAMA_FTYPE_MOSTLY_Q4_K_M, None without llama.cpp
    q8: Path  # LLAMA_FTYPE_MOSTLY_Q8_0 (the project's writer without llama.cpp)
    sidecars: Path  # config.json and tokenizer files for the engine (from the F16 file)


def shape_files(root: Path, llamacpp: bool) -> ShapeFiles:
    """The Qwen2.5-0.5B-shaped random model (bench_engine.write_checkpoint) in `root` as an
    F16 GGUF (node.testing.gguf_writer), quantized by llama.cpp to Q4_K_M and Q8_0."""
    from bench_engine import SHAPES, write_checkpoint
    from llamacpp_ref import quantize

    from node.gguf.sidecar import write_sidecars
    from node.testing.gguf_writer import write_gguf

    raw = SHAPES["qwen0.5b"]
    hf = root / "hf"
    write_checkpoint(raw, hf)
    _placeholder_tokenizer(hf, raw["vocab_size"])
    f16 = write_gguf(hf, root / "shape-F16.gguf", qtype="F16", chat_template=False)
    sidecars = write_sidecars(f16, root / "sidecars")
    if not llamacpp:
        q8 = write_gguf(hf, root / "shape-Q8_0.gguf", qtype="Q8_0", chat_template=False)
        (hf / "model.safetensors").unlink()
        return ShapeFiles(None, q8, sidecars)
    (hf / "model.safetensors").unlink()
    q4k = quantize(f16, root / "shape-Q4_K_M.gguf", "Q4_K_M")
    q8 = quantize(f16, root / "shape-Q8_0.gguf", "Q8_0")
    f16.unlink()
    return ShapeFiles(q4k, q8, sidecars)


# -- the engine ------------------------------------------------------------------------


def _load(path: Path, side: Path, weights: str = "native") -> Any:
    from node.engine import PartitionSpec, WeightSource, load_config, load_partition

    cfg = load_config(side)
    return load_partition(WeightSource.from_gguf(path), cfg, PartitionSpec.whole(cfg), dtype="float32",
                          max_context=CONTEXT, prefill_chunk=CHUNK, weights=weights)


def engine_greedy(part: Any, prompt: Sequence[int], n: int) -> list[int]:
    """The engine's first n greedy tokens after `prompt`: prefill, then tail steps."""
    from node.engine import SamplerState, SamplingParams

    state = SamplerState(SamplingParams(), part.config.vocab_size)
    state.observe(list(prompt))
    cache, logits = part.prefill(part.new_cache(1), list(prompt))
    tokens = [int(np.argmax(logits))]
    while len(tokens) < n:
        cache, out = part.tail_step(cache, tokens[-1:], [0], [len(prompt) + len(tokens) - 1], [state])
        tokens.append(int(out.tokens[0]))
    return tokens[:n]


def engine_prefill_tok_s(part: Any, ids: Sequence[int]) -> float:
    cache = part.new_cache(1)
    t0 = time.perf_counter()
    _, logits = part.prefill(cache, list(ids))
    np.asarray(logits)
    return len(ids) / (time.perf_counter() - t0)


def weight_bytes_per_token(part: Any) -> int:
    """Bytes of the engine's weights a decode step reads: all but an untied embedding."""
    import jax

    params = part.params
    if params.head is None or params.embed is None:
        return int(params.nbytes)
    return int(params.nbytes) - sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params.embed))


def peak_bytes(weights: str) -> int:
    """In a fresh process: the peak RSS growth of loading SmolLM2 and decoding a few tokens."""
    out = subprocess.run([sys.executable, __file__, "--measure-memory", weights], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _measure_memory(weights: str) -> int:
    import jax
    from bench_engine import proc_status, tail_tok_s

    path, side = _smollm2()
    jax.numpy.zeros(1).block_until_ready()
    base = proc_status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    part = _load(path, side, weights)
    tail_tok_s(part, 1, PROMPT, 4, None)
    return proc_status("VmHWM:") - base


# -- the comparison --------------------------------------------------------------------


def alternate(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each measure once per round, in turn, `rounds` rounds: drift hits all alike."""
    out: dict[str, list[float]] = {k: [] for k in measures}
    for _ in range(rounds):
        for key, fn in measures.items():
            out[key].append(fn())
    return out


def summarize(samples: dict[str, list[float]]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for key, xs in samples.items():
        res[key] = statistics.median(xs)
        res[f"{key}_spread"] = [min(xs), max(xs)]
    return res


def greedy_keys(name: str, engine: list[int], ref: list[int]) -> dict[str, Any]:
    from llamacpp_ref import first_mismatch

    miss = first_mismatch(engine, ref)
    return {f"{name}_greedy_equal_llamacpp": miss is None, f"{name}_greedy_first_mismatch": miss}


def compare(name: str, part: Any, path: Path, args: argparse.Namespace, greedy_prompt: Sequence[int],
            extra: dict[str, Callable[[], float]] | None = None, prefill: bool = False) -> dict[str, Any]:
    """Decode tok/s (and with `prefill` 500-token prefill tok/s) of the engine's `part` and of
    llama.cpp on `path` in alternating rounds, and whether their greedy tokens agree."""
    from bench_engine import _prompts, tail_tok_s
    from llamacpp_ref import LlamaCpp

    vocab = part.config.vocab_size
    prompt = _prompts(vocab, 1, PROMPT)[0]  # tail_tok_s's prompt: the same tokens for both
    long = _prompts(vocab, 1, PREFILL, seed=1)[0]
    measures: dict[str, Callable[[], float]] = {f"{name}_tok_s": lambda: tail_tok_s(part, 1, PROMPT, args.new, None)}
    measures.update(extra or {})
    if prefill:
        engine_prefill_tok_s(part, long)  # compile
        measures[f"{name}_prefill_tok_s"] = lambda: engine_prefill_tok_s(part, long)
    ref = LlamaCpp(path, threads=_threads(), n_ctx=CONTEXT, n_batch=CHUNK) if args.llamacpp else None
    try:
        if ref is not None:
            measures[f"{name}_llamacpp_tok_s"] = lambda: ref.greedy(prompt, args.new).tok_s
            if prefill:
                measures[f"{name}_llamacpp_prefill_tok_s"] = lambda: ref.prefill_tok_s(long)
        res = summarize(alternate(measures, args.rounds))
        if ref is not None:
            theirs = ref.greedy(greedy_prompt, args.new).tokens
            res.update(greedy_keys(name, engine_greedy(part, greedy_prompt, len(theirs)), theirs))
    finally:
        if ref is not None:
            ref.close()
    return res


def _smollm2_engine(path: Path, side: Path, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity and the alternating rounds; the partitions are freed on return."""
    from bench_engine import tail_tok_s

    from node.engine.runner import Chain, perplexity

    part, int8 = _load(path, side), _load(path, side, "int8")
    res: dict[str, Any] = {"smollm2_perplexity": perplexity(Chain([part]), ids),
                           "smollm2_int8_perplexity": perplexity(Chain([int8]), ids)}
    res["int8_perplexity_delta"] = res["smollm2_int8_perplexity"] / res["smollm2_perplexity"] - 1
    res["smollm2_weight_bytes"] = part.params.nbytes
    res.update(compare("smollm2", part, path, args, ids[:PROMPT], prefill=True,
                       extra={"smollm2_int8_tok_s": lambda: tail_tok_s(int8, 1, PROMPT, args.new, None)}))
    return res


def _llamacpp_alone(name: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp's decode tok/s on a file the engine could not load."""
    from bench_engine import _prompts
    from llamacpp_ref import LlamaCpp

    with LlamaCpp(path, threads=_threads(), n_ctx=CONTEXT, n_batch=CHUNK) as ref:
        prompt = _prompts(ref.n_vocab, 1, PROMPT)[0]
        return summarize(alternate({f"{name}_llamacpp_tok_s": lambda: ref.greedy(prompt, args.new).tok_s},
                                   args.rounds))


def smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from llamacpp_ref import LlamaCpp, peak_rss

    from node.engine.tokenizer import Tokenizer

    path, side = _smollm2()
    ids = Tokenizer.from_model_dir(side).encode(TEXT.read_text(), add_special_tokens=False)
    res = _smollm2_engine(path, side, ids, args)
    res["smollm2_peak_bytes"] = peak_bytes("native")
    if args.llamacpp:
        with LlamaCpp(path, threads=_threads(), n_ctx=CONTEXT, n_batch=CHUNK, logits_all=True) as ref:
            res["smollm2_llamacpp_perplexity"] = ref.perplexity(ids)
        res["perplexity_vs_llamacpp"] = res["smollm2_perplexity"] / res["smollm2_llamacpp_perplexity"] - 1
        res["smollm2_llamacpp_peak_bytes"] = peak_rss(path, _threads())
    return res


def shape(args: argparse.Namespace, bandwidth: float, notes: list[str]) -> dict[str, Any]:
    """The Qwen2.5-0.5B shape's Q4_K_M and Q8_0 files, engine against llama.cpp."""
    from bench_engine import _prompts
    from llamacpp_ref import file_bytes_per_param, tensor_types
    from llamacpp_ref import weight_bytes_per_token as file_bytes_per_token

    from node.engine import PartitionSpec, partition_param_count

    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-shape-") as tmp:
        t0 = time.perf_counter()
        files = shape_files(Path(tmp), args.llamacpp)
        print(f"  shape files written in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        for name, path in (("shape_q4k", files.q4k), ("shape_q8", files.q8)):
            if path is None:
                continue
            res[f"{name}_types"] = tensor_types(path)
            res[f"{name}_file_bytes_per_param"] = file_bytes_per_param(path)
            try:
                part = _load(path, files.sidecars)
            except Exception as exc:  # the engine refusing a type is a result, not a crash
                notes.append(f"{name}: the engine cannot load llama.cpp's file: {type(exc).__name__}: {exc}")
                part = None
            if part is None:
                if args.llamacpp:  # llama.cpp's side alone, still worth the figure
                    res.update(_llamacpp_alone(name, path, args))
            else:
                greedy_prompt = _prompts(part.config.vocab_size, 1, PROMPT, seed=2)[0]
                res.update(compare(name, part, path, args, greedy_prompt))
                per_token = weight_bytes_per_token(part)
                if name == "shape_q4k":
                    cfg = part.config
                    res["q4k_bytes_per_param"] = part.params.nbytes / partition_param_count(
                        cfg, PartitionSpec.whole(cfg))
                    res["shape_q4k_bandwidth_fraction"] = per_token * res["shape_q4k_tok_s"] / (bandwidth * 1e9)
                del part
            if name == "shape_q4k" and res.get("shape_q4k_llamacpp_tok_s"):
                res["shape_q4k_llamacpp_bandwidth_fraction"] = (
                    file_bytes_per_token(path) * res["shape_q4k_llamacpp_tok_s"] / (bandwidth * 1e9))
            print(f"  {name} done", file=sys.stderr, flush=True)
    return res


KEYS = (
    "smollm2_tok_s", "smollm2_llamacpp_tok_s", "smollm2_prefill_tok_s", "smollm2_llamacpp_prefill_tok_s",
    "smollm2_peak_bytes", "smollm2_llamacpp_peak_bytes", "smollm2_perplexity", "smollm2_llamacpp_perplexity",
    "perplexity_vs_llamacpp", "smollm2_greedy_equal_llamacpp", "smollm2_greedy_first_mismatch",
    "smollm2_int8_tok_s", "smollm2_int8_perplexity", "int8_perplexity_delta",
    "shape_q4k_tok_s", "shape_q4k_llamacpp_tok_s", "shape_q8_tok_s", "shape_q8_llamacpp_tok_s",
    "shape_q4k_greedy_equal_llamacpp", "shape_q4k_greedy_first_mismatch",
    "shape_q8_greedy_equal_llamacpp", "shape_q8_greedy_first_mismatch",
    "q4k_bytes_per_param", "shape_q4k_bandwidth_fraction", "shape_q4k_llamacpp_bandwidth_fraction",
    "memory_bandwidth_gb_s",
)


def verdicts(res: dict[str, Any]) -> dict[str, str]:
    """Each target: 'met', 'missed' or 'n/a', with the numbers."""
    out: dict[str, str] = {}

    def ratio(label: str, ours: str, theirs: str, goal: float) -> None:
        a, b = res.get(ours), res.get(theirs)
        out[label] = "n/a" if not (a and b) else f"{'met' if a / b >= goal else 'missed'} ({a / b:.2f} >= {goal})"

    ratio("smollm2_decode_vs_llamacpp", "smollm2_tok_s", "smollm2_llamacpp_tok_s", TARGETS["decode"])
    ratio("shape_q4k_decode_vs_llamacpp", "shape_q4k_tok_s", "shape_q4k_llamacpp_tok_s", TARGETS["decode"])
    ratio("shape_q8_decode_vs_llamacpp", "shape_q8_tok_s", "shape_q8_llamacpp_tok_s", TARGETS["decode"])
    ratio("smollm2_prefill_vs_llamacpp", "smollm2_prefill_tok_s", "smollm2_llamacpp_prefill_tok_s",
          TARGETS["prefill"])
    if (res.get("load_average_before") or 0.0) > 0.5:
        for label, verdict in out.items():
            if verdict != "n/a":
                out[label] = f"{verdict}, unreliable: the machine was busy"
    b = res.get("q4k_bytes_per_param")
    goal = TARGETS["q4k_bytes_per_param"]
    out["q4k_bytes_per_param"] = "n/a" if b is None else f"{'met' if b <= goal else 'missed'} ({b:.3f} <= {goal})"
    p = res.get("perplexity_vs_llamacpp")
    goal = TARGETS["perplexity"]
    out["perplexity_vs_llamacpp"] = ("n/a" if p is None else
                                     f"{'met' if abs(p) <= goal else 'missed'} (|{p:+.4f}| <= {goal})")
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list) and all(isinstance(x, float) for x in value):
        return "[" + ", ".join(_text(x) for x in value) + "]"
    return json.dumps(value)


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
    from llamacpp_ref import missing

    t0 = time.time()
    notes: list[str] = []
    if args.llamacpp and (why := missing()) is not None:
        print(f"no llama.cpp figures: {why}", file=sys.stderr)
        notes.append(f"no llama.cpp figures: {why}")
        args.llamacpp = False
    res: dict[str, Any] = dict.fromkeys(KEYS)
    res["load_average_before"] = os.getloadavg()[0]
    if res["load_average_before"] > 0.5:
        notes.append(f"the machine was busy (load average {res['load_average_before']:.1f} before the run): "
                     "llama.cpp's spinning threads lose far more than XLA's to a process sharing their cores "
                     "(10-100x on a 2-core VM); compare on an idle machine")
    res["memory_bandwidth_gb_s"] = memory_bandwidth_gb_s()
    res.update(smollm2(args))
    print("  smollm2 done", file=sys.stderr, flush=True)
    if args.shape:
        res.update(shape(args, res["memory_bandwidth_gb_s"], notes))
    res["memory_bandwidth_after_gb_s"] = memory_bandwidth_gb_s()  # how much the machine drifted
    res["threads"] = _threads()
    res["targets"] = verdicts(res)
    res["notes"] = notes
    res["seconds"] = time.time() - t0
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for key, value in res.items():
        if key not in ("targets", "notes") and not key.endswith("_spread"):
            spread = res.get(f"{key}_spread")
            print(f"{key:40s} {_text(value):>14s}" + (f"  min/max {_text(spread)}" if spread else ""))
    for key, verdict in res["targets"].items():
        print(f"  {key:38s} {verdict}")
    for note in notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
